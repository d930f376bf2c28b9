"""Read-side queries of the explorer: DuckDB SQL on the trace store (schema in docs/CONTRACTS.md) → Polars frames.

No streamlit here; pages call these through explorer/state.py, which caches results per DB version.

Concurrency: recording/import jobs write the same DuckDB file from another process. DuckDB lets one process hold a
read-write lock or many hold read-only locks, so the explorer (1) opens a read-only connection per query batch and
closes it at once (`reading`), never keeping the file locked while a page is idle, and (2) retries for a few seconds
when a writer holds the lock — writers keep it only for short commits. The pages never see a lock error unless a
writer holds the file for longer than `LOCK_WAIT_S`.

Scores follow DESIGN.md: gate score g = Σ gate / tokens (normalize='token') or 1/N_s Σ_j 1/L_j Σ_k gate
(normalize='sample'); token score r = the same with 1(selected)/K. They are computed from the `expert_stats`
pre-aggregation, so every page query touches thousands of rows, not the 80 M route rows of a full trace.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

LOCK_WAIT_S = 8.0
READ_CONFIG = {"enable_external_access": False}  # every read connection: no files/URLs outside the DB
METRICS = ("gate", "token")
NORMALIZE = ("token", "sample")


class DbBusy(RuntimeError):
    """A writer held the DB lock for longer than we are willing to wait."""


# ----------------------------------------------------------------------------------------------------------- access
def db_version(db: str | Path) -> tuple:
    """A cheap fingerprint that changes whenever a writer commits (DB file or its WAL changed)."""
    out = []
    for p in (Path(db), Path(str(db) + ".wal")):
        try:
            st = p.stat()
            out += [st.st_mtime_ns, st.st_size]
        except FileNotFoundError:
            out += [0, 0]
    return tuple(out)


def connect_ro(db: str | Path, wait_s: float = LOCK_WAIT_S) -> duckdb.DuckDBPyConnection:
    """A read-only connection, retrying while another process holds the write lock."""
    if not Path(db).exists():
        raise FileNotFoundError(f"trace database {db} does not exist yet")
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(db), read_only=True, config=dict(READ_CONFIG))
        except duckdb.IOException as e:
            msg = str(e).lower()
            if "lock" not in msg and "resource temporarily unavailable" not in msg:
                raise
            if time.monotonic() > deadline:
                raise DbBusy(f"{db} is locked by a writer for more than {wait_s:.0f} s; try again shortly") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.6, 0.25)


@contextlib.contextmanager
def reading(db: str | Path, wait_s: float = LOCK_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """`with reading(db) as con:` — a short-lived read-only connection, closed on exit so writers can proceed."""
    con = connect_ro(db, wait_s)
    try:
        yield con
    finally:
        con.close()


def _pl(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pl.DataFrame:
    return pl.from_arrow(_q(con, sql, params).to_arrow_table())


def _q(con: duckdb.DuckDBPyConnection, sql: str, params: list | dict | None = None):
    """A relation over `sql` (read statements run lazily; others run now). DuckDB 2 wants relations, not
    execute(), when results are not fully fetched."""
    return con.sql(sql, params=params or None)


def has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(_q(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0])


# ------------------------------------------------------------------------------------------------------------- runs
def list_runs(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """All runs, newest first (empty frame with the right columns when the DB has no runs table yet)."""
    if not has_table(con, "runs"):
        return pl.DataFrame(schema={"run_id": pl.Int32, "task": pl.Utf8, "model": pl.Utf8, "source": pl.Utf8,
                                    "status": pl.Utf8, "num_experts": pl.Int32, "top_k": pl.Int32,
                                    "n_layers": pl.Int32, "n_samples": pl.Int32, "n_tokens": pl.Int64,
                                    "created_at": pl.Datetime, "finished_at": pl.Datetime})
    return _pl(con, """SELECT run_id, task, model, source, status, num_experts, top_k, len(layers)::INTEGER n_layers,
                              n_samples, n_tokens, created_at, finished_at
                       FROM runs ORDER BY run_id DESC""")


def complete_runs(con: duckdb.DuckDBPyConnection, model: str | None = None) -> pl.DataFrame:
    runs = list_runs(con).filter(pl.col("status") == "complete")
    return runs.filter(pl.col("model") == model) if model is not None else runs


def models(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Models with at least one complete run, the most recently recorded first."""
    runs = complete_runs(con)
    return runs.group_by("model").agg(pl.col("run_id").max()).sort("run_id", descending=True)["model"].to_list()


