"""The method comparison's saved results (bench/compare_methods.py → bench/results/compare_methods*.json) reshaped for
the Results page's "Benchmark results" view. No streamlit here.

A results file is {"meta", "ratios", "means", "sweep", "comparisons", "rows"}; every row is one training run
(method, task, lr, seed, eval_score, general_eval_loss, trainable_params, ... and, in sweep files, the swept setting
such as top_p or lora_r). Methods and extra row keys are not known in advance: everything here reads them generically,
and a missing key yields an empty frame plus a note (older formats, partial runs), never an exception.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import polars as pl

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PATTERN = "compare_methods*.json"
SECTIONS = ("meta", "means", "sweep", "comparisons", "rows")
SWEEP_SECTIONS = ("meta", "points", "rows")
BASELINE = "vanilla"  # the benchmark's name for the untuned model: its rows give the general loss the rise is from
# row keys that are bookkeeping, never a swept setting (settings are found generically, see setting_keys)
_NOT_SETTINGS = {"method", "task", "lr", "seed", "key", "out"}
_MEASURE = re.compile(r"(score|loss|bytes|time|rss|hwm|params|example|wall)s?(_s)?$|_s$")


# --------------------------------------------------------------------------------------------------------- files
def list_files(folder: Path | str = RESULTS_DIR) -> list[Path]:
    """compare_methods*.json in `folder`, newest first; equal times (a fresh checkout) by name, so the untagged main
    file (compare_methods.json, compare_methods_quick.json) comes before its tagged diagnostics."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(folder.glob(PATTERN), key=lambda p: (-int(p.stat().st_mtime), p.name))  # whole seconds: a checkout


def load(path: Path | str) -> tuple[dict | None, str | None]:
    """(results, None), or (None, one-line warning) when the file cannot be read as a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return None, f"{path.name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); skipped"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name}: cannot be read ({type(e).__name__}: {e}); skipped"
    if not isinstance(data, dict):
        return None, f"{path.name}: a JSON {type(data).__name__}, not a compare_methods results object; skipped"
    return data, None


def tag(path: Path | str, data: dict) -> str:
    """The run's --tag: meta['tag'] when the file has it, else the file-name suffix after compare_methods[_<mode>]."""
    meta = _dict(data.get("meta"))
    if meta.get("tag"):
        return str(meta["tag"])
    stem = Path(path).stem.removeprefix("compare_methods")
    mode = meta.get("mode")
    if mode and stem.startswith(f"_{mode}"):
        stem = stem[len(mode) + 1:]
    return stem.strip("_")


def label(path: Path | str, data: dict | None) -> str:
    """'<file> · quick · law, math · 1 seed · 100 steps · tag p50' (what the file picker shows)."""
    name = Path(path).name
    if data is None:
        return f"{name} · unreadable"
    meta = _dict(data.get("meta"))
    parts = [name]
    if meta.get("mode"):
        parts.append(str(meta["mode"]))
    if isinstance(meta.get("tasks"), list):
        parts.append(", ".join(map(str, meta["tasks"])))
    if isinstance(meta.get("seeds"), list):
        n = len(meta["seeds"])
        parts.append(f"{n} seed{'s' if n != 1 else ''}")
    if meta.get("steps") is not None:
        parts.append(f"{meta['steps']} steps")
    t = tag(path, data)
    if t:
        parts.append(f"tag {t}")
    return " · ".join(parts)


def notes(data: dict) -> list[str]:
    """One note per part of the file that is missing or of an unexpected shape (an older or partial results file)."""
    out = []
    kinds = {"meta": dict, "means": dict, "sweep": dict, "comparisons": list, "rows": list, "points": list}
    for k in SWEEP_SECTIONS if is_sweep_file(data) else SECTIONS:
        if k not in data:
            out.append(f"no '{k}' in this file (older format?): {_NEEDS[k]} not shown")
        elif not isinstance(data[k], kinds[k]):
            out.append(f"'{k}' is a {type(data[k]).__name__}, expected a {kinds[k].__name__}: {_NEEDS[k]} not shown")
    rows = _rows(data)
    if rows and not any(r.get("method") == BASELINE for r in rows) and _baseline_loss(data, rows, None) is None:
        out.append(f"no '{BASELINE}' rows: the general-loss rise (trade-off chart) cannot be computed")
    return out


def is_sweep_file(data: dict) -> bool:
    """A `--sweep p|rank` file (meta.knob, points): one method over one knob, no per-method means, lr sweep or
    comparisons to show."""
    return "knob" in _dict(data.get("meta")) or "points" in data


