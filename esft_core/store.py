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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from esft_core.errors import EsftError

TABLES = ("runs", "samples", "tokens", "routes", "expert_stats", "expert_tokens", "sample_expert_stats")
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
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS loss BOOLEAN;
"""
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
}

LOCK_WORDS = ("lock", "Conflicting", "being used by another process")


def _is_lock_error(e: Exception) -> bool:
    return isinstance(e, duckdb.IOException) and any(w in str(e) for w in LOCK_WORDS)


def connect(db: str | Path, read_only: bool = False, timeout: float = 30.0,
            external_access: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the trace DB; retry for up to `timeout` s while another process holds the lock.

    read_only=True requires the file to exist (a reader never creates a DB). external_access=False forbids
    read_parquet/COPY/ATTACH and friends, and locks that setting (used by `esft sql`).
    A read-write connection creates the schema when missing.
    """
    db = Path(db)
    if read_only and not db.exists():
        raise EsftError(f"trace database {db} does not exist")
    if not read_only and db.parent and not db.parent.exists():
        raise EsftError(f"directory {db.parent} of trace database {db.name} does not exist")
    config: dict = {}
    if not external_access:
        config = {"enable_external_access": False, "lock_configuration": True}
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only, config=config)
            break
        except duckdb.IOException as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                what = "locked by another process" if _is_lock_error(e) else str(e).splitlines()[0]
                raise EsftError(f"cannot open trace database {db}: {what}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except duckdb.Error as e:
            raise EsftError(f"cannot open trace database {db}: {str(e).splitlines()[0]}") from None
    if not read_only:
        con.execute(SCHEMA)
    return con


@contextlib.contextmanager
def reader(db: str | Path, timeout: float = 30.0, external_access: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-only connection (closed on exit, so writers are not blocked)."""
    con = connect(db, read_only=True, timeout=timeout, external_access=external_access)
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


def write_aggregates(con, run_id: int, routes_rel: str = "routes", with_token_ids: bool = False) -> None:
    """Fill expert_stats and expert_tokens of `run_id` from its rows, in SQL.

    `routes_rel` may be any relation with the routes columns: the official importer passes its Arrow table (float64
    weights, so gate sums are not rounded through FLOAT); the recorder passes its staged Parquet parts, which also
    carry each row's token_id (with_token_ids), so expert_tokens needs no join of routes with tokens.
    """
    # per (sample, layer, expert) first (kept as sample_expert_stats: bootstrap and per-sample views read it),
    # then weighted by 1/L_j: the join touches the small pre-aggregate only
    con.execute(f"""
        INSERT INTO sample_expert_stats
        SELECT $run, sample_id, layer, expert, count(*), sum(weight::DOUBLE)
        FROM {routes_rel} WHERE run_id = $run GROUP BY sample_id, layer, expert
        ORDER BY sample_id, layer, expert""", {"run": run_id})
    con.execute("""
        INSERT INTO expert_stats
        SELECT $run, p.layer, p.expert, sum(p.n_selected), sum(p.gate_sum), sum(p.n_selected / s.n_tokens),
               sum(p.gate_sum / s.n_tokens)
        FROM sample_expert_stats p JOIN samples s ON s.run_id = $run AND s.sample_id = p.sample_id
        WHERE p.run_id = $run
        GROUP BY p.layer, p.expert ORDER BY p.layer, p.expert""", {"run": run_id})
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


def pid_alive(pid: int | None) -> bool:
    """Whether local process `pid` runs (a zombie — finished, not yet reaped — counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def reap_stale_runs(con, db: str | Path) -> list[int]:
    """Mark 'running' runs of dead local writer processes as 'failed' and drop their staging folders."""
    host = socket.gethostname()
    stale = []
    for run_id, params in con.execute("SELECT run_id, params FROM runs WHERE status = 'running'").fetchall():
        p = json.loads(params or "{}")
        if p.get("host") == host and p.get("pid") and not pid_alive(int(p["pid"])):
            stale.append(run_id)
            con.execute("UPDATE runs SET status = 'failed', finished_at = now() WHERE run_id = ?", [run_id])
            shutil.rmtree(staging_root(db) / f"run-{run_id}", ignore_errors=True)
    return stale


class StagedRun:
    """A run being recorded: 'running' row now, Parquet parts while recording, one ingest transaction at the end."""

    def __init__(self, db: str | Path, task: str, model: str, num_experts: int, top_k: int, layers: list[int],
                 params: dict, source: str = "record"):
        self.db = Path(db)
        params = {**params, "pid": os.getpid(), "host": socket.gethostname()}
        with transaction(self.db) as con:
            reap_stale_runs(con, self.db)
            self.run_id = next_run_id(con)
            insert_run(con, self.run_id, task, model, source, "running", num_experts, top_k, layers, params)
        self.dir = staging_root(self.db) / f"run-{self.run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = {name: 0 for name in ARROW_SCHEMAS}

    def stage(self, tables: dict[str, pa.Table]) -> None:
        """Write one Parquet part per table (a few MB each); the DB file is not touched."""
        for name, t in tables.items():
            if t.num_rows == 0:
                continue
            path = self.dir / f"{name}-{self.n_parts:06d}.parquet"
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

    def commit(self) -> tuple[int, int]:
        """Ingest the staged parts, write the aggregates and mark the run complete, all in one transaction."""
        if self.n_rows["samples"] == 0:
            self.fail("no samples were recorded")
            raise EsftError("no tokens were recorded (empty data or --max-tokens 0)")
        parts = {name: str(self.dir / f"{name}-*.parquet") for name in ARROW_SCHEMAS}
        with transaction(self.db) as con:
            for name, cols in (("samples", "*"), ("tokens", "*"), ("routes", ", ".join(ARROW_SCHEMAS["routes"].names))):
                if self.n_rows[name]:
                    con.execute(f"INSERT INTO {name} BY NAME SELECT {cols} FROM read_parquet(?)", [parts[name]])
            staged = con.execute("SELECT * FROM read_parquet(?) LIMIT 0", [parts["routes"]]).description
            has_ids = any(d[0] == "token_id" for d in staged)
            glob = parts["routes"].replace("'", "''")
            con.execute(f"CREATE TEMP VIEW staged_routes AS SELECT * FROM read_parquet('{glob}')")
            write_aggregates(con, self.run_id, "staged_routes" if has_ids else "routes", with_token_ids=has_ids)
            con.execute("DROP VIEW staged_routes")
            counts = complete_run(con, self.run_id)
        shutil.rmtree(self.dir, ignore_errors=True)
        return counts

    def fail(self, error: str) -> None:
        """Mark the run failed (its staged rows are discarded, nothing else is written)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(EsftError), transaction(self.db) as con:
            con.execute("UPDATE runs SET status = 'failed', finished_at = now(), "
                        "params = json_merge_patch(params, ?) WHERE run_id = ?",
                        [json.dumps({"error": error[:500]}), self.run_id])


# -- queries shared by scores/select/CLI ----------------------------------------------------------------------
def complete_runs(con, task: str, run_ids: list[int] | None = None) -> list[tuple]:
    """(run_id, num_experts, top_k, layers, n_samples, n_tokens) of the complete runs of `task`; errors say why none."""
    rows = con.execute(
        "SELECT run_id, num_experts, top_k, layers, n_samples, n_tokens FROM runs "
        "WHERE task = ? AND status = 'complete' ORDER BY run_id", [task]).fetchall()
    if run_ids:
        rows = [r for r in rows if r[0] in set(run_ids)]
        missing = sorted(set(run_ids) - {r[0] for r in rows})
        if missing:
            raise EsftError(f"run(s) {', '.join(map(str, missing))} are not complete runs of task '{task}'")
    if not rows:
        tasks = [t for (t,) in con.execute(
            "SELECT DISTINCT task FROM runs WHERE status = 'complete' ORDER BY task").fetchall()]
        known = f"; known tasks: {', '.join(tasks)}" if tasks else "; the database holds no complete runs"
        raise EsftError(f"unknown task '{task}' (no complete run){known}")
    if len({(r[1], r[2]) for r in rows}) > 1:
        raise EsftError(f"runs of task '{task}' differ in num_experts/top_k; pick runs with --run")
    if sum(r[5] for r in rows) == 0:
        raise EsftError(f"task '{task}' has no tokens (empty run)")
    return rows


# -- Parquet export / import (merge runs recorded on many machines) --------------------------------------------
def export_runs(db: str | Path, run_ids: list[int], out_dir: str | Path) -> dict[str, int]:
    """Write the rows of `run_ids` as <out_dir>/<table>.parquet (one file per table); return row counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    ids = ", ".join(str(int(r)) for r in run_ids)
    with reader(db) as con:
        for name in TABLES:
            tmp = out / f"{name}.parquet.tmp"
            con.execute(f"COPY (SELECT * FROM {name} WHERE run_id IN ({ids})) TO '{tmp}' "
                        "(FORMAT parquet, COMPRESSION zstd)")
            os.replace(tmp, out / f"{name}.parquet")
            counts[name] = int(con.execute(f"SELECT count(*) FROM {name} WHERE run_id IN ({ids})").fetchone()[0])
    return counts


def import_runs(db: str | Path, src_dir: str | Path, task: str | None = None) -> list[int]:
    """Append the runs of an exported folder (complete ones only) under fresh run ids; return the new ids."""
    src = Path(src_dir)
    if not (src / "runs.parquet").exists():
        raise EsftError(f"{src} is not an exported trace folder (no runs.parquet)")
    for name in TABLES[:-1]:  # sample_expert_stats is optional (older exports)
        if not (src / f"{name}.parquet").exists():
            raise EsftError(f"{src} lacks {name}.parquet")
    tag = uuid.uuid4().hex[:8]
    with transaction(db) as con:
        base = next_run_id(con) - 1
        con.execute(f"CREATE TEMP TABLE idmap_{tag} AS SELECT run_id AS old, {base} + row_number() OVER "
                    f"(ORDER BY run_id) AS new FROM read_parquet(?) WHERE status = 'complete'",
                    [str(src / "runs.parquet")])
        new_ids = [r[0] for r in con.execute(f"SELECT new FROM idmap_{tag} ORDER BY new").fetchall()]
        if not new_ids:
            raise EsftError(f"{src} holds no complete run")
        task_sql = "?" if task else "r.task"
        con.execute(
            f"INSERT INTO runs SELECT m.new, {task_sql}, r.model, 'import', r.status, r.num_experts, r.top_k, "
            f"r.layers, r.n_samples, r.n_tokens, r.params, r.created_at, r.finished_at "
            f"FROM read_parquet(?) r JOIN idmap_{tag} m ON r.run_id = m.old",
            ([task] if task else []) + [str(src / "runs.parquet")])
        for name in RUN_TABLES:
            if not (src / f"{name}.parquet").exists():
                continue
            con.execute(f"INSERT INTO {name} BY NAME SELECT m.new::INTEGER AS run_id, t.* EXCLUDE (run_id) "
                        f"FROM read_parquet(?) t JOIN idmap_{tag} m ON t.run_id = m.old",
                        [str(src / f"{name}.parquet")])
        con.execute(f"DROP TABLE idmap_{tag}")
    return new_ids
