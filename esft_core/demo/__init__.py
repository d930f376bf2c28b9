"""Offline demo: task-data generator and the tiny DeepSeek-V2-shaped MoE build script."""