_NEEDS = {"points": "the sweep's points", "meta": "run settings", "means": "the scores with CIs",
          "sweep": "the learning-rate sweep",
          "comparisons": "the paired comparisons", "rows": "the trade-off and trainable-parameter charts"}


def describe(data: dict) -> str:
    """One line of the run's protocol from meta (what a reader needs to weigh the numbers)."""
    m = _dict(data.get("meta"))
    bits = []
    if m.get("model"):
        bits.append(f"model `{Path(str(m['model'])).name}`")
    if m.get("steps") is not None:
        bits.append(f"{m['steps']} steps")
    if m.get("batch_size") is not None and m.get("seq_len") is not None:
        bits.append(f"batch {m['batch_size']} × {m['seq_len']} tokens")
    if m.get("eval_limit") is not None:
        bits.append(f"{m['eval_limit']} eval examples per task")
    if m.get("general_eval_docs") is not None:
        bits.append(f"general loss on {m['general_eval_docs']} held-out documents")
    if isinstance(m.get("seeds"), list):
        bits.append(f"seeds {', '.join(map(str, m['seeds']))}")
    if m.get("fixed_lr"):
        bits.append(f"lr fixed without a sweep (diagnostic): {m['fixed_lr']}")
    if m.get("elapsed_s") is not None:
        bits.append(f"{m['elapsed_s']} s")
    return "; ".join(bits)


# ------------------------------------------------------------------------------------------------ scores with CIs
def methods(data: dict) -> list[str]:
    """Method names in the file's order (meta.methods, then any other in means or rows)."""
    seen = [m for m in _dict(data.get("meta")).get("methods") or [] if isinstance(m, str)]
    seen += [m for m, r in _dict(data.get("means")).items() if not m.startswith("_") and isinstance(r, dict)]
    seen += [r.get("method") for r in _rows(data) if isinstance(r.get("method"), str)]
    return list(dict.fromkeys(seen))


def score_table(data: dict) -> pl.DataFrame:
    """Task score per method with its 95% CI, per task and the mean over tasks (task 'mean'), from `means`:
    columns method, task, score, lo, hi, lr. Methods without a score are left out."""
    rows = []
    for m, r in _dict(data.get("means")).items():
        if m.startswith("_") or not isinstance(r, dict):  # '_pareto' and other non-method entries
            continue
        for t, e in _dict(r.get("per_task")).items():
            if isinstance(e, dict) and _num(e.get("score")) is not None:
                rows.append(_ci_row(m, str(t), e.get("score"), e.get("lo"), e.get("hi"), r.get("lr")))
        if _num(r.get("task_score")) is not None:
            ci = r.get("task_score_ci") if isinstance(r.get("task_score_ci"), list) else [None, None]
            rows.append(_ci_row(m, "mean", r["task_score"], *(ci + [None, None])[:2], r.get("lr")))
    schema = {"method": pl.Utf8, "task": pl.Utf8, "score": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
              "lr": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _ci_row(m, t, s, lo, hi, lr) -> tuple:
    s = _num(s)
    return (m, t, s, _num(lo) if _num(lo) is not None else s, _num(hi) if _num(hi) is not None else s, _num(lr))


def task_order(scores: pl.DataFrame) -> list[str]:
    """The x order of the score chart: the tasks as they come, the mean last."""
    return [t for t in dict.fromkeys(scores["task"].to_list()) if t != "mean"] + (
        ["mean"] if "mean" in scores["task"].to_list() else [])


# ------------------------------------------------------------------------------------ points of the sweep charts
def setting_keys(rows: list[dict]) -> list[str]:
    """Row keys that are swept settings (top_p, lora_r, ...) rather than measurements, found without a list of names:
    a scalar key whose name is not a measurement's (…_score, …_loss, …_bytes, …_time, …params, …) and where every
    value of it within a (method, lr, seed) was run on all of that group's tasks (a measurement such as a new
    accuracy key differs per task). Only keys with more than one value within some method are returned."""
    if not rows:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("method"), _hashable(r.get("lr")), r.get("seed")), []).append(r)
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in _NOT_SETTINGS and not _MEASURE.search(k)))
    out = []
    for k in keys:
        if not all(r.get(k) is None or isinstance(r.get(k), (int, float, str, bool)) for r in rows):
            continue
        ok = True
        for rs in groups.values():
            tasks = {r.get("task") for r in rs}
            by_val: dict = {}
            for r in rs:
                by_val.setdefault(r.get(k), set()).add(r.get("task"))
            if any(ts != tasks for ts in by_val.values()):
                ok = False
                break
        per_method: dict = {}
        for r in rows:
            per_method.setdefault(r.get("method"), set()).add(r.get(k))
        if ok and any(len(v) > 1 for v in per_method.values()):
            out.append(k)
    return out


