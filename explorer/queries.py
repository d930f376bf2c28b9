"""Read-side queries of the explorer: the trace maths of esft_core (store, scores, select) reshaped into Polars
frames for charts. No streamlit here; pages call these through explorer/state.py, which caches results per DB
version. Nothing here computes a score or a selection itself: scores come from esft_core.selection.scores (the same
SQL as
`esft scores`), selections from esft_core.selection.select (the same top-p/contrast/stability as `esft select`).

Concurrency: recording/import jobs write the same DuckDB file from another process. The explorer opens a read-only
connection per query batch and closes it at once (`reading`, = esft_core.traces.store.reader), and waits up to
`LOCK_WAIT_S` while a writer holds the lock (writers keep it only for short commits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from esft_core.selection import select
from esft_core.selection.scores import NORMALIZATIONS, SCORES, compute_scores
from esft_core.traces import store

LOCK_WAIT_S = 8.0
METRICS = tuple(SCORES)
NORMALIZE = NORMALIZATIONS
DbBusy = store.DbLocked  # a writer held the DB lock for longer than we are willing to wait


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


@contextlib.contextmanager
def reading(db: str | Path, wait_s: float = LOCK_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """`with reading(db) as con:` — a short-lived read-only connection without file access, closed on exit."""
    with store.reader(db, timeout=wait_s, external_access=False) as con:
        yield con


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


def run_detail(con: duckdb.DuckDBPyConnection, run_id: int | None) -> dict:
    """What a run holds beyond its aggregates: {'tokens': per-token rows exist, 'text': sample text exists}. The
    authors' imported logs and aggregate-only recordings have neither, so token-level views explain instead."""
    if run_id is None or not has_table(con, "tokens"):
        return {"tokens": False, "text": False}
    tok = _q(con, "SELECT EXISTS (SELECT 1 FROM tokens WHERE run_id = ?)", [run_id]).fetchall()[0][0]
    txt = _q(con, "SELECT EXISTS (SELECT 1 FROM samples WHERE run_id = ? AND text IS NOT NULL)",
             [run_id]).fetchall()[0][0]
    return {"tokens": bool(tok), "text": bool(txt)}


