"""Training-side reshaping for the Select & Train and Results pages: model parameter counts (from config.json and the
safetensors headers, no weights loaded) and tables of runs (esft_core.workspace.runs.RunInfo) and of their
evaluations against
the untuned model. No streamlit here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import polars as pl

from esft_core.files import read_json


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
    from esft_core.models.paths import resolve_model_path  # torch-free: this runs on the first page visit

    try:
        path = Path(resolve_model_path(model))
    except Exception:  # noqa: BLE001 - a bad path just means "unknown"
        return {"total": None, "per_expert": None, "num_experts": None}
    cfg = read_json(path / "config.json")
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


def _mean_experts(r) -> float | None:
    ec = r.expert_config
    if ec is None or not ec.experts:
        return None
    return round(sum(len(v) for v in ec.experts.values()) / len(ec.experts), 2)


def runs_table(runs: list) -> pl.DataFrame:
    """Side-by-side table of training runs (esft_core.workspace.runs.RunInfo), the columns that decide between runs
    first:
    label, method, task, task score / loss, general loss and its rise over the untuned model, then the
    hyperparameters (lr, steps, p, metric, contrast, experts per layer) and the costs (time, memory, adapter size).
    `run` (the directory name) stays as the key."""
    rows = []
    for r in runs:
        run, m, sel = r.run, r.metrics, r.selection
        ev = eval_rows(r.eval)
        row = {"label": r.label, "method": r.method_label, "task": r.task, "status": r.status,
               "task score": ev.get(f"{r.task} score"), "task loss": ev.get(f"{r.task} loss"),
               "general loss": ev.get("general loss"), "general loss rise": None,
               "lr": r.config.get("lr"), "steps": run.get("step") or r.config.get("steps"),
               "p": sel.get("p"), "metric": sel.get("metric"),
               "contrast": ", ".join(sel.get("contrast") or []) or None,
               "experts/layer": _mean_experts(r), "tags": ", ".join(r.notes.get("tags") or []) or None,
               "final loss": m[-1]["loss"] if m else None,
               "train time s": m[-1].get("elapsed") if m else None,
               "s/step": (sum(x.get("step_time", 0) for x in m) / len(m)) if m else None,
               "trainable params": run.get("trainable_params"),
               "peak RSS MB": (r.peak_rss or run.get("peak_rss") or 0) / 2**20 or None,
               "adapter MB": r.adapter_bytes / 2**20, "run": r.name}
        if r.baseline.get("general_loss") is not None and r.eval.get("general_loss") is not None:
            row["general loss rise"] = r.eval["general_loss"] - r.baseline["general_loss"]
        extra = r.extra_evals
        if extra:  # the largest standalone evaluation ("Evaluate on more examples")
            n, xe = max(extra), eval_rows(extra[max(extra)])
            row.update({"more-examples n": n, "more-examples task score": xe.get(f"{r.task} score"),
                        "more-examples task loss": xe.get(f"{r.task} loss"),
                        "more-examples general loss": xe.get("general loss")})
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return pl.DataFrame([{c: row.get(c) for c in cols} for row in rows], strict=False, infer_schema_length=None)


def baselines_table(runs: list) -> pl.DataFrame:
    """The untuned model's evaluations the runs compare against, once per distinct baseline (not once per run)."""
    seen, rows = set(), []
    for r in runs:
        key = r.launch.get("baseline")
        if not r.baseline or key in seen:
            continue
        seen.add(key)
        rows.append({"eval files": ", ".join(Path(f).parent.name if Path(f).name in ("eval.jsonl", "heldout.jsonl")
                                               else Path(f).name for f in r.config.get("eval_data") or []),
                     **{k: v for k, v in eval_rows(r.baseline).items() if v is not None}})
    return pl.DataFrame(rows, strict=False) if rows else pl.DataFrame()


def tradeoff(table: pl.DataFrame) -> pl.DataFrame:
    """One point per run with both a task score and a general-loss rise (the paper's trade-off: specialise without
    forgetting), and `pareto`: no other run has a higher score at a lower-or-equal rise."""
    need = {"task score", "general loss rise"}
    if table.height == 0 or not need <= set(table.columns):
        return pl.DataFrame()
    d = table.filter(pl.col("task score").is_not_null() & pl.col("general loss rise").is_not_null())
    if d.height == 0:
        return pl.DataFrame()
    d = d.sort(["general loss rise", "task score"], descending=[False, True])
    best, front = float("-inf"), []
    for s in d["task score"].to_list():  # sweep by rising cost: a point is on the front when it beats every cheaper one
        front.append(s > best)
        best = max(best, s)
    return d.with_columns(pareto=pl.Series(front))


def smooth(curves: pl.DataFrame, alpha: float) -> pl.DataFrame:
    """TensorBoard-style exponential moving average of `loss` per run (alpha = smoothing weight in [0, 1))."""
    if alpha <= 0 or curves.height == 0:
        return curves
    return curves.sort(["run", "step"]).with_columns(
        loss=pl.col("loss").ewm_mean(alpha=1 - alpha, adjust=True).over("run"))
