"""Subcommand groups of the `esft` CLI (see esft_core/cli.py), and the output-file helpers they share."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from esft_core.errors import EsftError


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
    """Write to --out atomically (tmp file + rename), or stdout (with a final newline)."""
    if not out:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    check_out(out, force, flag)
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")  # as is: JSON outputs are byte-identical to the authors' files
    os.replace(tmp, path)