def tasks(con: duckdb.DuckDBPyConnection, model: str) -> list[str]:
    return sorted(set(complete_runs(con, model)["task"].to_list()))


def model_layout(con: duckdb.DuckDBPyConnection, model: str) -> dict:
    """Layers, experts and K of a model as recorded in its latest complete run."""
    if not has_table(con, "runs"):
        return {"layers": [], "num_experts": 0, "top_k": 0}
    row = _q(con,
        """SELECT layers, num_experts, top_k FROM runs WHERE status = 'complete' AND model = ?
           ORDER BY run_id DESC LIMIT 1""", [model]).fetchall()
    row = row[0] if row else None
    if row is None:
        return {"layers": [], "num_experts": 0, "top_k": 0}
    return {"layers": list(row[0] or []), "num_experts": int(row[1]), "top_k": int(row[2])}


def latest_run(con: duckdb.DuckDBPyConnection, model: str, task: str) -> int | None:
    if not has_table(con, "runs"):
        return None
    row = _q(con, "SELECT max(run_id) FROM runs WHERE status = 'complete' AND model = ? AND task = ?",
                      [model, task]).fetchall()[0]
    return None if row is None or row[0] is None else int(row[0])


def db_summary(con: duckdb.DuckDBPyConnection) -> dict:
    """Row counts of the contract tables that exist."""
    out = {}
    for t in ("runs", "samples", "tokens", "routes", "expert_stats", "expert_tokens"):
        if has_table(con, t):
            row = _q(con, f"SELECT estimated_size FROM duckdb_tables() WHERE table_name = '{t}'").fetchall()[0]
            out[t] = int(row[0] or 0)
    return out


# ----------------------------------------------------------------------------------------------------------- scores
_SCORE_EXPR = {
    ("gate", "token"): "sum(s.gate_sum) / any_value(tot.nt)",
    ("token", "token"): "sum(s.n_selected) / (any_value(tot.nt) * any_value(tot.k))",
    ("gate", "sample"): "sum(s.sample_gate_sum) / any_value(tot.ns)",
    ("token", "sample"): "sum(s.sample_token_sum) / (any_value(tot.ns) * any_value(tot.k))",
}


