"""An exclusive lock on a run directory, so two trainers (two jobs, two `esft train`) never share one `--out`.

`fcntl.flock` on `DIR/.esft-lock`: the kernel drops it when the holding process dies (kill -9 included), so a
stale lock never blocks a `--resume`. The file holds the owner's pid and host for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from esft_core.errors import EsftError

LOCK_NAME = ".esft-lock"


class RunDirLock:
    """`with RunDirLock(out):` — held for the whole run; raises EsftError when another process holds it.

    A directory created here is removed again on exit when nothing but the lock file was written into it (an error
    before training started leaves nothing behind)."""

    def __init__(self, out: str | Path, flag: str = "--out"):
        self.out, self.flag = Path(out), flag
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunDirLock:
        if self.out.exists() and not self.out.is_dir():
            raise EsftError(f"{self.flag} {self.out} exists and is not a directory")
        if not self.out.parent.is_dir():
            raise EsftError(f"directory {self.out.parent} for {self.flag} does not exist")
        self.created = not self.out.exists()
        self.out.mkdir(exist_ok=True)
        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EsftError(f"{self.flag} {self.out} is in use by another training process ({owner}); wait for it "
                            "to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                (self.out / LOCK_NAME).unlink()
                self.out.rmdir()
        os.close(self.fd)  # releases the flock
        self.fd = None
