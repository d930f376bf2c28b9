"""Run one user SQL query on the trace DB with limits: read-only, no file/network access, a time limit, a memory
limit, a row cap, and a clean stop on Ctrl-C. Shared by `esft sql` and the explorer's SQL console.

Why a worker thread: DuckDB runs a query inside one C++ call, so the Python main thread sees neither SIGINT nor a
timer until the query ends (a cross join ran 506 s after Ctrl-C). The query runs in a worker thread; the main thread
waits in short slices (so KeyboardInterrupt is delivered) and calls `con.interrupt()` on a time-out or Ctrl-C,
which DuckDB honours within milliseconds.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from esft_core.errors import EsftError

DEFAULT_TIMEOUT_S = 30.0  # `esft sql --timeout`; the console uses 10 s
DEFAULT_MEMORY_LIMIT = "512MB"  # DuckDB spills sorts/joins to disk above this, or stops the query
DEFAULT_MAX_ROWS = 1000


class QueryInterrupted(EsftError):
    """The user pressed Ctrl-C while a query ran (the CLI exits 130)."""


@dataclass
class QueryLimits:
    """Limits of one console/CLI query."""

    timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "stop the query after this many seconds"})
    memory_limit: str = field(default=DEFAULT_MEMORY_LIMIT, metadata={"help": "DuckDB memory_limit, e.g. 1GB"})
    max_rows: int = field(default=DEFAULT_MAX_ROWS, metadata={"help": "rows returned at most"})
    threads: int = field(default=2, metadata={"help": "DuckDB worker threads"})

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise EsftError(f"--timeout must be a positive number of seconds, got {self.timeout_s}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise EsftError(f"--max-rows must be a positive integer, got {self.max_rows}")
        parse_memory(self.memory_limit)


def parse_memory(text: str) -> int:
    """'512MB' / '1GB' / '2GiB' → bytes; an error names what is accepted."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise EsftError(f"--memory-limit {text!r} is not a size; use e.g. 512MB, 1GB or 2GiB")
    unit = m.group(2)
    mult = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
            "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def sandbox_config(limits: QueryLimits) -> dict:
    """DuckDB config of a sandboxed connection: no external access, limits locked against SET/RESET."""
    return {"enable_external_access": False, "memory_limit": limits.memory_limit, "threads": limits.threads,
            "lock_configuration": True}


def run_query(con: duckdb.DuckDBPyConnection, query: str, limits: QueryLimits) -> tuple[list[str], pa.Table, bool]:
    """(columns, at most max_rows rows as Arrow, truncated?) of `query`; EsftError on SQL errors and time-outs,
    QueryInterrupted on Ctrl-C. `con` should come from a sandboxed connection (see `sandbox_config`)."""
    if not query.strip().strip(";").strip():
        raise EsftError("empty query; give a SELECT statement, e.g. \"SELECT * FROM runs\"")
    out: dict = {}

    cur = con.cursor()  # the query's own connection handle: interrupting or closing it leaves `con` usable

    def work() -> None:
        try:
            rel = cur.sql(query)
            if rel is None:  # a comment only, or a statement without a result
                out["result"] = ([], pa.table({}), False)
                return
            reader = rel.to_arrow_reader(batch_size=min(limits.max_rows + 1, 8192))
            batches, n = [], 0
            for batch in reader:  # stop pulling once past the cap: the rest is never computed
                batches.append(batch)
                n += batch.num_rows
                if n > limits.max_rows:
                    break
            table = pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
            out["result"] = (list(reader.schema.names), table.slice(0, limits.max_rows), n > limits.max_rows)
        except BaseException as e:  # handed to the main thread without its traceback: the traceback's frames
            out["error"] = e.with_traceback(None)  # would keep the pending result alive and the connection busy

    worker = threading.Thread(target=work, name="esft-sql", daemon=True)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C only sets a flag: the main thread then interrupts the query through DuckDB's API (a
        # KeyboardInterrupt raised inside DuckDB's call leaves the connection busy and the process aborts on close)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    t0 = time.monotonic()
    reason = None
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if stop.is_set():
                reason = "interrupt"
            elif time.monotonic() - t0 > limits.timeout_s:
                reason = "timeout"
            if reason and worker.is_alive():
                with contextlib.suppress(duckdb.Error):  # the query may be finishing at this very moment
                    cur.interrupt()
                worker.join()
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        with contextlib.suppress(duckdb.Error):
            cur.close()
    if reason == "interrupt" or stop.is_set():
        raise QueryInterrupted("query interrupted (Ctrl-C)")
    if reason == "timeout":
        raise EsftError(f"query stopped at the {limits.timeout_s:g} s time limit (--timeout); "
                        "narrow it with WHERE/LIMIT or raise --timeout")
    err = out.get("error")
    if isinstance(err, duckdb.InterruptException):
        raise EsftError(f"query stopped at the {limits.timeout_s:g} s time limit (--timeout)")
    if isinstance(err, duckdb.OutOfMemoryException):
        raise EsftError(f"query needs more than the {limits.memory_limit} memory limit (--memory-limit); "
                        "narrow it with WHERE/LIMIT or raise --memory-limit")
    if isinstance(err, duckdb.Error):
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EsftError(msg)
    if err is not None:
        raise err
    return out["result"]


@contextlib.contextmanager
def spill_dir_removed(db: str | Path):
    """DuckDB spills big sorts to `<db>.tmp/` and leaves the empty folder behind; remove it when we created it."""
    spill = Path(f"{db}.tmp")
    existed = spill.exists()
    try:
        yield
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                spill.rmdir()  # only when empty


def is_duckdb_file(path: str | Path) -> bool:
    """Whether `path` starts with DuckDB's file header (magic 'DUCK' at byte 8); an empty file counts as new."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(12)
    return len(head) == 0 or head[8:12] == b"DUCK"
