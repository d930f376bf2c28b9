"""The routing-trace store: DuckDB schema, connections that tolerate a concurrent writer, Arrow/Parquet bulk ingest.

Tables (see docs/CONTRACTS.md and docs/traces.md): `runs`, `samples`, `tokens`, `routes` (one row per token, MoE
layer and rank), and two pre-aggregations written when a run completes, `expert_stats` and `expert_tokens`.

Concurrency. DuckDB lets one process write a database file, and a read-write connection locks the file against every
other process, readers included. A recording takes minutes, so the recorder never keeps the file open while the
model runs: it inserts a `runs` row with status 'running' (one short transaction), keeps its Arrow batches in memory
(spilled as Parquet files in `<db>.staging/run-<id>/` past a size, esft_core/traces/staging.py), and at the end ingests
them in one transaction that also writes the
aggregates and flips the status to 'complete'. A `kill -9` leaves at most a 'running' row and a staging folder;
both are cleaned up by the next writer (the run is marked 'failed'). Readers (the explorer, `esft sql`) and writers
both retry briefly when the other side holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from esft_core.errors import EsftError

TABLES = ("runs", "samples", "tokens", "routes", "expert_stats", "expert_tokens", "sample_expert_stats", "layer_stats",
          "expert_norm_stats")
OPTIONAL_TABLES = ("sample_expert_stats", "layer_stats", "expert_norm_stats")  # absent from older exports
PROGRESSIVE_TABLES = ("samples", "tokens", "routes")  # what StagedRun.ingest_parts writes before the commit
RUN_TABLES = TABLES[1:]  # every table but `runs` is keyed by run_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, task VARCHAR, model VARCHAR, source VARCHAR, status VARCHAR,
    num_experts INTEGER, top_k INTEGER, layers INTEGER[], n_samples INTEGER, n_tokens BIGINT,
    params VARCHAR, created_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS samples (run_id INTEGER, sample_id INTEGER, n_tokens INTEGER, text VARCHAR);
CREATE TABLE IF NOT EXISTS tokens (
    run_id INTEGER, sample_id INTEGER, position INTEGER, token_id INTEGER, token_text VARCHAR);
CREATE TABLE IF NOT EXISTS routes (
    run_id INTEGER USING COMPRESSION rle, sample_id INTEGER USING COMPRESSION rle, position INTEGER,
    layer SMALLINT USING COMPRESSION rle, rank TINYINT USING COMPRESSION uncompressed, expert SMALLINT,
    weight FLOAT);
CREATE TABLE IF NOT EXISTS expert_stats (
    run_id INTEGER, layer SMALLINT, expert SMALLINT, n_selected BIGINT, gate_sum DOUBLE,
    sample_token_sum DOUBLE, sample_gate_sum DOUBLE);
CREATE TABLE IF NOT EXISTS expert_tokens (
    run_id INTEGER, layer SMALLINT, expert SMALLINT, token_id INTEGER, token_text VARCHAR, n BIGINT,
    gate_sum DOUBLE);
CREATE TABLE IF NOT EXISTS sample_expert_stats (
    run_id INTEGER, sample_id INTEGER, layer SMALLINT, expert SMALLINT, n_selected INTEGER, gate_sum DOUBLE);
CREATE TABLE IF NOT EXISTS layer_stats (
    run_id INTEGER, layer SMALLINT, n_tokens BIGINT, weight_sum DOUBLE, weight_sum_min DOUBLE, weight_sum_max DOUBLE,
    n_dropped BIGINT);
CREATE TABLE IF NOT EXISTS expert_norm_stats (
    run_id INTEGER, layer SMALLINT, expert SMALLINT, norm_gate_sum DOUBLE, sample_norm_gate_sum DOUBLE);
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS loss BOOLEAN;
"""
# layer_stats: the gate scale, i.e. the per-token sum of the top-K weights a layer's experts receive (mean =
# weight_sum / n_tokens; 1.0 for normalised softmax routers), and the non-expert slots dropped per layer.
# expert_norm_stats: gate sums with each token's weights divided by that sum (scale-free; score `gate_norm`).
# tokens.loss: the position's next-token prediction is in the training loss (an assistant answer token follows);
# NULL for runs that do not know it (official logs, older recordings). Answer-token scores (scores.py) filter on it.

