"""Tuning: training methods (one registry), the training recipe, its pre-flight checks and FSDP2."""
