"""Local process helpers shared by the job runner, the trace store and the loaders (no DuckDB, no torch here)."""

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


def release_freed_host_memory() -> None:
    """Give the host heap's freed pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Loading a checkpoint allocates and frees thousands of tensors below glibc's 32 MB mmap threshold (a per-expert
    checkpoint's tensors are a few MB each, then cast): the freed blocks stay in the heap, interleaved with live
    ones, so the process keeps them. Measured on a 1.5 GB bf16 checkpoint loaded in float32: 4.5 GiB resident after
    `from_pretrained`, 3.3 GiB after the trim (3.0 GiB of weights)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other libcs: nothing to trim
        pass