# routes: per-column compression where DuckDB's automatic choice costs insert time for no space (rows arrive
# layer-major, so run_id/sample_id/layer come in long runs; rank cycles 0..K-1 and takes 1 byte uncompressed).

# Arrow schemas of the staged tables (what the recorder and importers produce), column order = table order.
ARROW_SCHEMAS = {
    "samples": pa.schema([("run_id", pa.int32()), ("sample_id", pa.int32()), ("n_tokens", pa.int32()),
                          ("text", pa.string())]),
    "tokens": pa.schema([("run_id", pa.int32()), ("sample_id", pa.int32()), ("position", pa.int32()),
                         ("token_id", pa.int32()), ("token_text", pa.string())]),
    "routes": pa.schema([("run_id", pa.int32()), ("sample_id", pa.int32()), ("position", pa.int32()),
                         ("layer", pa.int16()), ("rank", pa.int8()), ("expert", pa.int16()),
                         ("weight", pa.float32())]),
    # recorder staging only: per-sample sums computed on the device (norm_gate_sum feeds expert_norm_stats)
    "sample_expert_stats": pa.schema([("run_id", pa.int32()), ("sample_id", pa.int32()), ("layer", pa.int16()),
                                      ("expert", pa.int16()), ("n_selected", pa.int32()), ("gate_sum", pa.float64()),
                                      ("norm_gate_sum", pa.float64())]),
    # recorder staging: each rank's (layer, expert, token_id) sums, summed on its writer thread, sorted
    "expert_tokens": pa.schema([("run_id", pa.int32()), ("layer", pa.int16()), ("expert", pa.int16()),
                                ("token_id", pa.int32()), ("token_text", pa.string()), ("n", pa.int64()),
                                ("gate_sum", pa.float64())]),
    "layer_stats": pa.schema([("run_id", pa.int32()), ("layer", pa.int16()), ("n_tokens", pa.int64()),
                              ("weight_sum", pa.float64()), ("weight_sum_min", pa.float64()),
                              ("weight_sum_max", pa.float64()), ("n_dropped", pa.int64())]),
}

# what DuckDB's lock errors say (Linux, macOS, Windows); compared lower-case
LOCK_WORDS = ("lock", "conflicting", "being used by another process", "resource temporarily unavailable")


class DbLocked(EsftError):
    """Another process held the trace database's lock for longer than the caller would wait."""


def _is_lock_error(e: Exception) -> bool:
    return isinstance(e, duckdb.IOException) and any(w in str(e).lower() for w in LOCK_WORDS)


