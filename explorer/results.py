"""Training-side reshaping for the Select & Train and Results pages: model parameter counts (from config.json and the
safetensors headers, no weights loaded) and tables of runs (esft_core.runs.RunInfo) and of their evaluations against
the untuned model. No streamlit here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import polars as pl


def _read_json(p: Path) -> dict:
    try:
        return json.loads(Path(p).read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return {}


def safetensors_numel(path: Path) -> int:
    """Number of parameters in a .safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        c = 1
        for d in info["shape"]:
            c *= int(d)
        total += c
    return total


def model_facts(model: str) -> dict:
    """{'total': params, 'per_expert': params of one routed expert, 'num_experts', 'hidden', 'expert_inter'} for a
    local model ('demo' or a directory). Unknown values are None (e.g. a hub id that is not downloaded)."""
    from esft_core.models import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
    except Exception:  # noqa: BLE001 - a bad path just means "unknown"
        return {"total": None, "per_expert": None, "num_experts": None}
    cfg = _read_json(path / "config.json")
    if not cfg:
        return {"total": None, "per_expert": None, "num_experts": None}
    hidden = cfg.get("hidden_size")
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    files = sorted(path.glob("*.safetensors"))
    total = sum(safetensors_numel(f) for f in files) if files else None
    n_exp = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    # A routed expert is a gated MLP: gate and up (I×H each, fused as gate_up_proj [2I, H]) and down (H×I).
    per = 3 * int(hidden) * int(inter) if hidden and inter else None
    return {"total": total, "per_expert": per, "num_experts": n_exp, "hidden": hidden, "expert_inter": inter}


def eval_rows(ev: dict) -> dict:
    """Flatten an eval JSON ({'tasks': {t: {'score', 'loss'}}, 'general_loss'}) to {column: value}."""
    row = {}
    for t, r in (ev.get("tasks") or {}).items():
        row[f"{t} score"] = r.get("score")
        row[f"{t} loss"] = r.get("loss")
    if ev.get("general_loss") is not None:
        row["general loss"] = ev["general_loss"]
    return row


def compare_eval(tuned: dict, base: dict) -> pl.DataFrame:
    """Untuned vs tuned, one row per measure: measure, untuned, tuned, change."""
    t, b = eval_rows(tuned), eval_rows(base)
    names = list(dict.fromkeys([*t, *b]))
    return pl.DataFrame({
        "measure": names,
        "untuned": [b.get(n) for n in names],
        "tuned": [t.get(n) for n in names],
    }, schema={"measure": pl.Utf8, "untuned": pl.Float64, "tuned": pl.Float64}).with_columns(
        change=pl.col("tuned") - pl.col("untuned"))


def runs_table(runs: list) -> pl.DataFrame:
    """Side-by-side table of training runs (esft_core.runs.RunInfo): method, task, status, steps, final loss, time,
    trainable params, peak memory, adapter size, task scores and general loss (and its rise over the untuned model
    when its baseline evaluation is known)."""
    rows = []
    for r in runs:
        run, m = r.run, r.metrics
        row = {"run": r.name, "method": r.config.get("method") or run.get("method"), "task": r.task,
               "status": r.status, "steps": run.get("step"),
               "final loss": m[-1]["loss"] if m else None,
               "train time s": m[-1].get("elapsed") if m else None,
               "s/step": (sum(x.get("step_time", 0) for x in m) / len(m)) if m else None,
               "trainable params": run.get("trainable_params"),
               "peak RSS MB": (r.peak_rss or run.get("peak_rss") or 0) / 2**20 or None,
               "adapter MB": r.adapter_bytes / 2**20}
        row.update(eval_rows(r.eval))
        if r.baseline.get("general_loss") is not None and r.eval.get("general_loss") is not None:
            row["general loss rise"] = r.eval["general_loss"] - r.baseline["general_loss"]
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return pl.DataFrame([{c: row.get(c) for c in cols} for row in rows], strict=False)
