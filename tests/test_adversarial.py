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