def connect(db: str | Path, read_only: bool = False, timeout: float = 30.0,
            external_access: bool = True, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open the trace DB; retry for up to `timeout` s while another process holds the lock.

    read_only=True requires the file to exist (a reader never creates a DB). external_access=False forbids
    read_parquet/COPY/ATTACH and friends, and locks that setting (used by `esft sql`). `config`: more DuckDB
    settings (e.g. esft_core.traces.sqlguard.sandbox_config: memory and thread limits, locked).
    A read-write connection creates the schema when missing.
    """
    db = Path(db)
    if read_only and not db.exists():
        raise EsftError(f"trace database {db} does not exist")
    if not read_only and db.parent and not db.parent.exists():
        raise EsftError(f"directory {db.parent} of trace database {db.name} does not exist")
    check_db_file(db)
    config = dict(config or {})
    if not external_access:
        config.update({"enable_external_access": False, "lock_configuration": True})
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only, config=config)
            break
        except duckdb.IOException as e:
            if not _is_lock_error(e):
                raise EsftError(f"cannot open trace database {db}: {str(e).splitlines()[0]}") from None
            if time.monotonic() > deadline:
                raise DbLocked(f"cannot open trace database {db}: locked by another process for more than "
                               f"{timeout:.0f} s; try again when the writer is done") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except duckdb.Error as e:
            raise EsftError(f"cannot open trace database {db}: {str(e).splitlines()[0]}") from None
    if not read_only:
        con.execute(SCHEMA)
    return con


def check_db_file(db: Path) -> None:
    """Refuse a path that is a directory or a file of another format (a DuckDB error would blame an in-memory DB)."""
    if db.is_dir():
        raise EsftError(f"trace database {db} is a directory; give a DuckDB file path, e.g. traces.duckdb")
    if db.is_file():
        from esft_core.traces.sqlguard import is_duckdb_file

        if not is_duckdb_file(db):
            raise EsftError(f"{db} is not a DuckDB database (wrong file header); give a .duckdb trace database")


@contextlib.contextmanager
def reader(db: str | Path, timeout: float = 30.0, external_access: bool = True,
           config: dict | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-only connection (closed on exit, so writers are not blocked)."""
    con = connect(db, read_only=True, timeout=timeout, external_access=external_access, config=config)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(db: str | Path, timeout: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection inside one transaction: committed on success, rolled back on any error."""
    con = connect(db, read_only=False, timeout=timeout)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


def next_run_id(con) -> int:
    return int(con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0])


def insert_run(con, run_id: int, task: str, model: str, source: str, status: str, num_experts: int, top_k: int,
               layers: list[int], params: dict, n_samples: int = 0, n_tokens: int = 0) -> None:
    finished = "now()" if status == "complete" else "NULL"
    con.execute(
        f"INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), {finished})",
        [run_id, task, model, source, status, num_experts, top_k, [int(x) for x in layers], n_samples, n_tokens,
         json.dumps(params, sort_keys=True)],
    )


def write_aggregates(con, run_id: int, routes_rel: str | None = "routes", with_token_ids: bool = False,
                     stats_rel: str | None = None) -> None:
    """Fill expert_stats and expert_tokens of `run_id` from its rows, in SQL.

    `routes_rel` may be any relation with the routes columns: the official importer passes its Arrow table (float64
    weights, so gate sums are not rounded through FLOAT); the recorder passes its staged Parquet parts, which also
    carry each row's token_id (with_token_ids), so expert_tokens needs no join of routes with tokens.
    `stats_rel`: per-(sample, layer, expert) sums the recorder computed on the device (then `routes_rel` may be None:
    an aggregate-only run, or one whose expert_tokens the recorder staged itself, passes None: no expert_tokens here).
    """
    # per (sample, layer, expert) first (kept as sample_expert_stats: bootstrap and per-sample views read it),
    # then weighted by 1/L_j: the join touches the small pre-aggregate only
    if stats_rel is None:  # from the routes; each weight also divided by its token's top-K sum (scale-free)
        stats_rel = "norm_routes_stats"
        con.execute(f"""
            CREATE TEMP TABLE norm_routes_stats AS
            WITH r AS (SELECT sample_id, position, layer, expert, weight::DOUBLE AS w,
                              sum(weight::DOUBLE) OVER (PARTITION BY sample_id, position, layer) AS ws
                       FROM {routes_rel} WHERE run_id = $run)
            SELECT sample_id, layer, expert, count(*)::INTEGER AS n_selected, sum(w) AS gate_sum,
                   sum(w / nullif(ws, 0)) AS norm_gate_sum
            FROM r GROUP BY sample_id, layer, expert""", {"run": run_id})
        con.execute(f"""
            INSERT INTO layer_stats
            SELECT $run, layer, count(*), sum(ws), min(ws), max(ws), 0
            FROM (SELECT layer, sum(weight::DOUBLE) AS ws FROM {routes_rel} WHERE run_id = $run
                  GROUP BY sample_id, position, layer) GROUP BY layer ORDER BY layer""", {"run": run_id})
    con.execute(f"""
        INSERT INTO sample_expert_stats
        SELECT $run, sample_id, layer, expert, sum(n_selected), sum(gate_sum)
        FROM {stats_rel} GROUP BY sample_id, layer, expert
        ORDER BY sample_id, layer, expert""", {"run": run_id})
    con.execute(f"""
        INSERT INTO expert_norm_stats
        SELECT $run, p.layer, p.expert, sum(p.norm_gate_sum), sum(p.norm_gate_sum / s.n_tokens)
        FROM {stats_rel} p JOIN samples s ON s.run_id = $run AND s.sample_id = p.sample_id
        GROUP BY p.layer, p.expert ORDER BY p.layer, p.expert""", {"run": run_id})
    con.execute("DROP TABLE IF EXISTS norm_routes_stats")
    con.execute("""
        INSERT INTO expert_stats
        SELECT $run, p.layer, p.expert, sum(p.n_selected), sum(p.gate_sum), sum(p.n_selected / s.n_tokens),
               sum(p.gate_sum / s.n_tokens)
        FROM sample_expert_stats p JOIN samples s ON s.run_id = $run AND s.sample_id = p.sample_id
        WHERE p.run_id = $run
        GROUP BY p.layer, p.expert ORDER BY p.layer, p.expert""", {"run": run_id})
    if routes_rel is None:
        return
    if with_token_ids:
        per_token = f"""SELECT layer, expert, token_id, count(*) AS n, sum(weight::DOUBLE) AS g
                        FROM {routes_rel} WHERE run_id = $run GROUP BY layer, expert, token_id"""
    else:
        per_token = """SELECT r.layer, r.expert, t.token_id, count(*) AS n, sum(r.weight::DOUBLE) AS g
                       FROM routes r JOIN tokens t ON r.sample_id = t.sample_id AND r.position = t.position
                       WHERE r.run_id = $run AND t.run_id = $run GROUP BY r.layer, r.expert, t.token_id"""
    con.execute(f"""
        INSERT INTO expert_tokens
        WITH per AS ({per_token}),
             txt AS (SELECT token_id, any_value(token_text) AS token_text FROM tokens WHERE run_id = $run
                     GROUP BY token_id)
        SELECT $run, per.layer, per.expert, per.token_id, txt.token_text, per.n, per.g
        FROM per JOIN txt ON per.token_id = txt.token_id
        ORDER BY per.layer, per.expert""", {"run": run_id})  # sorted rows keep zone maps tight: top-tokens lookups


def complete_run(con, run_id: int) -> tuple[int, int]:
    """Set n_samples/n_tokens from the rows, mark the run complete; return (n_samples, n_tokens)."""
    n_samples, n_tokens = con.execute(
        "SELECT count(*), coalesce(sum(n_tokens), 0) FROM samples WHERE run_id = ?", [run_id]).fetchone()
    if n_samples == 0:
        raise EsftError("the run holds no samples; nothing recorded")
    con.execute("UPDATE runs SET status = 'complete', n_samples = ?, n_tokens = ?, finished_at = now() "
                "WHERE run_id = ?", [n_samples, n_tokens, run_id])
    return int(n_samples), int(n_tokens)


def ingest_arrow(db: str | Path, meta: dict, tables: dict[str, pa.Table], exact_weights: bool = False) -> int:
    """Write one complete run from in-memory Arrow tables in a single transaction; return its run_id.

    `meta`: task, model, source, num_experts, top_k, layers, params. Tables carry any run_id (replaced here).
    exact_weights: compute expert_stats from the Arrow routes (e.g. float64 weights) rather than the FLOAT column.
    """
    with transaction(db) as con:
        run_id = next_run_id(con)
        insert_run(con, run_id, status="running", **meta)
        for name in ("samples", "tokens", "routes"):
            t = tables.get(name)
            if t is None or t.num_rows == 0:
                continue
            con.register(f"staged_{name}", t)
            cols = ", ".join(f for f in t.column_names if f != "run_id")
            con.execute(f"INSERT INTO {name} BY NAME SELECT {int(run_id)} AS run_id, {cols} FROM staged_{name}")
        if exact_weights and "routes" in tables:
            con.execute(f"CREATE TEMP VIEW exact_routes AS SELECT {int(run_id)}::INTEGER AS run_id, "
                        "* EXCLUDE (run_id) FROM staged_routes")
            write_aggregates(con, run_id, routes_rel="exact_routes")
            con.execute("DROP VIEW exact_routes")
        else:
            write_aggregates(con, run_id)
        complete_run(con, run_id)
        for name in tables:
            con.unregister(f"staged_{name}")
    return run_id


# -- queries shared by scores/select/CLI ----------------------------------------------------------------------
def routes_note(con, run_id: int) -> str | None:
    """What a run's per-token views lack (recorded with --routes none / sample:N), as one sentence; None if nothing."""
    row = con.execute("SELECT params FROM runs WHERE run_id = ?", [run_id]).fetchone()
    mode = json.loads(row[0] or "{}").get("routes", "all") if row else "all"
    if mode == "none":
        return (f"run {run_id} was recorded aggregate-only (--routes none): scores and expert statistics are complete, "
                "but per-token routes and top tokens were not stored")
    if isinstance(mode, str) and mode.startswith("sample:"):
        return (f"run {run_id} stored per-token routes for its first {mode[7:]} samples only (--routes {mode}); "
                "scores and expert statistics cover every sample")
    return None


def complete_runs(con, task: str, run_ids: list[int] | None = None, model: str | None = None,
                  pool_models: bool = False) -> list[tuple]:
    """(run_id, num_experts, top_k, layers, n_samples, n_tokens) of the complete runs of `task`; errors say why none.

    `model` keeps that model's runs only. Without it, runs of different models are refused (their experts are not
    the same experts) unless `pool_models` asks for pooling.
    """
    rows = con.execute(
        "SELECT run_id, num_experts, top_k, layers, n_samples, n_tokens, model FROM runs "
        "WHERE task = ? AND status = 'complete' AND (? IS NULL OR model = ?) ORDER BY run_id",
        [task, model, model]).fetchall()
    if run_ids:
        rows = [r for r in rows if r[0] in set(run_ids)]
        missing = sorted(set(run_ids) - {r[0] for r in rows})
        if missing:
            of = f" of model '{model}'" if model else ""
            raise EsftError(f"run(s) {', '.join(map(str, missing))} are not complete runs of task '{task}'{of}")
    if not rows:
        tasks = [t for (t,) in con.execute(
            "SELECT DISTINCT task FROM runs WHERE status = 'complete' AND (? IS NULL OR model = ?) ORDER BY task",
            [model, model]).fetchall()]
        of = f" of model '{model}'" if model else ""
        known = f"; known tasks{of}: {', '.join(tasks)}" if tasks else f"; the database holds no complete runs{of}"
        raise EsftError(f"unknown task '{task}' (no complete run{of}){known}")
    models = sorted({r[6] for r in rows})
    if len(models) > 1 and not pool_models:
        raise EsftError(f"task '{task}' has complete runs of {len(models)} models ({', '.join(models)}); choose one "
                        "with --model MODEL (or pool them with --pool-models)")
    if len({(r[1], r[2]) for r in rows}) > 1:
        raise EsftError(f"runs of task '{task}' differ in num_experts/top_k; pick runs with --run")
    if sum(r[5] for r in rows) == 0:
        raise EsftError(f"task '{task}' has no tokens (empty run)")
    return [r[:6] for r in rows]


def ensure_sample_aggregates(con) -> int:
    """Fill `sample_expert_stats` for complete runs written before it existed (read-write connection); returns the
    number of runs added. Cheap: one GROUP BY over a run's routes."""
    con.execute(SCHEMA)
    todo = [r[0] for r in con.execute(
        "SELECT run_id FROM runs WHERE status = 'complete' "
        "AND run_id NOT IN (SELECT DISTINCT run_id FROM sample_expert_stats)").fetchall()]
    for run in todo:
        con.execute("INSERT INTO sample_expert_stats SELECT run_id, sample_id, layer, expert, count(*), "
                    "sum(weight::DOUBLE) FROM routes WHERE run_id = ? GROUP BY ALL", [run])
    return len(todo)


def db_path(db) -> Path:
    """A trace DB path for writing: its directory exists, it is not a directory or a non-DuckDB file."""
    p = Path(db)
    if p.parent and not p.parent.exists():
        raise EsftError(f"directory {p.parent} of trace database {p.name} does not exist")
    check_db_file(p)
    return p