def points(data: dict, task: str | None = None) -> pl.DataFrame:
    """One point per (method, lr, swept settings) of the first seed, averaged over the tasks (or one `task`): the
    paper's Fig. 5 points. Columns: method, label, task, lr, <settings>, steps, chosen (the method's reported lr),
    task score, general loss, general loss rise (over the untuned model's general loss), trainable params (None when
    the rows lack it), pareto (no other point has a higher score at a lower-or-equal rise). Empty when the rows lack
    eval_score / general_eval_loss or no baseline general loss is known."""
    rows = [r for r in _rows(data) if isinstance(r, dict) and r.get("method") is not None]
    if task is not None:
        rows = [r for r in rows if r.get("task") == task]
    if not rows:
        return pl.DataFrame()
    base = _baseline_loss(data, rows, task)
    settings = setting_keys(rows)
    seeds = [r.get("seed") for r in rows if isinstance(r.get("seed"), (int, float))]
    first = min(seeds) if seeds else None
    tasks_all = {r.get("task") for r in rows}
    chosen = _chosen_lrs(data)
    steps = _dict(data.get("meta")).get("steps")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("method") == BASELINE or (first is not None and r.get("seed") not in (first, None)):
            continue
        if _num(r.get("eval_score")) is None or _num(r.get("general_eval_loss")) is None:
            continue
        key = (r["method"], _hashable(r.get("lr")), *(_hashable(r.get(k)) for k in settings))
        groups.setdefault(key, []).append(r)
    out = []
    for (m, lr, *svals), rs in groups.items():
        if {r.get("task") for r in rs} != tasks_all - {None} and task is None:
            continue  # a point missing a task would not be comparable with the others' mean
        params = [_num(r.get("trainable_params")) for r in rs]
        gl = statistics.mean(_num(r["general_eval_loss"]) for r in rs)
        sett = {k: v for k, v in zip(settings, svals, strict=True)}
        name = " ".join([m, *(f"lr={_fmt(lr)}" for _ in [0] if lr is not None),
                         *(f"{k}={_fmt(v)}" for k, v in sett.items() if v is not None)])
        out.append({"method": m, "label": name, "task": task or "mean over tasks", "lr": _num(lr), **sett,
                    "steps": steps, "chosen": lr is not None and _num(lr) == _num(chosen.get(m)),
                    "task score": statistics.mean(_num(r["eval_score"]) for r in rs), "general loss": gl,
                    "general loss rise": gl - base if base is not None else None,
                    "trainable params": statistics.mean(params) if all(p is not None for p in params) else None})
    if not out:
        return pl.DataFrame()
    df = pl.DataFrame(out, strict=False, infer_schema_length=None)
    return df.with_columns(pareto=pareto(df, "general loss rise"))


def with_rise(pts: pl.DataFrame) -> pl.DataFrame:
    """The points that have a general-loss rise (the trade-off chart's), empty when none has."""
    if pts.height == 0 or "general loss rise" not in pts.columns:
        return pl.DataFrame()
    return pts.filter(pl.col("general loss rise").is_not_null())


def swept(data: dict) -> list[str]:
    """The settings the file's rows sweep besides lr (e.g. top_p, lora_r); see setting_keys."""
    return setting_keys(_rows(data))


def pareto(df: pl.DataFrame, cost: str, value: str = "task score") -> pl.Series:
    """True where no other point has a higher `value` at a lower-or-equal `cost` (ties on both count once): the
    front of the paper's Fig. 5. Points lacking the cost are never on it."""
    c, v = df[cost].to_list(), df[value].to_list()
    flags = []
    for i in range(df.height):
        if c[i] is None or v[i] is None:
            flags.append(False)
            continue
        flags.append(not any(c[j] is not None and v[j] is not None and c[j] <= c[i] and v[j] >= v[i]
                             and (c[j], v[j]) != (c[i], v[i]) for j in range(df.height)))
    return pl.Series(flags, dtype=pl.Boolean)


def params_points(pts: pl.DataFrame) -> pl.DataFrame:
    """The points that have trainable parameters, with `pareto` recomputed over parameters (fewer is cheaper)."""
    if pts.height == 0 or "trainable params" not in pts.columns:
        return pl.DataFrame()
    d = pts.filter(pl.col("trainable params").is_not_null() & (pl.col("trainable params") > 0))
    return d.with_columns(pareto=pareto(d, "trainable params")) if d.height else pl.DataFrame()