def _check(metric: str, normalize: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalisation '{normalize}'; choose one of {', '.join(NORMALIZE)}")


def expert_scores(con: duckdb.DuckDBPyConnection, model: str, tasks_: list[str] | None = None,
                  metric: str = "gate", normalize: str = "token") -> pl.DataFrame:
    """Score of every (task, layer, expert) — zero-filled over the model's full layer × expert grid.

    All complete runs of a task on `model` are pooled (sums over their tokens or samples).
    Columns: task, layer, expert, score.
    """
    _check(metric, normalize)
    lay = model_layout(con, model)
    if not lay["layers"]:
        return pl.DataFrame(schema={"task": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32, "score": pl.Float64})
    task_filter = ""
    params: list = [model]
    if tasks_ is not None:
        if not tasks_:
            return pl.DataFrame(schema={"task": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32,
                                        "score": pl.Float64})
        task_filter = "AND task IN (" + ",".join("?" * len(tasks_)) + ")"
        params += list(tasks_)
    sql = f"""
    WITH r AS (SELECT run_id, task, n_tokens, n_samples, top_k FROM runs
               WHERE status = 'complete' AND model = ? {task_filter}),
         tot AS (SELECT task, sum(n_tokens) nt, sum(n_samples) ns, max(top_k) k FROM r GROUP BY task),
         sc AS (SELECT r.task, s.layer::INTEGER layer, s.expert::INTEGER expert,
                       {_SCORE_EXPR[(metric, normalize)]} score
                FROM expert_stats s JOIN r USING (run_id) JOIN tot USING (task)
                GROUP BY r.task, s.layer, s.expert),
         grid AS (SELECT t.task, l.layer::INTEGER layer, e.expert::INTEGER expert
                  FROM (SELECT DISTINCT task FROM r) t,
                       (SELECT unnest(?::INTEGER[]) layer) l, range(?) e(expert))
    SELECT g.task, g.layer, g.expert, coalesce(sc.score, 0.0)::DOUBLE score
    FROM grid g LEFT JOIN sc USING (task, layer, expert)
    ORDER BY g.task, g.layer, g.expert"""
    return _pl(con, sql, params + [lay["layers"], lay["num_experts"]])


def select_top_p(scores: pl.DataFrame, p: float, round_digits: int | None = 4) -> pl.DataFrame:
    """Per (task, layer): sort by score (desc, ties by expert id) and keep experts while the running sum < p.

    The authors' stop rule (scripts/generate_expert_config.py), as `esft select` applies it: scores rounded to 4
    decimals first (what reproduces their shipped configs), an expert is added while the sum of the experts before
    it is below p, and experts with a zero score are never added. Input columns task, layer, expert, score; output
    adds rank (1-based), cum, selected.
    """
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    s = pl.col("score").round(round_digits) if round_digits is not None else pl.col("score")
    return (
        scores.with_columns(_s=s)
        .sort(["task", "layer", "_s", "expert"], descending=[False, False, True, False])
        .with_columns(
            rank=pl.int_range(1, pl.len() + 1).over(["task", "layer"]),
            cum=pl.col("_s").cum_sum().over(["task", "layer"]),
        )
        .with_columns(selected=((pl.col("cum") - pl.col("_s")) < p) & (pl.col("_s") > 0))
        .drop("_s")
    )


def selection_dict(selected: pl.DataFrame, task: str) -> dict[int, list[int]]:
    """{layer: [experts]} of one task from select_top_p output (every layer present, possibly empty)."""
    out: dict[int, list[int]] = {}
    df = selected.filter(pl.col("task") == task)
    for layer in sorted(set(df["layer"].to_list())):
        out[int(layer)] = sorted(int(e) for e in df.filter((pl.col("layer") == layer) & pl.col("selected"))["expert"])
    return out


def concentration(scores: pl.DataFrame) -> pl.DataFrame:
    """Cumulative score of the top-n experts per (task, layer): columns task, layer, n, cum."""
    return (
        scores.sort(["task", "layer", "score", "expert"], descending=[False, False, True, False])
        .with_columns(n=pl.int_range(1, pl.len() + 1).over(["task", "layer"]),
                      cum=pl.col("score").cum_sum().over(["task", "layer"]))
        .select("task", "layer", "n", "cum")
    )


def concentration_spread(conc: pl.DataFrame) -> pl.DataFrame:
    """Across layers, per (task, n): mean, min, max, 25th and 75th percentile of the cumulative score."""
    return (
        conc.group_by(["task", "n"])
        .agg(mean=pl.col("cum").mean(), lo=pl.col("cum").min(), hi=pl.col("cum").max(),
             q25=pl.col("cum").quantile(0.25), q75=pl.col("cum").quantile(0.75))
        .sort(["task", "n"])
    )


def experts_needed(scores: pl.DataFrame, p: float) -> pl.DataFrame:
    """Number of experts the top-p rule selects per (task, layer): columns task, layer, n_experts."""
    sel = select_top_p(scores, p)
    return sel.group_by(["task", "layer"]).agg(n_experts=pl.col("selected").sum().cast(pl.Int32)).sort(
        ["task", "layer"])


# ---------------------------------------------------------------------------------------------------------- overlap
def _pairs(tasks_: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"task_a": [a for a in tasks_ for _ in tasks_], "task_b": [b for _ in tasks_ for b in tasks_]})


