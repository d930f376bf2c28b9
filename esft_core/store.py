"""The routing-trace store: DuckDB schema, connections that tolerate a concurrent writer, Arrow/Parquet bulk ingest.

Tables (see docs/CONTRACTS.md and docs/traces.md): `runs`, `samples`, `tokens`, `routes` (one row per token, MoE
layer and rank), and two pre-aggregations written when a run completes, `expert_stats` and `expert_tokens`.

Concurrency. DuckDB lets one process write a database file, and a read-write connection locks the file against every
other process, readers included. A recording takes minutes, so the recorder never keeps the file open while the
model runs: it inserts a `runs` row with status 'running' (one short transaction), stages its Arrow batches as
Parquet files in `<db>.staging/run-<id>/`, and at the end ingests them in one transaction that also writes the
aggregates and flips the status to 'complete'. A `kill -9` leaves at most a 'running' row and a staging folder;
both are cleaned up by the next writer (the run is marked 'failed'). Readers (the explorer, `esft sql`) and writers
both retry briefly when the other side holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from esft_core import settings
from esft_core.errors import EsftError
from esft_core.procs import pid_alive

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
    settings (e.g. esft_core.sqlguard.sandbox_config: memory and thread limits, locked).
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
        from esft_core.sqlguard import is_duckdb_file

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


# -- staged runs (the recorder's path) ------------------------------------------------------------------------
def staging_root(db: str | Path) -> Path:
    return Path(f"{db}.staging")


READY = "READY.json"  # marker in a run's staging folder: every part is written, the ingest may run from any process


def staged_parts(run_dir: Path) -> dict[str, list[str]]:
    """The Parquet parts of a staged run by table name, in write order; part names are
    '<rank prefix><table>-<part>.parquet' (prefix '' or 'r0001-' for torchrun ranks)."""
    files: dict[str, list[str]] = {}
    for f in sorted(Path(run_dir).glob("*.parquet")):
        files.setdefault(f.stem.rsplit("-", 1)[0].rsplit("-", 1)[-1], []).append(str(f))
    return files


def ingest_staged(con, run_id: int, run_dir: Path) -> tuple[int, int]:
    """Ingest a staged run's parts inside the caller's transaction, write its aggregates and mark it complete;
    return (n_samples, n_tokens).

    The parts are read through Arrow datasets registered with DuckDB, so no path is ever pasted into SQL (a DB path
    with `'` or glob characters such as `t[1].duckdb` works)."""
    import pyarrow.dataset as ds

    files = staged_parts(run_dir)
    views: dict[str, str] = {}
    for name, paths in files.items():
        views[name] = f"staged_{name}_{int(run_id)}"
        con.register(views[name], ds.dataset(paths, format="parquet"))
    try:
        for name in ("samples", "tokens"):
            if name in views:
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM {views[name]}")
        if "routes" in views:
            con.execute(f"INSERT INTO routes SELECT {', '.join(ARROW_SCHEMAS['routes'].names)} FROM {views['routes']}")
        has_ids = "routes" in views and any(d[0] == "token_id" for d in con.execute(
            f"SELECT * FROM {views['routes']} LIMIT 0").description)
        stats = views.get("sample_expert_stats")  # the recorder's device-side sums
        if "layer_stats" in views:  # one part per rank: combine
            con.execute(f"""INSERT INTO layer_stats SELECT ?, layer, sum(n_tokens), sum(weight_sum),
                            min(weight_sum_min), max(weight_sum_max), sum(n_dropped) FROM {views['layer_stats']}
                            GROUP BY layer ORDER BY layer""", [run_id])
        routes_rel = (views["routes"] if has_ids else "routes") if "routes" in views else None
        if "expert_tokens" in views:  # summed by the recorder: one sorted part per rank
            routes_rel = None
            one = len(files["expert_tokens"]) == 1
            con.execute(f"""INSERT INTO expert_tokens SELECT ?, layer, expert, token_id, token_text, n, gate_sum
                            FROM {views['expert_tokens']}""" if one else f"""
                            INSERT INTO expert_tokens SELECT ?, layer, expert, token_id, any_value(token_text),
                            sum(n), sum(gate_sum) FROM {views['expert_tokens']} GROUP BY layer, expert, token_id
                            ORDER BY layer, expert""", [run_id])
        write_aggregates(con, run_id, routes_rel, with_token_ids=has_ids, stats_rel=stats)
        return complete_run(con, run_id)
    finally:
        for view in views.values():
            con.unregister(view)


def reap_stale_runs(con, db: str | Path) -> list[int]:
    """Settle 'running' runs of dead local writer processes: a run whose parts were all staged (READY marker; its
    recorder gave up waiting for the DB lock) is ingested now; any other is marked 'failed' and its staging folder
    dropped. Returns the ids of the failed runs; ingested runs' folders are removed by `drop_ingested`."""
    host = socket.gethostname()
    stale = []
    for run_id, params in con.execute("SELECT run_id, params FROM runs WHERE status = 'running'").fetchall():
        p = json.loads(params or "{}")
        if p.get("host") == host and p.get("pid") and not pid_alive(int(p["pid"])):
            run_dir = staging_root(db) / f"run-{run_id}"
            if (run_dir / READY).is_file():
                ingest_staged(con, run_id, run_dir)
                continue
            stale.append(run_id)
            con.execute("UPDATE runs SET status = 'failed', finished_at = now() WHERE run_id = ?", [run_id])
            for name in PROGRESSIVE_TABLES:  # rows a progressive ingest had already written
                con.execute(f"DELETE FROM {name} WHERE run_id = ?", [run_id])
            shutil.rmtree(run_dir, ignore_errors=True)
    return stale