def tasks(data: dict) -> list[str]:
    """The tasks of the file (meta.tasks, else the rows')."""
    t = _dict(data.get("meta")).get("tasks")
    if isinstance(t, list) and t:
        return [str(x) for x in t]
    return list(dict.fromkeys(str(r["task"]) for r in _rows(data) if r.get("task") is not None))


# ------------------------------------------------------------------------------------------------------- tables
def lr_sweep(data: dict) -> pl.DataFrame:
    """The learning-rate sweep (seed 0, mean over tasks): method, lr, validation score, validation general loss,
    chosen (the lr the fixed rule picked for the method)."""
    chosen = _chosen_lrs(data)
    rows = []
    for m, tab in _dict(data.get("sweep")).items():
        for lr, v in _dict(tab).items():
            vals = v if isinstance(v, list) else [v]
            lr_f = _num(lr)
            rows.append((m, lr_f, _num(vals[0]) if vals else None, _num(vals[1]) if len(vals) > 1 else None,
                         lr_f is not None and lr_f == _num(chosen.get(m))))
    schema = {"method": pl.Utf8, "lr": pl.Float64, "validation score": pl.Float64,
              "validation general loss": pl.Float64, "chosen": pl.Boolean}
    order = {m: i for i, m in enumerate(dict.fromkeys(r[0] for r in rows))}  # the file's method order, lr rising
    rows.sort(key=lambda r: (order[r[0]], r[1] if r[1] is not None else math.inf))
    return pl.DataFrame(rows, schema=schema, orient="row")


def comparisons(data: dict) -> pl.DataFrame:
    """The paired comparisons: comparison, value, lo, hi, p, significant (p < 0.05; None when undefined)."""
    rows = []
    for c in data.get("comparisons") or [] if isinstance(data.get("comparisons"), list) else []:
        if not isinstance(c, dict):
            continue
        p = _num(c.get("p"))
        v = _num(c.get("value"))
        rows.append((str(c.get("comparison", "?")), v, _num(c.get("lo")), _num(c.get("hi")), p,
                     None if p is None or v is None else p < 0.05))
    schema = {"comparison": pl.Utf8, "value": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "p": pl.Float64,
              "significant": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row")


def user_points(table: pl.DataFrame, task: str) -> pl.DataFrame:
    """The user's runs on `task` (explorer.results.runs_table) as trade-off points beside a benchmark's: method
    'your runs: <method>', with label, task score, general loss rise. Empty when none has both numbers."""
    need = {"label", "method", "task", "task score", "general loss rise"}
    if table.height == 0 or not need <= set(table.columns):
        return pl.DataFrame()
    d = table.filter((pl.col("task") == task) & pl.col("task score").is_not_null()
                     & pl.col("general loss rise").is_not_null())
    keep = [c for c in ("label", "method", "task", "task score", "general loss rise", "lr", "steps",
                        "trainable params") if c in d.columns]
    return d.select(keep).with_columns(method=pl.lit("your runs: ") + pl.col("method"), chosen=pl.lit(False))


def with_user_runs(pts: pl.DataFrame, table: pl.DataFrame, task: str) -> pl.DataFrame:
    """Benchmark points of one task plus the user's runs on it, `pareto` recomputed over all of them."""
    mine = user_points(table, task)
    if mine.height == 0:
        return pts
    both = pl.concat([pts.drop("pareto", strict=False), mine], how="diagonal_relaxed") if pts.height else mine
    return both.with_columns(pareto=pareto(both, "general loss rise"))


# ------------------------------------------------------------------------------------------------------ helpers
def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _rows(data: dict) -> list[dict]:
    rows = data.get("rows")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _num(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _chosen_lrs(data: dict) -> dict:
    """{method: lr} the benchmark reported: means[m].lr, else ratios.chosen_lr."""
    out = {m: lr for m, lr in _dict(_dict(data.get("ratios")).get("chosen_lr")).items()}
    for m, r in _dict(data.get("means")).items():
        if isinstance(r, dict) and r.get("lr") is not None:
            out[m] = r["lr"]
    return out


def _baseline_loss(data: dict, rows: list[dict], task: str | None) -> float | None:
    """The untuned model's general eval loss: mean over its rows (of `task`), else means[vanilla].general_loss."""
    vals = [_num(r.get("general_eval_loss")) for r in rows
            if r.get("method") == BASELINE and (task is None or r.get("task") == task)]
    vals = [v for v in vals if v is not None]
    if vals:
        return statistics.mean(vals)
    return _num(_dict(_dict(data.get("means")).get(BASELINE)).get("general_loss"))