def shared_topk(scores: pl.DataFrame, k: int) -> pl.DataFrame:
    """Paper Fig. 3: per task pair, the number of shared top-k experts, averaged over layers."""
    top = (scores.sort(["task", "layer", "score", "expert"], descending=[False, False, True, False])
           .group_by(["task", "layer"], maintain_order=True).head(k).select("task", "layer", "expert"))
    n_layers = scores["layer"].n_unique()
    tasks_ = sorted(set(scores["task"].to_list()))
    joined = top.join(top, on=["layer", "expert"], suffix="_b").rename({"task": "task_a"})
    counts = joined.group_by(["task_a", "task_b"]).agg(shared=(pl.len() / max(n_layers, 1)).cast(pl.Float64))
    return (_pairs(tasks_).join(counts, on=["task_a", "task_b"], how="left")
            .with_columns(pl.col("shared").fill_null(0.0)))


def jaccard_by_layer(selected: pl.DataFrame) -> pl.DataFrame:
    """Jaccard similarity of the top-p selected sets per layer and task pair (a < b): layer, task_a, task_b, jaccard."""
    s = selected.filter(pl.col("selected")).select("task", "layer", "expert")
    sizes = s.group_by(["task", "layer"]).agg(size=pl.len())
    inter = (s.join(s, on=["layer", "expert"], suffix="_b").rename({"task": "task_a"})
             .filter(pl.col("task_a") < pl.col("task_b"))
             .group_by(["task_a", "task_b", "layer"]).agg(inter=pl.len()))
    tasks_ = sorted(set(selected["task"].to_list()))
    layers = sorted(set(selected["layer"].to_list()))
    grid = pl.DataFrame([(a, b, layer) for i, a in enumerate(tasks_) for b in tasks_[i + 1:] for layer in layers],
                        schema={"task_a": pl.Utf8, "task_b": pl.Utf8, "layer": pl.Int32}, orient="row")
    sizes = sizes.with_columns(pl.col("layer").cast(pl.Int32))
    inter = inter.with_columns(pl.col("layer").cast(pl.Int32))
    out = (grid.join(inter, on=["task_a", "task_b", "layer"], how="left")
           .join(sizes.rename({"task": "task_a", "size": "size_a"}), on=["task_a", "layer"], how="left")
           .join(sizes.rename({"task": "task_b", "size": "size_b"}), on=["task_b", "layer"], how="left")
           .with_columns(pl.col("inter", "size_a", "size_b").fill_null(0))
           .with_columns(jaccard=pl.when(pl.col("size_a") + pl.col("size_b") - pl.col("inter") > 0)
                         .then(pl.col("inter") / (pl.col("size_a") + pl.col("size_b") - pl.col("inter")))
                         .otherwise(0.0)))
    return out.select("layer", "task_a", "task_b", "jaccard").sort(["task_a", "task_b", "layer"])


def weighted_overlap(scores: pl.DataFrame) -> pl.DataFrame:
    """Gate-weighted overlap: per layer Σ_e min(ŝ_a,e, ŝ_b,e) with ŝ the score normalised to sum 1 in the layer
    (1 = identical routing distributions, 0 = disjoint), averaged over layers. Columns task_a, task_b, overlap."""
    norm = scores.with_columns(
        s=pl.col("score") / pl.col("score").sum().over(["task", "layer"]).clip(lower_bound=1e-30))
    j = (norm.select("task", "layer", "expert", "s")
         .join(norm.select("task", "layer", "expert", "s"), on=["layer", "expert"], suffix="_b")
         .rename({"task": "task_a"}))
    per_layer = j.group_by(["task_a", "task_b", "layer"]).agg(ov=pl.min_horizontal("s", "s_b").sum())
    return per_layer.group_by(["task_a", "task_b"]).agg(overlap=pl.col("ov").mean()).sort(["task_a", "task_b"])


# ----------------------------------------------------------------------------------------------------------- tokens
def list_samples(con: duckdb.DuckDBPyConnection, run_id: int, limit: int = 300) -> pl.DataFrame:
    return _pl(con, """SELECT sample_id, n_tokens, left(replace(text, chr(10), ' '), 100) preview FROM samples
                       WHERE run_id = ? ORDER BY sample_id LIMIT ?""", [run_id, limit])