def drop_ingested(con, db: str | Path) -> None:
    """Remove staging folders of runs that are no longer 'running' (ingested or failed), and the root when empty."""
    root = staging_root(db)
    if not root.is_dir():
        return
    running = {r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()}
    for d in root.glob("run-*"):
        if d.name[4:].isdigit() and int(d.name[4:]) not in running:
            shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty


def settle_staged(db: str | Path, timeout: float = 60.0) -> list[int]:
    """Ingest queued recordings and fail dead ones now (`esft runs --ingest`); return the ids ingested."""
    with transaction(db, timeout=timeout) as con:
        before = {r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchall()}
        reap_stale_runs(con, db)
        after = {r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchall()}
    with reader(db) as con:
        drop_ingested(con, db)
    return sorted(after - before)


def _write_marker(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class StagedRun:
    """A run being recorded: 'running' row now, Parquet parts while recording, one ingest transaction at the end.

    When a long reader holds the DB at the end, the ingest waits (`ingest_wait` s, saying so through `notify`);
    if the lock is still held then, the parts stay staged with a READY marker and the next writer (or
    `esft runs --ingest`) ingests them: a finished recording is never thrown away."""

    def __init__(self, db: str | Path, task: str, model: str, num_experts: int, top_k: int, layers: list[int],
                 params: dict, source: str = "record", ingest_wait: float | None = None, notify=None):
        self.db = Path(db)
        self.ingest_wait = float(settings.get("ESFT_INGEST_WAIT")) if ingest_wait is None else ingest_wait
        self.notify = notify or (lambda msg: print(f"esft: {msg}", file=sys.stderr, flush=True))
        self.queued = False
        params = {**params, "pid": os.getpid(), "host": socket.gethostname()}
        with transaction(self.db) as con:
            reap_stale_runs(con, self.db)
            self.run_id = next_run_id(con)
            insert_run(con, self.run_id, task, model, source, "running", num_experts, top_k, layers, params)
        with contextlib.suppress(EsftError), reader(self.db, timeout=1.0) as con:
            drop_ingested(con, self.db)
        self.dir = staging_root(self.db) / f"run-{self.run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = {name: 0 for name in ARROW_SCHEMAS}
        self.part_prefix = ""  # torchrun ranks stage under r<rank>- so their part names never collide
        self.n_ingested = 0  # sample parts already inserted by ingest_parts

    @classmethod
    def attach(cls, db: str | Path, run_id: int, part_prefix: str) -> StagedRun:
        """Another process's handle on a 'running' run (a torchrun rank > 0): stages parts only; rank 0 commits."""
        self = cls.__new__(cls)
        self.db, self.run_id, self.part_prefix = Path(db), run_id, part_prefix
        self.dir = staging_root(self.db) / f"run-{run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = {name: 0 for name in ARROW_SCHEMAS}
        self.n_ingested = 0
        return self

    def stage(self, tables: dict[str, pa.Table], part_prefix: str | None = None) -> None:
        """Write one Parquet part per table (a few MB each); the DB file is not touched."""
        prefix = self.part_prefix if part_prefix is None else part_prefix
        for name, t in tables.items():
            if t.num_rows == 0:
                continue
            path = self.dir / f"{prefix}{name}-{self.n_parts:06d}.parquet"
            t = t.set_column(0, "run_id", pa.repeat(pa.scalar(self.run_id, pa.int32()), t.num_rows))
            schema = ARROW_SCHEMAS[name]
            if name == "routes" and "token_id" in t.column_names:  # staging only: lets expert_tokens skip a join
                schema = schema.append(pa.field("token_id", pa.int32()))
            if name == "tokens" and "loss" in t.column_names:  # optional: the recorder's loss flags
                schema = schema.append(pa.field("loss", pa.bool_()))
            # dictionary encoding and statistics halve the write speed and buy nothing for a file read once
            pq.write_table(t.select(schema.names).cast(schema), path.with_suffix(".tmp"), compression="lz4",
                           use_dictionary=["token_text"], write_statistics=False)
            os.replace(path.with_suffix(".tmp"), path)  # a part is either whole or absent
            self.n_rows[name] += t.num_rows
        self.n_parts += 1

    def ingest_parts(self) -> None:
        """Progressive ingest (opt-in, single process): insert the staged samples/tokens/routes parts now, in one
        short transaction, and delete them; the commit then only writes the aggregates. The run stays 'running'
        (scores and selection ignore it); its rows are deleted if it fails or its process dies (reap_stale_runs)."""
        parts = {n: sorted(self.dir.glob(f"{self.part_prefix}{n}-*.parquet")) for n in PROGRESSIVE_TABLES}
        if not any(parts.values()):
            return
        with transaction(self.db) as con:
            for name, files in parts.items():
                if files:
                    cols = ", ".join(ARROW_SCHEMAS[name].names)
                    con.execute(f"INSERT INTO {name} SELECT {cols} FROM read_parquet(?)", [[str(f) for f in files]])
        for files in parts.values():
            for f in files:
                f.unlink()
        self.n_ingested += len(parts["samples"])

    def commit(self) -> tuple[int, int]:
        """Ingest the staged parts, write the aggregates and mark the run complete, all in one transaction."""
        if not any(self.dir.glob("*samples-*.parquet")) and not self.n_ingested:
            self.fail("no samples were recorded")
            raise EsftError("no tokens were recorded (empty data or --max-tokens 0)")
        _write_marker(self.dir / READY, {"run_id": self.run_id, "rows": self.n_rows, "pid": os.getpid()})
        deadline = time.monotonic() + self.ingest_wait
        told = False
        while True:
            try:  # the first try does not wait, so a wait is announced before it starts
                wait = min(5.0, max(0.0, deadline - time.monotonic())) if told else 0.0
                with transaction(self.db, timeout=wait) as con:
                    counts = ingest_staged(con, self.run_id, self.dir)
                break
            except EsftError as e:
                if "locked by another process" not in str(e):
                    raise
                if time.monotonic() >= deadline:
                    self.queued = True
                    raise EsftError(
                        f"trace database {self.db} stayed locked by another process for {self.ingest_wait:g} s; "
                        f"run {self.run_id} is kept staged in {self.dir} and is ingested by the next writer or "
                        f"`esft runs --db {self.db} --ingest`") from None
                if not told:
                    self.notify(f"trace database {self.db} is locked by another process (a long query?); run "
                                f"{self.run_id} is staged in {self.dir}; retrying the ingest for up to "
                                f"{self.ingest_wait:g} s")
                    told = True
        shutil.rmtree(self.dir, ignore_errors=True)
        return counts

    def fail(self, error: str) -> None:
        """Mark the run failed (its staged rows are discarded, nothing else is written); a queued run is kept."""
        if self.queued:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(EsftError), transaction(self.db) as con:
            con.execute("UPDATE runs SET status = 'failed', finished_at = now(), "
                        "params = json_merge_patch(params, ?) WHERE run_id = ?",
                        [json.dumps({"error": error[:500]}), self.run_id])
            if self.n_ingested:
                for name in PROGRESSIVE_TABLES:
                    con.execute(f"DELETE FROM {name} WHERE run_id = ?", [self.run_id])


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


# -- Parquet export / import (merge runs recorded on many machines) --------------------------------------------
def export_runs(db: str | Path, run_ids: list[int], out_dir: str | Path, force: bool = False) -> dict[str, int]:
    """Write the rows of `run_ids` as <out_dir>/<table>.parquet (one file per table); return row counts.

    Rows stream from DuckDB as Arrow batches into pyarrow's Parquet writer: no path is pasted into SQL. An existing
    export is overwritten only with `force`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EsftError(f"--out {out} exists and is not a directory")
    clash = [f"{name}.parquet" for name in TABLES if (out / f"{name}.parquet").exists()]
    if clash and not force:
        raise EsftError(f"--out {out} already holds an export ({clash[0]}); pass --force to overwrite it")
    if not out.parent.is_dir():
        raise EsftError(f"directory {out.parent} for --out does not exist")
    out.mkdir(exist_ok=True)
    counts = {}
    ids = [int(r) for r in run_ids]
    with reader(db) as con:
        for name in TABLES:
            tmp = out / f"{name}.parquet.tmp"
            batches = con.sql(f"SELECT * FROM {name} WHERE run_id IN (SELECT unnest(?::INTEGER[]))",
                              params=[ids]).to_arrow_reader(65536)
            n = 0
            with pq.ParquetWriter(tmp, batches.schema, compression="zstd") as w:
                for batch in batches:
                    w.write_batch(batch)
                    n += batch.num_rows
            os.replace(tmp, out / f"{name}.parquet")
            counts[name] = n
    return counts


IMPORT_COLUMNS = {  # the columns an export must carry, in table order
    "runs": ["run_id", "task", "model", "source", "status", "num_experts", "top_k", "layers", "n_samples",
             "n_tokens", "params", "created_at", "finished_at"],
    "samples": ["run_id", "sample_id", "n_tokens", "text"],
    "tokens": ["run_id", "sample_id", "position", "token_id", "token_text"],
    "routes": ["run_id", "sample_id", "position", "layer", "rank", "expert", "weight"],
    "expert_stats": ["run_id", "layer", "expert", "n_selected", "gate_sum", "sample_token_sum", "sample_gate_sum"],
    "expert_tokens": ["run_id", "layer", "expert", "token_id", "token_text", "n", "gate_sum"],
    "sample_expert_stats": ["run_id", "sample_id", "layer", "expert", "n_selected", "gate_sum"],
    "layer_stats": ["run_id", "layer", "n_tokens", "weight_sum", "weight_sum_min", "weight_sum_max", "n_dropped"],
    "expert_norm_stats": ["run_id", "layer", "expert", "norm_gate_sum", "sample_norm_gate_sum"],
}


def _read_export(src: Path, name: str):
    """One exported table as an Arrow dataset (lazy), its columns checked; errors name the file."""
    import pyarrow.dataset as ds

    path = src / f"{name}.parquet"
    try:
        d = ds.dataset(str(path), format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise EsftError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    missing = [c for c in IMPORT_COLUMNS[name] if c not in d.schema.names]
    if missing:
        raise EsftError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(IMPORT_COLUMNS[name])}")
    return d


def check_import(con, src: Path, views: dict[str, str]) -> None:
    """An export must be consistent before it is ingested: every complete run has routes and expert_stats rows,
    expert ids in [0, num_experts), layers among the run's layers, ranks in [0, top_k), counts that match."""
    bad = con.execute(f"""
        SELECT r.run_id, r.num_experts, r.top_k, r.n_tokens,
               (SELECT count(*) FROM {views['routes']} x WHERE x.run_id = r.run_id) AS n_routes,
               (SELECT count(*) FROM {views['expert_stats']} x WHERE x.run_id = r.run_id) AS n_stats,
               (SELECT count(*) FROM {views['routes']} x WHERE x.run_id = r.run_id AND (x.expert < 0
                    OR x.expert >= r.num_experts OR x.rank < 0 OR x.rank >= r.top_k
                    OR NOT list_contains(r.layers, x.layer))) AS bad_routes,
               (SELECT count(*) FROM {views['expert_stats']} x WHERE x.run_id = r.run_id AND (x.expert < 0
                    OR x.expert >= r.num_experts OR NOT list_contains(r.layers, x.layer))) AS bad_stats,
               (SELECT coalesce(sum(n_tokens), 0) FROM {views['samples']} x WHERE x.run_id = r.run_id) AS sample_tokens
        FROM {views['runs']} r WHERE r.status = 'complete' ORDER BY r.run_id""").fetchall()
    for run_id, n_exp, top_k, n_tokens, n_routes, n_stats, bad_routes, bad_stats, sample_tokens in bad:
        where = f"{src}: run {run_id}"
        if n_exp is None or top_k is None or n_exp < 1 or top_k < 1 or top_k > n_exp:
            raise EsftError(f"{where} has num_experts={n_exp}, top_k={top_k}; expected 1 <= top_k <= num_experts")
        if n_routes == 0 or n_stats == 0:
            raise EsftError(f"{where} is marked complete but has {n_routes} routes and {n_stats} expert_stats rows; "
                            "re-export it with `esft export`")
        if bad_routes or bad_stats:
            raise EsftError(f"{where} has {bad_routes + bad_stats} rows with an expert id outside [0, {n_exp}), a "
                            f"rank outside [0, {top_k}) or a layer not in its layers; refusing the import")
        if n_tokens != sample_tokens:
            raise EsftError(f"{where} says n_tokens={n_tokens} but its samples hold {sample_tokens} tokens")


def import_runs(db: str | Path, src_dir: str | Path, task: str | None = None) -> list[int]:
    """Append the runs of an exported folder (complete ones only) under fresh run ids; return the new ids.

    Files are read through Arrow datasets (no path in SQL) and validated before anything is written."""
    src = Path(src_dir)
    if not (src / "runs.parquet").exists():
        raise EsftError(f"{src} is not an exported trace folder (no runs.parquet)")
    for name in (t for t in TABLES if t not in OPTIONAL_TABLES):  # the optional ones are absent from older exports
        if not (src / f"{name}.parquet").exists():
            raise EsftError(f"{src} lacks {name}.parquet")
    present = [n for n in TABLES if (src / f"{n}.parquet").exists()]
    data = {name: _read_export(src, name) for name in present}
    tag = uuid.uuid4().hex[:8]
    views = {name: f"imp_{name}_{tag}" for name in present}
    with reader(db) if Path(db).exists() else contextlib.nullcontext(duckdb.connect()) as con:
        for name in present:  # validate on a read-only connection first: a bad export never takes the write lock
            con.register(views[name], data[name])
        try:
            check_import(con, src, views)
        except duckdb.Error as e:
            raise EsftError(f"{src}: not a valid export ({str(e).splitlines()[0][:160]})") from None
    try:
        with transaction(db) as con:
            for name in present:
                con.register(views[name], data[name])
            base = next_run_id(con) - 1
            con.execute(f"CREATE TEMP TABLE idmap_{tag} AS SELECT run_id AS old, {base} + row_number() OVER "
                        f"(ORDER BY run_id) AS new FROM {views['runs']} WHERE status = 'complete'")
            new_ids = [r[0] for r in con.execute(f"SELECT new FROM idmap_{tag} ORDER BY new").fetchall()]
            if not new_ids:
                raise EsftError(f"{src} holds no complete run")
            task_sql = "?" if task else "r.task"
            con.execute(
                f"INSERT INTO runs SELECT m.new, {task_sql}, r.model, 'import', r.status, r.num_experts, r.top_k, "
                f"r.layers, r.n_samples, r.n_tokens, r.params, r.created_at, r.finished_at "
                f"FROM {views['runs']} r JOIN idmap_{tag} m ON r.run_id = m.old", [task] if task else [])
            for name in RUN_TABLES:
                if name not in views:
                    continue
                # BY NAME: optional columns (tokens.loss) missing from older exports stay NULL
                con.execute(f"INSERT INTO {name} BY NAME SELECT m.new::INTEGER AS run_id, t.* EXCLUDE (run_id) "
                            f"FROM {views[name]} t JOIN idmap_{tag} m ON t.run_id = m.old")
            con.execute(f"DROP TABLE idmap_{tag}")
    except duckdb.Error as e:
        raise EsftError(f"{src}: not a valid export ({str(e).splitlines()[0][:160]})") from None
    return new_ids


def prune_runs(db: str | Path) -> list[int]:
    """Delete the rows of failed runs (rolled-back recordings leave nothing, killed ones a 'failed' row), drop
    leftover staging folders and compact the file (CHECKPOINT rewrites row groups without deleted rows)."""
    with transaction(db) as con:
        ids = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'failed' ORDER BY run_id").fetchall()]
        for name in TABLES:
            con.execute(f"DELETE FROM {name} WHERE run_id IN (SELECT unnest(?::INTEGER[]))", [ids])
        drop_ingested(con, db)
    con = connect(db)
    try:
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return ids
