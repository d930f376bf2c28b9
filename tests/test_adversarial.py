"""Adversarial reliability cases (issue 12), each through real `esft` processes on real files.

Every test is registered with `@case(what, behaviour)`; docs/reliability.md holds the same table and
`test_reliability_doc_matches_the_cases` fails when the two differ, so the list cannot drift.
Shared state is module-scoped: one small recording of the shipped demo model (data/demo-moe) in a DuckDB file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAW = REPO / "data" / "tasks" / "law"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(REPO)}
CROSS_JOIN = "SELECT count(*) FROM range(100000000) a, range(100000000) b"

CASES: dict[str, tuple[str, str]] = {}


def case(what: str, behaviour: str):
    """Register a test as a row of the reliability table (docs/reliability.md)."""

    def deco(fn):
        CASES[fn.__name__] = (what, behaviour)
        return fn

    return deco


def esft(*args, timeout: float = 120, cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esft_core.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd, **kw)


def popen(*args, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "esft_core.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def parallel(*argvs, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Several independent commands at once (each start imports torch: seconds on a small machine)."""
    procs = [popen(*a) for a in argvs]
    out = []
    for p, a in zip(procs, argvs, strict=True):
        o, e = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(a, p.returncode, o, e))
    return out


def one_line_error(r: subprocess.CompletedProcess, cmd: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line `esft <cmd>: error: ...` that mentions every needle."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"esft {cmd}: error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def tree(path: Path) -> dict[str, int]:
    """Every file under `path` with its size (to prove that nothing was written)."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (it has opened the DB, so its query runs)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return False


def wait_until(cond, timeout: float = 60, what: str = "condition") -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adversarial")


@pytest.fixture(scope="module")
def small_data(work) -> Path:
    """The first 40 law training chats."""
    p = work / "law40.jsonl"
    p.write_text("".join((LAW / "train.jsonl").read_text().splitlines(keepends=True)[:40]))
    return p


@pytest.fixture(scope="module")
def db(work, small_data) -> Path:
    """A trace DB with one complete run of the demo model (~1,500 tokens)."""
    path = work / "traces.duckdb"
    r = esft("record", "--data", small_data, "--task", "law", "--db", path, "--max-tokens", 1500, "--quiet")
    assert r.returncode == 0, r.stderr
    return path


# -- esft sql ---------------------------------------------------------------------------------------------------
@case("`esft sql` cross join of 10^16 rows with `--timeout 2`",
      "stopped at the time limit within seconds; one line naming --timeout, exit 2")
def test_sql_time_limit(db):
    t = time.monotonic()
    r = esft("sql", "--db", db, "--timeout", 2, CROSS_JOIN, timeout=60)
    one_line_error(r, "sql", "2 s time limit", "--timeout")
    assert time.monotonic() - t < 30


@case("Ctrl-C (SIGINT) during a long `esft sql` query",
      "query interrupted at once: `esft sql: interrupted`, exit 130")
def test_sql_sigint(db):
    p = popen("sql", "--db", db, CROSS_JOIN)
    wait_until(lambda: holds_open(p.pid, db) or p.poll() is not None, what="the query to start")
    time.sleep(0.5)
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=15)
    assert time.monotonic() - t < 10
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["esft sql: interrupted"]


@case("`esft sql` ORDER BY of 10 M rows with `--memory-limit 256MB`",
      "finishes within the limit (spills to disk): peak RSS < 900 MB, 1000 rows printed")
def test_sql_memory_limit(db):
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stdout.splitlines()[-1])")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "esft_core.cli", "sql", "--db", str(db),
                        "--memory-limit", "256MB", "SELECT i, random() AS r, repeat('x', 50) AS s "
                        "FROM range(10000000) t(i) ORDER BY r"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    rc, rss_kb, last = r.stdout.split(" ", 2)
    assert rc == "0" and "1000 rows, more not shown" in last, r.stdout + r.stderr
    assert int(rss_kb) < 900_000, rss_kb


@case("`esft sql` with `SET memory_limit`, `-- x`, `;;;`, `--max-rows -3`, `--timeout 0`, `--memory-limit lots`, "
      "`--db x.parquet`",
      "settings locked; comment-only: `(no result)`; others one line naming the flag/file, exit 2")
def test_sql_bad_inputs(db, work):
    fake = work / "x.parquet"
    fake.write_text("not duckdb")
    rs = parallel(["sql", "--db", db, "SET memory_limit='10GB'"], ["sql", "--db", db, ";;;"],
                  ["sql", "--db", db, "--max-rows", -3, "SELECT 1"], ["sql", "--db", db, "--timeout", 0, "SELECT 1"],
                  ["sql", "--db", db, "--memory-limit", "lots", "SELECT 1"], ["sql", "--db", fake, "SELECT 1"],
                  ["sql", "--db", db, "-- x"])
    one_line_error(rs[0], "sql", "locked")
    one_line_error(rs[1], "sql", "empty query")
    one_line_error(rs[2], "sql", "--max-rows", "-3")
    one_line_error(rs[3], "sql", "--timeout")
    one_line_error(rs[4], "sql", "--memory-limit", "lots", "512MB")
    one_line_error(rs[5], "sql", "x.parquet", "not a DuckDB database")
    assert rs[6].returncode == 0 and rs[6].stdout.strip() == "(no result)"


@case("`esft sql --format json` of NaN / Infinity", "valid JSON: non-finite numbers become null")
def test_sql_json_nan(db):
    r = esft("sql", "--db", db, "--format", "json", "SELECT 'nan'::DOUBLE AS a, 'inf'::FLOAT AS b, 1.5 AS c")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"a": None, "b": None, "c": 1.5}]


# -- recording vs. a long reader ----------------------------------------------------------------------------------
HOLD = """import duckdb, os, sys, time
db, staged, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
while not os.path.exists(staged):  # the run is registered: the recorder runs the model now
    time.sleep(0.002)
con = duckdb.connect(db, read_only=True)
print("holding", flush=True)
while not os.path.exists(os.path.join(staged, "READY.json")):  # the recording is finished, the ingest starts
    time.sleep(0.01)
time.sleep(secs)
"""


def record_under_reader(db: Path, hold_s: float, *flags) -> tuple[subprocess.CompletedProcess, int]:
    """Record while another process opens `db` read-only as soon as the run is registered and holds it until
    `hold_s` seconds after the recording finished."""
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
    trigger = Path(f"{db}.staging") / f"run-{run_id}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(trigger), str(hold_s)],
                              stdout=subprocess.PIPE, text=True)
    r = esft("record", "--data", LAW / "train.jsonl", "--task", "law", "--db", db, "--max-tokens", 1500,
             "--quiet", *flags)
    assert holder.stdout.readline().strip() == "holding"  # the reader really held the DB during the recording
    holder.wait(timeout=60)
    return r, run_id


def run_row(db: Path, run_id: int) -> tuple:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT status, n_tokens, (SELECT count(*) FROM expert_stats e WHERE e.run_id = r.run_id) "
                           "FROM runs r WHERE run_id = ?", [run_id]).fetchone()


@case("a reader holds the DB from the start of `esft record` until 4 s after its forward passes",
      "the recorder says the DB is locked, retries the ingest and completes the run (exit 0)")
def test_record_waits_for_a_reader(db, work):
    mine = work / "wait.duckdb"
    shutil.copy(db, mine)
    r, run_id = record_under_reader(mine, 4)
    assert r.returncode == 0, r.stderr
    assert "locked by another process" in r.stderr and "retrying the ingest" in r.stderr
    status, n_tokens, n_stats = run_row(mine, run_id)
    assert status == "complete" and n_tokens >= 1500 and n_stats > 0
    assert not (Path(f"{mine}.staging") / f"run-{run_id}").exists()


@case("a reader holds the DB longer than `esft record --ingest-wait 1`",
      "the recording stays staged (READY), `esft runs` shows it waiting, `esft runs --ingest` completes it")
def test_record_queued_when_reader_outlasts_the_wait(db, work):
    mine = work / "queued.duckdb"
    shutil.copy(db, mine)
    r, run_id = record_under_reader(mine, 4, "--ingest-wait", 1)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "kept staged" in last and f"run {run_id}" in last and "esft runs" in last, last
    staged = Path(f"{mine}.staging") / f"run-{run_id}"
    assert (staged / "READY.json").is_file() and list(staged.glob("routes-*.parquet"))
    listing = esft("runs", "--db", mine)
    assert "staged, waiting for ingest" in listing.stdout, listing.stdout + listing.stderr
    r = esft("runs", "--db", mine, "--ingest")
    assert r.returncode == 0 and f"ingested staged run(s) {run_id}" in r.stderr, r.stderr
    status, n_tokens, n_stats = run_row(mine, run_id)
    assert status == "complete" and n_tokens >= 1500 and n_stats > 0
    assert not staged.exists()


# -- the reliability table --------------------------------------------------------------------------------------
def test_reliability_doc_matches_the_cases():
    """docs/reliability.md lists exactly the registered cases, with the same wording and test names."""
    text = (REPO / "docs" / "reliability.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \| `(test_\w+)` \|$", text, flags=re.M)
    documented = {name: (what, how) for what, how, name in rows}
    assert documented == CASES
    tests = {n for n in globals() if n.startswith("test_") and n != "test_reliability_doc_matches_the_cases"}
    assert tests == set(CASES), tests ^ set(CASES)


def render_table() -> str:
    """The table of docs/reliability.md (run this module as a script to print it)."""
    lines = ["| Case | Behaviour | Test |", "|---|---|---|"]
    lines += [f"| {what} | {how} | `{name}` |" for name, (what, how) in CASES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table())