def sample_routes(con: duckdb.DuckDBPyConnection, run_id: int, sample_id: int, layer: int,
                  max_tokens: int = 1024) -> pl.DataFrame:
    """Tokens of a sample with their K (expert, weight) pairs at `layer`, rank order.

    Columns position, token_text, experts (list), weights (list), top_expert.
    """
    return _pl(con, """
        WITH t AS (SELECT position, token_id, token_text FROM tokens
                   WHERE run_id = ? AND sample_id = ? AND position < ?),
             r AS (SELECT position, list(expert::INTEGER ORDER BY rank) experts, list(weight ORDER BY rank) weights
                   FROM routes WHERE run_id = ? AND sample_id = ? AND layer = ? AND position < ?
                   GROUP BY position)
        SELECT t.position, t.token_id, t.token_text, r.experts, r.weights, r.experts[1] top_expert
        FROM t LEFT JOIN r USING (position) ORDER BY t.position""",
               [run_id, sample_id, max_tokens, run_id, sample_id, layer, max_tokens])


def sample_token_ids(con: duckdb.DuckDBPyConnection, run_id: int, sample_id: int, limit: int = 1 << 30) -> list[int]:
    """The recorded token ids of a sample, in order (the exact model input the routes came from)."""
    rows = _q(con, """SELECT token_id FROM tokens WHERE run_id = ? AND sample_id = ? AND position < ?
                      ORDER BY position""", [run_id, sample_id, limit]).fetchall()
    return [int(r[0]) for r in rows]


def top_tokens(con: duckdb.DuckDBPyConnection, run_ids: list[int], layer: int, expert: int,
               n: int = 15) -> pl.DataFrame:
    """Most frequent tokens routed to (layer, expert) per run, with the share of that token's occurrences in the
    run that this expert received at this layer (1.0 = every occurrence of the token uses it; a token picks an
    expert at most once per layer). Columns run_id, token_text, n, mean_gate, share."""
    if not run_ids:
        return pl.DataFrame(schema={"run_id": pl.Int32, "token_text": pl.Utf8, "n": pl.Int64,
                                    "mean_gate": pl.Float64, "share": pl.Float64})
    ids = ",".join(str(int(r)) for r in run_ids)
    top = _pl(con, f"""
        SELECT run_id, token_id, token_text, n, gate_sum / n AS mean_gate FROM (
          SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY n DESC, token_id) rk FROM expert_tokens
          WHERE run_id IN ({ids}) AND layer = ? AND expert = ?) WHERE rk <= ?""", [layer, expert, n])
    if top.height == 0:
        return top.select("run_id", "token_text", "n", "mean_gate").with_columns(share=pl.lit(0.0))
    tok_ids = ",".join(str(int(t)) for t in set(top["token_id"].to_list()))
    occ = _pl(con, f"""SELECT run_id, token_id, count(*) AS occ FROM tokens
                       WHERE run_id IN ({ids}) AND token_id IN ({tok_ids}) GROUP BY ALL""")
    return (top.join(occ, on=["run_id", "token_id"], how="left")
            .with_columns(share=pl.col("n") / pl.col("occ").clip(lower_bound=1))
            .sort(["run_id", "n", "token_id"], descending=[False, True, False])
            .select("run_id", "token_text", "n", "mean_gate", "share"))


