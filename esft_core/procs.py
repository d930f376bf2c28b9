"""Local process helpers shared by the job runner and the trace store (no DuckDB, no torch here)."""

from __future__ import annotations

import os


def pid_alive(pid: int | None) -> bool:
    """Whether local process `pid` runs (a zombie — finished, not yet reaped — counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return True
