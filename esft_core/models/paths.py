"""Where a model lives, without importing torch: 'demo' → the shipped demo checkpoint, a directory → itself (it must
hold config.json), anything else → a hub id. The explorer's pages call this on their first visit (model facts on
Select & Train), where importing torch through esft_core.models.loading would cost ~1 s on a small CPU;
esft_core.models.loading
re-exports these names for the model-loading code."""

from __future__ import annotations

from pathlib import Path

from esft_core.errors import EsftError
from esft_core.settings import REPO_ROOT, SHIPPED_DATA

DEMO_MODEL = SHIPPED_DATA / "demo-moe"
__all__ = ["DEMO_MODEL", "REPO_ROOT", "resolve_model_path"]


def resolve_model_path(name_or_path: str | Path | None) -> str:
    """'demo' or None → the shipped demo model; an existing directory → itself; anything else → a hub id."""
    if name_or_path in (None, "", "demo"):
        return str(DEMO_MODEL)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise EsftError(f"model directory {p} has no config.json")
        return str(p)
    if str(name_or_path).startswith((".", "/", "~")):
        raise EsftError(f"model directory {name_or_path} does not exist")
    return str(name_or_path)