def expert_contexts(con: duckdb.DuckDBPyConnection, run_id: int, layer: int, expert: int, n: int = 6,
                    window: int = 8, scan_tokens: int = 8192) -> pl.DataFrame:
    """Example contexts where (layer, expert) fired with the highest gate weight, looking only at the first
    `scan_tokens` tokens of the run (sample-ordered storage lets DuckDB skip the rest). Columns sample_id, position,
    weight, left, token, right."""
    cap = _q(con, """SELECT coalesce(max(sample_id), 0) FROM (SELECT sample_id,
                           sum(n_tokens) OVER (ORDER BY sample_id) c FROM samples WHERE run_id = ?) WHERE c <= ?""",
                      [run_id, scan_tokens]).fetchall()[0][0]
    return _pl(con, """
        WITH hits AS (SELECT sample_id, position, weight FROM routes
                      WHERE run_id = ? AND sample_id <= ? AND layer = ? AND expert = ?
                      ORDER BY weight DESC, sample_id, position LIMIT ?),
             ctx AS (SELECT h.sample_id, h.position, h.weight, t.position tp, t.token_text
                     FROM hits h JOIN tokens t ON t.run_id = ? AND t.sample_id = h.sample_id
                          AND t.position BETWEEN h.position - ? AND h.position + ?
                     WHERE t.run_id = ? AND t.sample_id <= ?)
        SELECT sample_id, position, any_value(weight) weight,
               coalesce(string_agg(token_text, '' ORDER BY tp) FILTER (WHERE tp < position), '') "left",
               coalesce(string_agg(token_text, '' ORDER BY tp) FILTER (WHERE tp = position), '') token,
               coalesce(string_agg(token_text, '' ORDER BY tp) FILTER (WHERE tp > position), '') "right"
        FROM ctx GROUP BY sample_id, position ORDER BY weight DESC, sample_id, position""",
               [run_id, cap, layer, expert, n, run_id, window, window, run_id, cap])


def expert_load(con: duckdb.DuckDBPyConnection, run_ids: list[int]) -> pl.DataFrame:
    """Share of routed slots per (run, layer, expert): n_selected / Σ n_selected of the layer."""
    if not run_ids:
        return pl.DataFrame(schema={"run_id": pl.Int32, "layer": pl.Int32, "expert": pl.Int32, "load": pl.Float64})
    ids = ",".join(str(int(r)) for r in run_ids)
    return _pl(con, f"""SELECT run_id, layer::INTEGER layer, expert::INTEGER expert,
                              n_selected / sum(n_selected) OVER (PARTITION BY run_id, layer) AS load
                       FROM expert_stats WHERE run_id IN ({ids}) ORDER BY run_id, layer, expert""")


# ------------------------------------------------------------------------------------- contrast and stability views
def contrast_scores(scores: pl.DataFrame, task: str, against: list[str], weights: dict[str, float] | None = None,
                    lam: float = 1.0) -> pl.DataFrame:
    """Task-specific score, as esft_core.select.contrast: c_e = max(0, s_task,e − λ·s'_e) renormalised per layer to
    sum to 1, where s' pools the contrast tasks' scores weighted by `weights` (their tokens for token
    normalisation, samples for sample normalisation; equal weights when not given). Experts every input uses get
    c ≈ 0; experts only this task uses keep a large share. Columns task, layer, expert, score, raw, contrast_mean."""
    t = scores.filter(pl.col("task") == task).select("layer", "expert", "score")
    if against:
        w = pl.DataFrame({"task": list(against), "w": [float((weights or {}).get(a, 1.0)) for a in against]})
        c = (scores.filter(pl.col("task").is_in(against)).join(w, on="task")
             .group_by(["layer", "expert"])
             .agg(contrast_mean=(pl.col("score") * pl.col("w")).sum() / pl.col("w").sum()))
        t = t.join(c, on=["layer", "expert"], how="left").with_columns(pl.col("contrast_mean").fill_null(0.0))
    else:
        t = t.with_columns(contrast_mean=pl.lit(0.0))
    t = t.with_columns(c=(pl.col("score") - lam * pl.col("contrast_mean")).clip(lower_bound=0.0))
    t = t.with_columns(tot=pl.col("c").sum().over("layer"))
    return t.select(pl.lit(task).alias("task"), "layer", "expert",
                    pl.when(pl.col("tot") > 0).then(pl.col("c") / pl.col("tot")).otherwise(0.0).alias("score"),
                    pl.col("score").alias("raw"), "contrast_mean").sort(["layer", "expert"])


