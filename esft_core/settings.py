"""Every `ESFT_*` environment variable, read in one place (README's "Environment variables" table lists them all;
tests/test_docs.py keeps the two in step). Values are read when asked for, so tests and jobs can change them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped data (demo model, task sets, general corpus): data/ of a checkout, or the `esft_data` package an
# installed wheel carries beside esft_core (pyproject.toml maps data/ to it).
SHIPPED_DATA = REPO_ROOT / "data" if (REPO_ROOT / "data").is_dir() else REPO_ROOT / "esft_data"


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str


VARS: dict[str, Var] = {v.name: v for v in [
    Var("ESFT_DB", "artifacts/traces.duckdb", "trace database the explorer opens"),
    Var("ESFT_WORKDIR", "artifacts", "explorer jobs, uploads, training runs and baseline evaluations"),
    Var("ESFT_DATA_DIR", "data", "shipped task data: <dir>/tasks/<task>/{train,eval}.jsonl, <dir>/general/"),
    Var("ESFT_MODEL", "demo", "model the explorer records and trains by default ('demo' = data/demo-moe)"),
    Var("ESFT_AUTO_RECORD", "1", "'0' disables recording the demo tasks on a first start with no database"),
    Var("ESFT_AUTO_TOKENS", "2048", "token budget per task of that first recording"),
    Var("ESFT_UPLOAD_MB", "50", "upload size cap of the explorer, in MB"),
    Var("ESFT_JOB_THREADS", "1", "torch threads of background job processes"),
    Var("ESFT_STANDBY", "1", "'0' disables the warm standby job runner"),
    Var("ESFT_STANDBY_PRELOAD", "", "comma-separated modules the standby runner imports (default: torch stack)"),
    Var("ESFT_STANDBY_IDLE_S", "900", "seconds an unused standby runner waits before exiting"),
    Var("ESFT_METRIC_MODULES", "", "comma-separated modules imported to register your own task metrics"),
    Var("ESFT_METHOD_MODULES", "", "comma-separated modules imported to register your own training methods"),
    Var("ESFT_JUDGE_API_KEY", "", "API key sent to the `esft eval --judge-url` endpoint (optional)"),
    Var("ESFT_INGEST_WAIT", "600", "seconds a finished recording retries its ingest while a reader holds the DB lock "
        "(`esft record --ingest-wait` sets it)"),
    Var("ESFT_DEBUG", "", "non-empty: CLI errors print a full traceback"),
]}


def get(name: str) -> str | None:
    """The variable's value; None when unset and without default (unknown names are a programming error)."""
    v = VARS[name]
    val = os.environ.get(name)
    return val if val not in (None, "") else (v.default or None)


def is_set(name: str) -> bool:
    return name in os.environ


def path(name: str) -> Path:
    """A path variable, relative paths resolved against the repository (defaults) or the working directory."""
    raw = os.environ.get(name)
    if not raw and name == "ESFT_DATA_DIR":
        return SHIPPED_DATA
    p = Path(raw).expanduser() if raw else REPO_ROOT / VARS[name].default
    return p if p.is_absolute() else Path.cwd() / p


def flag(name: str) -> bool:
    """'0' (or empty) is off; anything else on."""
    return (get(name) or "0") != "0"


def integer(name: str) -> int:
    return int(get(name) or VARS[name].default)


def number(name: str) -> float:
    return float(get(name) or VARS[name].default)


def items(name: str) -> list[str]:
    return [x.strip() for x in (get(name) or "").split(",") if x.strip()]


def metric_modules() -> list[str]:
    return items("ESFT_METRIC_MODULES")
