"""Staged runs: how a recording reaches the trace store without holding the DuckDB lock while the model runs.

The recorder inserts a 'running' `runs` row (one short transaction), holds its Arrow batches in memory
(`StagedRun.hold`) or, past the writer's flush size, stages them as Parquet parts in `<db>.staging/run-<id>/`
(`StagedRun.stage`); a run whose ingest must wait for a reader is spilled and marked READY first; it is ingested in
one transaction that also writes the aggregates and flips the status to 'complete' (`StagedRun.commit`, retried while
a long reader holds the lock; a recording that outlasts the wait stays staged and is ingested by the next writer or
`esft runs --ingest`). A `kill -9` leaves at most a 'running' row and a staging folder; the next writer settles both
(`reap_stale_runs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from esft_core import settings
from esft_core.errors import EsftError
from esft_core.files import write_json
from esft_core.procs import pid_alive
from esft_core.traces import store


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


def ingest_staged(con, run_id: int, run_dir: Path, memory: dict[str, list[pa.Table]] | None = None
                  ) -> tuple[int, int]:
    """Ingest a staged run's parts (Parquet parts in `run_dir` plus the recorder's in-memory tables `memory`) inside
    the caller's transaction, write its aggregates and mark it complete; return (n_samples, n_tokens).

    The parts are read through Arrow registered with DuckDB, so no path is ever pasted into SQL (a DB path with `'`
    or glob characters such as `t[1].duckdb` works). Samples, tokens, routes and a single expert_tokens part are
    inserted one part at a time from a `pa.Table`: DuckDB then writes their row groups straight into the file during
    the insert (optimistic writes); from a registered dataset (or a dataset scanner's reader) it writes every row
    again at the checkpoint (measured: twice the ingest time)."""
    import pyarrow.dataset as ds

    files = staged_parts(run_dir)
    memory = {k: v for k, v in (memory or {}).items() if v}
    names = sorted(set(files) | set(memory))

    def tables(name: str):  # every part of `name` as an Arrow table, one in memory at a time
        for f in files.get(name, []):
            yield pq.read_table(f)
        if name in memory:
            yield pa.concat_tables(memory[name])

    def insert_parts(name: str, sql: str, params=()) -> None:  # sql selects FROM {src}
        view = f"part_{name}_{int(run_id)}"
        for t in tables(name):
            con.register(view, t)
            try:
                con.execute(sql.format(src=view), list(params))
            finally:
                con.unregister(view)

    views: dict[str, str] = {}
    for name in names:
        parts = [ds.dataset(files[name], format="parquet")] if name in files else []
        if name in memory:
            parts.append(ds.dataset(pa.concat_tables(memory[name])))
        views[name] = f"staged_{name}_{int(run_id)}"
        con.register(views[name], parts[0] if len(parts) == 1 else ds.dataset(parts))
    n_parts = {name: len(files.get(name, [])) + (name in memory) for name in names}
    try:
        for name in ("samples", "tokens"):
            if name in views:
                insert_parts(name, f"INSERT INTO {name} BY NAME SELECT * FROM {{src}}")
        if "routes" in views:
            cols = ", ".join(store.ARROW_SCHEMAS["routes"].names)
            insert_parts("routes", f"INSERT INTO routes SELECT {cols} FROM {{src}}")
        # older staged runs: routes carry each row's token_id and expert_tokens is summed from them here
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
            if n_parts["expert_tokens"] == 1:
                insert_parts("expert_tokens", """INSERT INTO expert_tokens SELECT ?, layer, expert, token_id,
                             token_text, n, gate_sum FROM {src}""", [run_id])
            else:
                con.execute(f"""INSERT INTO expert_tokens SELECT ?, layer, expert, token_id, any_value(token_text),
                            sum(n), sum(gate_sum) FROM {views['expert_tokens']} GROUP BY layer, expert, token_id
                            ORDER BY layer, expert""", [run_id])
        store.write_aggregates(con, run_id, routes_rel, with_token_ids=has_ids, stats_rel=stats)
        return store.complete_run(con, run_id)
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
            for name in store.PROGRESSIVE_TABLES:  # rows a progressive ingest had already written
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
    with store.transaction(db, timeout=timeout) as con:
        before = {r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchall()}
        reap_stale_runs(con, db)
        after = {r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchall()}
    with store.reader(db) as con:
        drop_ingested(con, db)
    return sorted(after - before)




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
        with store.transaction(self.db) as con:
            reap_stale_runs(con, self.db)
            self.run_id = store.next_run_id(con)
            store.insert_run(con, self.run_id, task, model, source, "running", num_experts, top_k, layers, params)
        with contextlib.suppress(EsftError), store.reader(self.db, timeout=1.0) as con:
            drop_ingested(con, self.db)
        self.dir = staging_root(self.db) / f"run-{self.run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = {name: 0 for name in store.ARROW_SCHEMAS}
        self.part_prefix = ""  # torchrun ranks stage under r<rank>- so their part names never collide
        self.n_ingested = 0  # sample parts already inserted by ingest_parts / insert_now
        self.memory: dict[str, list[pa.Table]] = {}  # tables held for the final ingest (hold)

    @classmethod
    def attach(cls, db: str | Path, run_id: int, part_prefix: str) -> StagedRun:
        """Another process's handle on a 'running' run (a torchrun rank > 0): stages parts only; rank 0 commits."""
        self = cls.__new__(cls)
        self.db, self.run_id, self.part_prefix = Path(db), run_id, part_prefix
        self.dir = staging_root(self.db) / f"run-{run_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = {name: 0 for name in store.ARROW_SCHEMAS}
        self.n_ingested = 0
        self.memory = {}
        return self

    def _staged_table(self, name: str, t: pa.Table) -> pa.Table:
        """`t` with this run's id and the staged schema (column order and types of store.ARROW_SCHEMAS)."""
        t = t.set_column(0, "run_id", pa.repeat(pa.scalar(self.run_id, pa.int32()), t.num_rows))
        schema = store.ARROW_SCHEMAS[name]
        if name == "routes" and "token_id" in t.column_names:  # staging only: lets expert_tokens skip a join
            schema = schema.append(pa.field("token_id", pa.int32()))
        if name == "tokens" and "loss" in t.column_names:  # optional: the recorder's loss flags
            schema = schema.append(pa.field("loss", pa.bool_()))
        return t.select(schema.names).cast(schema)

    def stage(self, tables: dict[str, pa.Table], part_prefix: str | None = None) -> None:
        """Write one Parquet part per table (a few MB each); the DB file is not touched."""
        prefix = self.part_prefix if part_prefix is None else part_prefix
        for name, t in tables.items():
            if t.num_rows == 0:
                continue
            path = self.dir / f"{prefix}{name}-{self.n_parts:06d}.parquet"
            # dictionary encoding and statistics halve the write speed and buy nothing for a file read once
            pq.write_table(self._staged_table(name, t), path.with_suffix(".tmp"), compression="lz4",
                           use_dictionary=["token_text"], write_statistics=False)
            os.replace(path.with_suffix(".tmp"), path)  # a part is either whole or absent
            self.n_rows[name] += t.num_rows
        self.n_parts += 1

    def hold(self, tables: dict[str, pa.Table]) -> None:
        """Keep tables in memory for the final ingest (no Parquet round trip). A run that dies before its commit
        loses them, as it would lose its 'running' status; commit() spills them to Parquet parts (and marks the
        run READY) before it waits for a reader's lock, so a finished recording is never lost."""
        for name, t in tables.items():
            if t.num_rows:
                self.memory.setdefault(name, []).append(self._staged_table(name, t))
                self.n_rows[name] += t.num_rows

    def spill(self) -> None:
        """Write the held tables as Parquet parts (before waiting for the DB, or queueing the run)."""
        held, self.memory = self.memory, {}
        for name, ts in held.items():
            self.n_rows[name] -= sum(t.num_rows for t in ts)
            self.stage({name: pa.concat_tables(ts)})

    def insert_now(self, tables: dict[str, pa.Table]) -> bool:
        """Progressive ingest of one flush: insert its samples/tokens/routes (and parts spilled by earlier flushes)
        into the DB in one short transaction, straight from Arrow; hold its other tables for the commit. Returns
        False, touching nothing, when another process holds the DB (the caller stages the flush instead)."""
        prog = {n: self._staged_table(n, t) for n, t in tables.items() if n in store.PROGRESSIVE_TABLES and t.num_rows}
        spilled = {n: sorted(self.dir.glob(f"{self.part_prefix}{n}-*.parquet")) for n in store.PROGRESSIVE_TABLES}
        try:
            with store.transaction(self.db, timeout=0.0) as con:
                for name, t in prog.items():
                    view = f"flush_{name}_{self.run_id}"
                    con.register(view, t)
                    con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM {view}")
                    con.unregister(view)
                self._insert_parts(con, spilled)
        except store.DbLocked:
            return False
        self._drop_parts(spilled)
        self.n_ingested += ("samples" in prog) + len(spilled["samples"])
        self.hold({n: t for n, t in tables.items() if n not in store.PROGRESSIVE_TABLES})
        return True

    def _insert_parts(self, con, parts: dict[str, list[Path]]) -> None:
        for name, files in parts.items():
            # BY NAME: optional staged columns (tokens.loss); routes' staging-only token_id left out
            cols = ", ".join(store.ARROW_SCHEMAS[name].names) if name == "routes" else "*"
            view = f"parts_{name}_{self.run_id}"
            for f in files:  # a pa.Table per part: optimistic writes (see ingest_staged)
                con.register(view, pq.read_table(f))
                con.execute(f"INSERT INTO {name} BY NAME SELECT {cols} FROM {view}")
                con.unregister(view)

    @staticmethod
    def _drop_parts(parts: dict[str, list[Path]]) -> None:
        for files in parts.values():
            for f in files:
                f.unlink()

    def ingest_parts(self) -> None:
        """Progressive ingest of Parquet parts (single process): insert the staged samples/tokens/routes parts now,
        in one short transaction, and delete them; the commit then only writes the aggregates. The run stays
        'running' (scores and selection ignore it); its rows are deleted if it fails or its process dies
        (reap_stale_runs)."""
        parts = {n: sorted(self.dir.glob(f"{self.part_prefix}{n}-*.parquet")) for n in store.PROGRESSIVE_TABLES}
        if not any(parts.values()):
            return
        with store.transaction(self.db) as con:
            self._insert_parts(con, parts)
        self._drop_parts(parts)
        self.n_ingested += len(parts["samples"])

    def commit(self) -> tuple[int, int]:
        """Ingest the staged parts and held tables, write the aggregates and mark the run complete, all in one
        transaction. While another process holds the DB, the held tables are spilled to Parquet and the run marked
        READY first, so that a recorder that gives up (or is killed) while waiting leaves a run any writer ingests."""
        if not any(self.dir.glob("*samples-*.parquet")) and not self.n_ingested and not self.memory.get("samples"):
            self.fail("no samples were recorded")
            raise EsftError("no tokens were recorded (empty data or --max-tokens 0)")
        if not self.memory:
            write_json(self.dir / READY, {"run_id": self.run_id, "rows": self.n_rows, "pid": os.getpid()})
        deadline = time.monotonic() + self.ingest_wait
        told = False
        while True:
            try:  # the first try does not wait, so a wait is announced before it starts
                wait = min(5.0, max(0.0, deadline - time.monotonic())) if told else 0.0
                with store.transaction(self.db, timeout=wait) as con:
                    counts = ingest_staged(con, self.run_id, self.dir, self.memory)
                break
            except EsftError as e:
                if "locked by another process" not in str(e):
                    raise
                if self.memory:
                    self.spill()
                    write_json(self.dir / READY, {"run_id": self.run_id, "rows": self.n_rows, "pid": os.getpid()})
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
        self.memory = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        return counts

    def fail(self, error: str) -> None:
        """Mark the run failed (its staged rows are discarded, nothing else is written); a queued run is kept."""
        if self.queued:
            return
        self.memory = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(EsftError), store.transaction(self.db) as con:
            con.execute("UPDATE runs SET status = 'failed', finished_at = now(), "
                        "params = json_merge_patch(params, ?) WHERE run_id = ?",
                        [json.dumps({"error": error[:500]}), self.run_id])
            if self.n_ingested:
                for name in store.PROGRESSIVE_TABLES:
                    con.execute(f"DELETE FROM {name} WHERE run_id = ?", [self.run_id])