def task_weights(con: duckdb.DuckDBPyConnection, model: str, normalize: str = "token") -> dict[str, float]:
    """Tokens (normalize='token') or samples per task over its complete runs: the pooling weights of contrast."""
    if not has_table(con, "runs"):
        return {}
    col = "n_tokens" if normalize == "token" else "n_samples"
    rows = _q(con, f"SELECT task, sum({col}) FROM runs WHERE status = 'complete' AND model = ? GROUP BY task",
              [model]).fetchall()
    return {t: float(n or 0) for t, n in rows}


def ensure_aggregates(con: duckdb.DuckDBPyConnection) -> int:
    """Extra pre-aggregation for the stability view (needs a read-write connection): per-sample expert counts
    `sample_expert_stats(run_id, sample_id, layer, expert, n_selected, gate_sum)` for every complete run that lacks
    them. Cheap (one GROUP BY over a run's routes) and ~64× smaller than routes. Returns the number of runs added."""
    _q(con, """CREATE TABLE IF NOT EXISTS sample_expert_stats(run_id INTEGER, sample_id INTEGER, layer SMALLINT,
                   expert SMALLINT, n_selected INTEGER, gate_sum DOUBLE)""")
    todo = [r[0] for r in _q(con,
        """SELECT run_id FROM runs WHERE status = 'complete'
           AND run_id NOT IN (SELECT DISTINCT run_id FROM sample_expert_stats)""").fetchall()]
    for run in todo:
        _q(con, """INSERT INTO sample_expert_stats SELECT run_id, sample_id, layer, expert, count(*), sum(weight)
                       FROM routes WHERE run_id = ? GROUP BY ALL""", [run])
    return len(todo)


def sample_expert_matrix(con: duckdb.DuckDBPyConnection, run_id: int, metric: str = "gate") -> dict:
    """Per-sample sums as a dense array (samples, layers, experts) plus tokens per sample, for bootstrap views.

    Reads `sample_expert_stats` when present, else aggregates the run's routes on the fly (fine for demo-sized runs).
    """
    lay = _q(con, "SELECT layers, num_experts, top_k FROM runs WHERE run_id = ?", [run_id]).fetchall()
    lay = lay[0] if lay else None
    if lay is None:
        raise ValueError(f"no run {run_id}")
    layers, n_exp, k = list(lay[0]), int(lay[1]), int(lay[2])
    col = "gate_sum" if metric == "gate" else "n_selected"
    if has_table(con, "sample_expert_stats") and _q(con,
            "SELECT count(*) > 0 FROM sample_expert_stats WHERE run_id = ?", [run_id]).fetchall()[0][0]:
        src = f"SELECT sample_id, layer, expert, {col} v FROM sample_expert_stats WHERE run_id = ?"
    else:
        agg = "sum(weight)" if metric == "gate" else "count(*)"
        src = f"SELECT sample_id, layer, expert, {agg} v FROM routes WHERE run_id = ? GROUP BY ALL"
    samples = _q(con, "SELECT sample_id, n_tokens FROM samples WHERE run_id = ? ORDER BY sample_id",
                 [run_id]).fetchnumpy()
    n_s, n_l = len(samples["sample_id"]), len(layers)
    t = _q(con, src, [run_id]).to_arrow_table()  # (sample, layer, expert, value) rows; Arrow → NumPy is zero-copy
    sid, lay_arr = samples["sample_id"].astype(np.int64), np.asarray(layers, dtype=np.int64)
    s_in, l_in = (t.column(c).to_numpy().astype(np.int64) for c in ("sample_id", "layer"))
    e_in, v = t.column("expert").to_numpy().astype(np.int64), t.column("v").to_numpy().astype(np.float64)
    si = np.searchsorted(sid, s_in).clip(0, max(n_s - 1, 0))
    order = np.argsort(lay_arr)
    li = order[np.searchsorted(lay_arr[order], l_in).clip(0, max(n_l - 1, 0))]
    ok = (sid[si] == s_in) & (lay_arr[li] == l_in) if n_s and n_l else np.zeros(len(s_in), dtype=bool)
    # one bincount over the dense (sample, layer, expert) index: no Python loop, no np.add.at
    m = np.bincount(((si * n_l + li) * n_exp + e_in)[ok], weights=v[ok], minlength=n_s * n_l * n_exp)
    m = m[: n_s * n_l * n_exp].reshape(n_s, n_l, n_exp)
    if metric == "token":
        m /= k
    return {"m": m, "n_tokens": samples["n_tokens"].astype(np.float64), "layers": layers, "num_experts": n_exp}


