"""Shared pytest fixtures: generic, real components only (real DuckDB files, real tiny torch models)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OFFICIAL = REPO / "tests" / "fixtures" / "esft-official"  # the authors' published files (see its README)

torch.set_num_threads(1)  # the test machine is small and shared


@pytest.fixture
def tmp_db(tmp_path) -> Path:
    """Path of a not-yet-created DuckDB file in a fresh temporary directory."""
    return tmp_path / "traces.duckdb"


@pytest.fixture
def run_esft():
    """Run the real `esft` CLI in a subprocess (python -m esft_core.cli); returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def run(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "esft_core.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=REPO, **kw)

    return run
