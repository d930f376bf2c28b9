"""Workspace: run directories and background jobs the explorer starts (a generic job runner, and the launchers of
record/train/eval jobs on top of it)."""
