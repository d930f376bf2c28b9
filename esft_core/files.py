"""Files the toolkit writes and reads while other processes watch them: one atomic writer, one tolerant reader.

Every JSON/text file another process may read while it is written (run.json, status.json, launch.json, job specs,
expert configs, --out files) goes through `write_text` / `write_json`: the bytes land in a temp file beside the target
(named `NAME.PID.tmp`, so two writers never share one) and `os.replace` swaps it in, so a reader sees the old file
or the new one, never half of one. `read_json` is the matching reader for files that may be missing or mid-swap on
a filesystem without atomic rename (it returns {} rather than raising). `read_metrics` reads a training run's
metrics.jsonl, whose last line may be torn by a kill during its write.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from esft_core.errors import EsftError


def temp_path(path: str | Path) -> Path:
    """The one temp-file name of an atomic write of `path` (same folder, so the rename never crosses devices)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename), as is: byte-exact formats stay byte-exact."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write itself failed (disk full, permissions)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """`obj` as JSON (non-JSON values such as paths as str), written atomically with a final newline."""
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path: str | Path, retries: int = 3) -> dict:
    """A JSON object from `path`, or {} when it is missing, a folder, or not (yet) whole JSON. A decode error is
    retried briefly: a writer on a filesystem without atomic rename may be mid-write."""
    for attempt in range(retries):
        try:
            out = json.loads(Path(path).read_text(encoding="utf-8"))
            return out if isinstance(out, dict) else {}
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
            return {}
        except json.JSONDecodeError:
            if attempt + 1 < retries:
                time.sleep(0.01)
    return {}


def read_metrics(path: str | Path, strict: bool = False) -> list[dict]:
    """The rows of a run's metrics.jsonl (`path` is the file or its run folder); [] when there is none yet.

    The last line is dropped when it is not whole JSON (written as the process was killed, or being written as a
    page polls). A bad line elsewhere means a damaged file: with `strict` (resuming a run) it is an error naming the
    line, otherwise (display) it is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn by a kill during the write: the checkpoint decides where training resumes
            if strict:
                raise EsftError(f"{path} line {i + 1} is not JSON; the run directory is damaged") from None
    return out


def check_out(out: str | None, force: bool = False, flag: str = "--out") -> None:
    """An output file path: not a directory, its directory exists, new unless --force (checked before any work)."""
    if not out:
        return
    path = Path(out)
    if path.is_dir():
        raise EsftError(f"{flag} {path} is a directory; give a file path")
    if path.parent and not path.parent.exists():
        raise EsftError(f"directory {path.parent} for {flag} does not exist")
    if path.exists() and not force:
        raise EsftError(f"{flag} {path} already exists; pass --force to overwrite it")


def write_out(text: str, out: str | None, force: bool = True, flag: str = "--out") -> None:
    """Write a command's result to --out atomically, or to stdout (with a final newline)."""
    if not out:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    check_out(out, force, flag)
    write_text(out, text)  # as is: JSON outputs are byte-identical to the authors' files