def models_with_tokens(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Models whose complete runs include per-token rows (the useful default model of a new session)."""
    if not has_table(con, "tokens"):
        return []
    runs = complete_runs(con)
    if runs.height == 0:
        return []
    ids = _q(con, "SELECT DISTINCT run_id FROM tokens", []).fetchall()
    have = {int(r[0]) for r in ids}
    return runs.filter(pl.col("run_id").is_in(list(have))).sort("run_id", descending=True)["model"].unique(
        maintain_order=True).to_list()


def db_summary(con: duckdb.DuckDBPyConnection) -> dict:
    """Row counts of the contract tables that exist."""
    out = {}
    for t in ("runs", "samples", "tokens", "routes", "expert_stats", "expert_tokens"):
        if has_table(con, t):
            row = _q(con, f"SELECT estimated_size FROM duckdb_tables() WHERE table_name = '{t}'").fetchall()[0]
            out[t] = int(row[0] or 0)
    return out


# ----------------------------------------------------------------------------------------------------------- scores
def _check(metric: str, normalize: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalisation '{normalize}'; choose one of {', '.join(NORMALIZE)}")


_SCORE_SCHEMA = {"task": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32, "score": pl.Float64}


def _frame(task: str, layers: list[int], values: np.ndarray, **extra: np.ndarray) -> pl.DataFrame:
    """(layers, E) arrays → long frame task, layer, expert, score (+ extra columns of the same shape)."""
    n_e = values.shape[1]
    cols = {"task": [task] * values.size, "layer": np.repeat(np.asarray(layers, np.int32), n_e),
            "expert": np.tile(np.arange(n_e, dtype=np.int32), len(layers)), "score": values.reshape(-1)}
    cols.update({k: v.reshape(-1) for k, v in extra.items()})
    return pl.DataFrame(cols).with_columns(pl.col("task").cast(pl.Utf8))


def expert_scores(con: duckdb.DuckDBPyConnection, model: str, tasks_: list[str] | None = None,
                  metric: str = "gate", normalize: str = "token") -> pl.DataFrame:
    """Score of every (task, layer, expert) of `model` (esft_core.selection.scores.compute_scores: all complete runs
    of the
    task on that model pooled), zero-filled over the layer × expert grid. Columns: task, layer, expert, score."""
    _check(metric, normalize)
    names = tasks(con, model) if tasks_ is None else list(tasks_)
    frames = [_frame(t, s.layers, s.values) for t in names
              for s in [compute_scores(con, t, metric, normalize, model=model)]]
    return pl.concat(frames) if frames else pl.DataFrame(schema=_SCORE_SCHEMA)


def select_top_p(scores: pl.DataFrame, p: float, round_digits: int | None = 4) -> pl.DataFrame:
    """esft_core.selection.select.top_p_mask per (task, layer) of a score frame (the authors' stop rule, scores
    rounded to
    `round_digits` first, as `esft select` does). Input columns task, layer, expert, score (+ any); output adds
    rank (1-based, by rounded score then expert id), cum (running rounded score) and selected."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if scores.height == 0:
        return scores.with_columns(rank=pl.lit(0, pl.UInt32), cum=pl.lit(0.0), selected=pl.lit(False))
    parts = []
    for _, g in scores.sort(["task", "layer", "expert"]).group_by(["task"], maintain_order=True):
        layers = g["layer"].unique(maintain_order=True).to_list()
        vals = g["score"].to_numpy().reshape(len(layers), -1)  # (layers, E): full grid, as expert_scores gives
        r = select.round_scores(vals, round_digits)
        mask = select.top_p_mask(r, p)  # (layers, E)
        order = np.argsort(-r, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(1, r.shape[1] + 1)[None].repeat(len(layers), 0), axis=-1)
        cum = np.take_along_axis(np.cumsum(np.take_along_axis(r, order, -1), -1), np.argsort(order, -1), -1)
        parts.append(g.with_columns(rank=pl.Series(rank.reshape(-1), dtype=pl.UInt32), cum=pl.Series(cum.reshape(-1)),
                                    selected=pl.Series(mask.reshape(-1))))
    return pl.concat(parts).sort(["task", "layer", "rank"])


def selection_dict(selected: pl.DataFrame, task: str, by_rank: bool = False) -> dict[int, list[int]]:
    """{layer: [experts]} of one task from select_top_p output (every layer present, possibly empty); experts sorted
    by id, or by rank (score order, as `esft select` writes them into a config)."""
    out: dict[int, list[int]] = {}
    df = selected.filter(pl.col("task") == task)
    for layer in sorted(set(df["layer"].to_list())):
        rows = df.filter((pl.col("layer") == layer) & pl.col("selected"))
        out[int(layer)] = ([int(e) for e in rows.sort("rank")["expert"]] if by_rank
                           else sorted(int(e) for e in rows["expert"]))
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


def shared_experts(scores: pl.DataFrame, task_a: str, task_b: str, k: int) -> pl.DataFrame:
    """The experts in both tasks' top-k of each layer (what a cell of the shared top-k matrix counts). Columns layer,
    expert, score_a, score_b."""
    top = scores.filter(pl.col("score") > 0).with_columns(
        r=pl.col("score").rank("ordinal", descending=True).over(["task", "layer"])).filter(pl.col("r") <= k)
    a = top.filter(pl.col("task") == task_a).select("layer", "expert", score_a="score")
    b = top.filter(pl.col("task") == task_b).select("layer", "expert", score_b="score")
    return a.join(b, on=["layer", "expert"]).sort(["layer", "score_a"], descending=[False, True])


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
    """Example contexts where (layer, expert) fired with the highest gate weight (position 0, the BOS token every
    sample starts with, is skipped: it would fill every list of its expert), looking only at the first
    `scan_tokens` tokens of the run (sample-ordered storage lets DuckDB skip the rest). Columns sample_id, position,
    weight, left, token, right."""
    cap = _q(con, """SELECT coalesce(max(sample_id), 0) FROM (SELECT sample_id,
                           sum(n_tokens) OVER (ORDER BY sample_id) c FROM samples WHERE run_id = ?) WHERE c <= ?""",
                      [run_id, scan_tokens]).fetchall()[0][0]
    return _pl(con, """
        WITH hits AS (SELECT sample_id, position, weight FROM routes
                      WHERE run_id = ? AND sample_id <= ? AND layer = ? AND expert = ? AND position > 0
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
def contrast_selection(con: duckdb.DuckDBPyConnection, model: str, task: str, against: list[str], metric: str,
                       normalize: str, p: float, lam: float = 1.0) -> pl.DataFrame:
    """esft_core.selection.select's contrast scores of `task` against `against` (pooled by their tokens or samples)
    and their
    top-p selection under the library's rounding rule — what `esft select --contrast` writes. Columns task, layer,
    expert, score (contrast share), raw (the task's score), contrast_mean (pooled score), rank, cum, selected."""
    _check(metric, normalize)
    c, own, pooled = select.task_scores(con, task, metric, normalize, list(against), lam, model=model)
    mean = pooled.values if pooled is not None else np.zeros_like(own.values)
    frame = _frame(task, c.layers, c.values, raw=own.values, contrast_mean=mean)
    return select_top_p(frame, p, select.selection_round_digits(4, pooled is not None))


def stability_view(con: duckdb.DuckDBPyConnection, model: str, task: str, metric: str, normalize: str, p: float,
                   n_boot: int = 50) -> tuple[pl.DataFrame, pl.DataFrame]:
    """esft_core.selection.select.stability_arrays of `task` on `model` (the numbers of `esft select --bootstrap`):
    (prob: layer, expert, prob, selected), (curve: tokens, jaccard of the first-n-samples selection with the final)."""
    _check(metric, normalize)
    a = select.stability_arrays(con, task, metric, normalize, p, n_boot, n_orders=0, model=model)  # page: no orders
    f = _frame(task, a["layers"], a["prob"], selected=a["full"])
    prob = f.select("layer", "expert", pl.col("score").alias("prob"), "selected")
    return prob, pl.DataFrame({"tokens": a["curve_tokens"], "jaccard": a["curve_jaccard"]})