def _top_p_mask(scores: np.ndarray, p: float) -> np.ndarray:
    """Boolean mask (…, E) of the top-p selection along the last axis (authors' stop rule)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    sorted_s = np.take_along_axis(scores, order, axis=-1)
    before = np.cumsum(sorted_s, axis=-1) - sorted_s
    keep_sorted = (before < p) & (sorted_s > 0)
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


def _normalised(m: np.ndarray, n_tokens: np.ndarray, weights: np.ndarray, normalize: str) -> np.ndarray:
    # m: (samples, layers, experts); weights: (B, samples) resampling counts → (B, layers, experts)
    if normalize == "sample":
        per = m / n_tokens[:, None, None]
        return np.einsum("bs,sle->ble", weights, per) / weights.sum(1)[:, None, None]
    return np.einsum("bs,sle->ble", weights, m) / (weights @ n_tokens)[:, None, None]


def stability(mat: dict, p: float, normalize: str = "token", n_boot: int = 50, seed: int = 0,
              checkpoints: int = 16) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Bootstrap over samples: probability that each (layer, expert) is selected at top-p; and, adding samples in
    order, the mean Jaccard between the selection so far and the final one vs tokens seen (where it flattens, more
    data stops changing the selection). Returns (prob: layer, expert, prob, selected), (curve: tokens, jaccard)."""
    m, nt, layers = mat["m"], mat["n_tokens"], mat["layers"]
    n_s = m.shape[0]
    if n_s == 0:
        empty = {"layer": pl.Int32, "expert": pl.Int32, "prob": pl.Float64, "selected": pl.Boolean}
        return (pl.DataFrame(schema=empty),
                pl.DataFrame(schema={"tokens": pl.Int64, "jaccard": pl.Float64}))
    rng = np.random.default_rng(seed)
    w = np.stack([np.bincount(rng.integers(0, n_s, n_s), minlength=n_s) for _ in range(n_boot)]).astype(np.float64)
    prob = _top_p_mask(_normalised(m, nt, w, normalize), p).mean(0)  # (layers, experts)
    final = _top_p_mask(_normalised(m, nt, np.ones((1, n_s)), normalize), p)[0]
    cuts = sorted(set(np.unique(np.linspace(1, n_s, min(checkpoints, n_s)).astype(int)).tolist()))
    pref = np.zeros((len(cuts), n_s))
    for i, c in enumerate(cuts):
        pref[i, :c] = 1.0
    sel = _top_p_mask(_normalised(m, nt, pref, normalize), p)  # (cuts, layers, experts)
    inter = (sel & final[None]).sum(-1)
    union = (sel | final[None]).sum(-1)
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean(-1)
    tokens_seen = np.cumsum(nt)[np.array(cuts) - 1]
    n_e = m.shape[2]
    prob_df = pl.DataFrame({
        "layer": np.repeat(np.array(layers, dtype=np.int32), n_e),
        "expert": np.tile(np.arange(n_e, dtype=np.int32), len(layers)),
        "prob": prob.reshape(-1),
        "selected": final.reshape(-1),
    })
    return prob_df, pl.DataFrame({"tokens": tokens_seen.astype(np.int64), "jaccard": jac})


def stability_view(con: duckdb.DuckDBPyConnection, run_id: int, metric: str, normalize: str, p: float,
                   n_boot: int = 50) -> tuple[pl.DataFrame, pl.DataFrame]:
    """stability() of one run (a query function, so pages can cache it per DB version)."""
    _check(metric, normalize)
    return stability(sample_expert_matrix(con, run_id, metric), p, normalize, n_boot)


def env_path(name: str, default: str | Path) -> Path:
    """A path from an environment variable (ESFT_DB, ESFT_WORKDIR, ESFT_DATA_DIR), else the default."""
    return Path(os.environ.get(name) or default).expanduser()
