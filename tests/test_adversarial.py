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


def esft(*args, timeout: float = 120, cwd: Path = REPO, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esft_core.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=cwd, **kw)


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


BATCH = """import contextlib, io, json, sys, time
from esft_core.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    t = time.monotonic()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 2
    results.append([code, out.getvalue(), err.getvalue(), time.monotonic() - t])
print(json.dumps(results))
"""


def batch(*argvs, timeout: float = 180, cwd: Path = REPO) -> list[subprocess.CompletedProcess]:
    """Several `esft` commands run one after another by `esft_core.cli.main` in ONE real subprocess: the same code
    path as the console script, but the interpreter start and the torch/duckdb imports (~2 s of CPU each) are
    paid once. Used for commands that fail in validation; concurrency tests use real parallel processes."""
    r = subprocess.run([sys.executable, "-c", BATCH, json.dumps([[str(a) for a in argv] for argv in argvs])],
                       capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    out = []
    for a, (code, o, e, elapsed) in zip(argvs, json.loads(r.stdout.splitlines()[-1]), strict=True):
        out.append(subprocess.CompletedProcess(a, code, o, e))
        out[-1].elapsed = elapsed  # seconds this command took
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
    RECORDED["stderr"] = r.stderr
    return path


RECORDED: dict[str, str] = {}


@case("`esft record --quiet`", "prints nothing on stderr (not even transformers' \"Loading weights\" bar)")
def test_record_quiet(db):
    assert RECORDED["stderr"] == ""


# -- esft sql ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sql_runs(db, work) -> dict[str, subprocess.CompletedProcess]:
    """Every one-shot `esft sql` case, run by one batch process (see `batch`); the DB bytes before it."""
    fake = work / "x.parquet"
    fake.write_text("not duckdb")
    cmds = {
        "time_limit": ["--timeout", 2, CROSS_JOIN],
        "set": ["SET memory_limit='10GB'"], "semicolons": [";;;"], "max_rows": ["--max-rows", -3, "SELECT 1"],
        "timeout0": ["--timeout", 0, "SELECT 1"], "memory_lots": ["--memory-limit", "lots", "SELECT 1"],
        "comment": ["-- x"],
        "json": ["--format", "json", "SELECT 'nan'::DOUBLE AS a, 'inf'::FLOAT AS b, 1.5 AS c"],
        "read_file": ["SELECT * FROM read_csv('/etc/passwd')"],
        "attach": [f"ATTACH '{work / 'other.duckdb'}' AS o"],
        "copy": [f"COPY runs TO '{work / 'leak.csv'}'"],
        "delete": ["DELETE FROM runs"],
    }
    before = db.read_bytes()
    rs = batch(*[["sql", "--db", db, *c] for c in cmds.values()], ["sql", "--db", fake, "SELECT 1"])
    return {**dict(zip([*cmds, "parquet"], rs, strict=True)), "db_before": before}


@case("`esft sql` cross join of 10^16 rows with `--timeout 2`",
      "stopped at the time limit within seconds; one line naming --timeout, exit 2")
def test_sql_time_limit(sql_runs):
    r = sql_runs["time_limit"]
    one_line_error(r, "sql", "2 s time limit", "--timeout")
    assert r.elapsed < 20


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
      "finishes within the limit (spills to disk): peak RSS < 900 MB, 1000 rows printed, no spill folder left")
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
    assert not Path(f"{db}.tmp").exists()  # DuckDB's spill folder is not left next to the DB


@case("`esft sql` with `SET memory_limit`, `-- x`, `;;;`, `--max-rows -3`, `--timeout 0`, `--memory-limit lots`, "
      "`--db x.parquet`",
      "settings locked; comment-only: `(no result)`; others one line naming the flag/file, exit 2")
def test_sql_bad_inputs(sql_runs):
    one_line_error(sql_runs["set"], "sql", "locked")
    one_line_error(sql_runs["semicolons"], "sql", "empty query")
    one_line_error(sql_runs["max_rows"], "sql", "--max-rows", "-3")
    one_line_error(sql_runs["timeout0"], "sql", "--timeout")
    one_line_error(sql_runs["memory_lots"], "sql", "--memory-limit", "lots", "512MB")
    one_line_error(sql_runs["parquet"], "sql", "x.parquet", "not a DuckDB database")
    assert sql_runs["comment"].returncode == 0 and sql_runs["comment"].stdout.strip() == "(no result)"


@case("`esft sql --format json` of NaN / Infinity", "valid JSON: non-finite numbers become null")
def test_sql_json_nan(sql_runs):
    r = sql_runs["json"]
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
    listing, r = batch(["runs", "--db", mine], ["runs", "--db", mine, "--ingest"])
    assert "staged, waiting for ingest" in listing.stdout, listing.stdout + listing.stderr
    assert r.returncode == 0 and f"ingested staged run(s) {run_id}" in r.stderr, r.stderr
    status, n_tokens, n_stats = run_row(mine, run_id)
    assert status == "complete" and n_tokens >= 1500 and n_stats > 0
    assert not staged.exists()


# -- training and evaluation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experts_cfg(work) -> Path:
    p = work / "experts.json"
    p.write_text(json.dumps({"experts": {"1": [0, 1], "2": [3]}, "shared_experts": False,
                             "non_expert_modules": False}))
    return p


def train_args(data: Path, cfg: Path, out: Path, *more) -> list:
    return ["train", "--data", data, "--experts", cfg, "--out", out, "--seq-len", 128, "--batch-size", 2,
            "--no-progress", *more]


@pytest.fixture(scope="module")
def input_runs(work, small_data, experts_cfg) -> dict[str, subprocess.CompletedProcess]:
    """Every bad-input case of train/eval/record, run by one batch process (see `batch`)."""
    mixed = work / "mixed.jsonl"
    mixed.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                     '{"text": "plain"}\n')
    latin = work / "latin1.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    deep = work / "deep.jsonl"
    deep.write_text("[" * 100000 + "]" * 100000 + "\n")
    bare = work / "bare_model"
    bare.mkdir(exist_ok=True)
    shutil.copy(REPO / "data" / "demo-moe" / "config.json", bare / "config.json")
    (work / "existing.json").write_text("keep")
    never, ev = work / "never", ["eval", "--data", LAW / "eval.jsonl"]
    cmds = {
        "train_seq": train_args(small_data, experts_cfg, never, "--seq-len", 100000),
        "eval_seq": [*ev, "--seq-len", 100000], "eval_seq_neg": [*ev, "--seq-len", -1],
        "eval_seq_0": [*ev, "--seq-len", 0],
        "record_seq": ["record", "--data", small_data, "--task", "x", "--db", work / "never.duckdb",
                       "--seq-len", 100000],
        "train_mem": train_args(small_data, experts_cfg, never, "--seq-len", 1024, "--batch-size", 100000),
        "lr_inf": train_args(small_data, experts_cfg, work / "n1", "--lr", "inf"),
        "wd_nan": train_args(small_data, experts_cfg, work / "n2", "--weight-decay", "nan"),
        "beta1": train_args(small_data, experts_cfg, work / "n3", "--beta1", 1.5),
        "lr_huge": train_args(small_data, experts_cfg, work / "nan_run", "--lr", 1e30, "--steps", 6),
        "eval_nope": train_args(small_data, experts_cfg, work / "e1", "--eval-data", work / "nope.jsonl"),
        "eval_mixed": train_args(small_data, experts_cfg, work / "e2", "--eval-data", mixed),
        "latin": ["record", "--data", latin, "--task", "x", "--db", work / "bad1.duckdb"],
        "deep": ["record", "--data", deep, "--task", "x", "--db", work / "bad2.duckdb"],
        "bare": ["eval", "--model", bare, "--data", LAW / "eval.jsonl"],
        "existing": [*ev, "--out", work / "existing.json"],
    }
    return dict(zip(cmds, batch(*cmds.values()), strict=True))


@case("`esft eval` on a chat sample with a ~40,000-token prompt, `--seq-len 128`",
      "the prompt is cut to its last tokens for generation (`truncated_prompts: 1`), finishes in seconds")
def test_eval_truncates_long_prompts(work):
    data = work / "huge_prompt.jsonl"
    huge = {"messages": [{"role": "user", "content": "clause " * 40000 + "Is this binding?"},
                         {"role": "assistant", "content": "yes"}]}
    small = {"messages": [{"role": "user", "content": "Is this binding?"}, {"role": "assistant", "content": "no"}]}
    data.write_text(json.dumps(huge) + "\n" + json.dumps(small) + "\n")
    out = work / "huge_eval.json"
    r = esft("eval", "--data", data, "--seq-len", 128, "--max-new-tokens", 4, "--out", out, timeout=120)
    assert r.returncode == 0, r.stderr
    task = json.loads(out.read_text())["tasks"]["huge_prompt"]
    assert task["n"] == 2 and task["truncated_prompts"] == 1


@case("`--seq-len 100000` (model has 1,024 positions) for train/eval/record; eval `--seq-len -1` and `0`; "
      "train `--batch-size 100000 --seq-len 1024`",
      "one line naming --seq-len and the accepted maximum (or the memory needed vs. free), exit 2, nothing written")
def test_seq_len_and_memory_validated(work, input_runs):
    for key, cmd in [("train_seq", "train"), ("eval_seq", "eval"), ("eval_seq_neg", "eval"), ("eval_seq_0", "eval"),
                     ("record_seq", "record")]:
        line = one_line_error(input_runs[key], cmd, "--seq-len")
        assert ("1024 positions" in line and "<= 1024" in line) or ">= 2" in line, line
    one_line_error(input_runs["train_mem"], "train", "--batch-size/--seq-len", "GiB", "free")
    assert not (work / "never").exists() and not (work / "never.duckdb").exists()


@case("two `esft train` processes with the same `--out`",
      "the second is refused at once (`in use by another training process (pid N ...)`), exit 2; the first runs on")
def test_two_trainers_one_out_dir(work, small_data, experts_cfg):
    out = work / "shared_run"
    first = popen(*train_args(small_data, experts_cfg, out, "--steps", 2000))
    try:
        wait_until(lambda: (out / "run.json").is_file() or first.poll() is not None, what="the first trainer")
        assert first.poll() is None, first.communicate()[1]
        second = esft(*train_args(small_data, experts_cfg, out, "--steps", 2000))
        one_line_error(second, "train", str(out), "in use by another training process", f"pid {first.pid}")
        assert first.poll() is None  # untouched by the refused second trainer
        assert json.loads((out / "run.json").read_text())["status"] == "running"
    finally:
        first.kill()
        first.wait()


@case("`--lr inf`, `--weight-decay nan`, `--beta1 1.5` / `--lr 1e30`",
      "refused before loading the model (one line naming the flag and the range) / stops at the first non-finite "
      "loss: run.json `failed`, no adapter written, exit 2")
def test_non_finite_training(work, input_runs):
    one_line_error(input_runs["lr_inf"], "train", "--lr", "finite", "inf")
    one_line_error(input_runs["wd_nan"], "train", "--weight-decay", "finite", "nan")
    one_line_error(input_runs["beta1"], "train", "--beta1", "[0, 1)", "1.5")
    assert not any((work / n).exists() for n in ("n1", "n2", "n3"))
    one_line_error(input_runs["lr_huge"], "train", "non-finite loss", "no adapter written")
    run = json.loads((work / "nan_run" / "run.json").read_text())
    assert run["status"] == "failed" and "non-finite loss" in run["error"]
    assert not (work / "nan_run" / "adapter").exists()


@pytest.fixture(scope="module")
def done_run(work, small_data, experts_cfg) -> Path:
    """A complete 4-step run with a checkpoint at step 2."""
    out = work / "done_run"
    r = esft(*train_args(small_data, experts_cfg, out, "--steps", 4, "--save-every", 2))
    assert r.returncode == 0, r.stderr
    return out


@case("`--resume` on a missing directory; `--resume --steps 6` on a complete 4-step run",
      "one line each (`holds no run to resume` / `complete run of 4 steps`), exit 2, nothing written")
def test_resume_refusals(work, small_data, experts_cfg, done_run):
    before = tree(done_run)
    rs = batch(train_args(small_data, experts_cfg, work / "missing", "--resume", "--steps", 4),
                  train_args(small_data, experts_cfg, done_run, "--resume", "--steps", 6, "--save-every", 2))
    one_line_error(rs[0], "train", "--resume", "no run to resume")
    one_line_error(rs[1], "train", "complete run of 4 steps", "--steps 6")
    assert not (work / "missing").exists() and tree(done_run) == before


@case("`--resume` of a killed run whose metrics.jsonl ends in a torn line",
      "the torn line is dropped, training resumes from the last checkpoint and completes (steps 1..4 logged once)")
def test_resume_after_torn_metrics_line(work, small_data, experts_cfg, done_run):
    out = work / "torn_run"
    shutil.copytree(done_run, out)  # as a kill -9 after step 3 leaves it: running, checkpoint 2, half a line
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "running", "step": 3}))
    shutil.rmtree(out / "adapter")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:20].replace('"step": 3', '"step": 4'))
    r = esft(*train_args(small_data, experts_cfg, out, "--steps", 4, "--save-every", 2, "--resume"))
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["status"] == "complete" and (out / "adapter").is_dir()


@case("`esft train --eval-data nope.jsonl` / an eval file mixing chat and text records",
      "refused before step 1 (one line naming the file and line), exit 2, no run directory")
def test_eval_files_checked_before_training(work, input_runs):
    one_line_error(input_runs["eval_nope"], "train", "nope.jsonl", "does not exist")
    one_line_error(input_runs["eval_mixed"], "train", "mixed.jsonl line 2", "text record in a chat file")
    assert not (work / "e1").exists() and not (work / "e2").exists()


@case("non-UTF-8 JSONL, JSON nested 100,000 deep, a model directory with only config.json, `esft eval --out` "
      "onto an existing file",
      "one line naming the file (and line/byte) or `--force`, exit 2, nothing written")
def test_bad_files_one_line(work, input_runs):
    one_line_error(input_runs["latin"], "record", "latin1.jsonl line 2", "not UTF-8")
    one_line_error(input_runs["deep"], "record", "deep.jsonl line 1", "nested too deeply")
    one_line_error(input_runs["bare"], "eval", "bare_model", "no weights")
    one_line_error(input_runs["existing"], "eval", "existing.json", "--force")
    assert (work / "existing.json").read_text() == "keep"
    assert not (work / "bad1.duckdb").exists() and not (work / "bad2.duckdb").exists()


# -- export / import ----------------------------------------------------------------------------------------------
@case("recording into `it's [1]/t[1].duckdb`; `esft export --out` a folder with `'`; a second export there",
      "record and export work (paths never pasted into SQL); the second export is refused without `--force`")
def test_paths_with_quotes_and_globs(work, small_data):
    folder = work / "it's [1]"
    folder.mkdir()
    db = folder / "t[1].duckdb"
    r = esft("record", "--data", small_data, "--task", "law", "--db", db, "--max-tokens", 300, "--quiet")
    assert r.returncode == 0, r.stderr
    out = folder / "exp'o"
    rs = batch(["export", "--db", db, "--task", "law", "--out", out],
               ["export", "--db", db, "--task", "law", "--out", out],
               ["export", "--db", db, "--task", "law", "--out", out, "--force"])
    assert rs[0].returncode == 0, rs[0].stderr
    one_line_error(rs[1], "export", "already holds an export", "--force")
    assert rs[2].returncode == 0, rs[2].stderr
    assert {p.name for p in out.iterdir()} == {"runs.parquet", "samples.parquet", "tokens.parquet",
                                               "routes.parquet", "expert_stats.parquet", "expert_tokens.parquet",
                                               "sample_expert_stats.parquet", "layer_stats.parquet",
                                               "expert_norm_stats.parquet"}


@pytest.fixture(scope="module")
def export_dir(work, db) -> Path:
    out = work / "export"
    r = esft("export", "--db", db, "--task", "law", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def tampered(export_dir: Path, dest: Path, table: str, change) -> Path:
    """A copy of an export with one table rewritten by `change(arrow_table) -> arrow_table | bytes`."""
    import pyarrow.parquet as pq

    shutil.copytree(export_dir, dest)
    new = change(pq.read_table(dest / f"{table}.parquet"))
    if isinstance(new, bytes):
        (dest / f"{table}.parquet").write_bytes(new)
    else:
        pq.write_table(new, dest / f"{table}.parquet")
    return dest


@case("`esft import` of exports with emptied routes, expert ids >= 1000, a garbage Parquet file, a missing column",
      "each refused before writing: one line naming the folder/file, run and the accepted range, exit 2, DB intact")
def test_import_validates_exports(work, db, export_dir):
    import pyarrow as pa
    import pyarrow.compute as pc

    target = work / "import_target.duckdb"
    shutil.copy(db, target)
    before = target.read_bytes()
    empty = tampered(export_dir, work / "imp_empty", "routes", lambda t: t.slice(0, 0))
    big = tampered(export_dir, work / "imp_big", "routes",
                   lambda t: t.set_column(t.schema.get_field_index("expert"), "expert",
                                          pc.add(t["expert"], pa.scalar(1000, t["expert"].type))))
    garbage = tampered(export_dir, work / "imp_garbage", "expert_stats", lambda t: b"PAR1 not really")
    nocol = tampered(export_dir, work / "imp_nocol", "routes", lambda t: t.drop_columns(["weight"]))
    control = work / "import_control.duckdb"
    shutil.copy(db, control)
    rs = batch(*[["import", d, "--db", target] for d in (empty, big, garbage, nocol)],
               ["import", export_dir, "--db", control, "--task", "law_copy"])
    one_line_error(rs[0], "import", "imp_empty", "run 1", "0 routes")
    one_line_error(rs[1], "import", "imp_big", "run 1", "outside [0, 32)")
    one_line_error(rs[2], "import", "expert_stats.parquet", "not a readable Parquet file")
    one_line_error(rs[3], "import", "routes.parquet", "lacks column(s) weight")
    assert target.read_bytes() == before
    ok = rs[4]  # the untouched export imports fine
    assert ok.returncode == 0 and "run 2 (import) of task 'law_copy'" in ok.stdout, ok.stderr


# -- overwrites, leftovers, lookups -------------------------------------------------------------------------------
@case("`esft demo-data` (default `--out data`) in a folder where the user edited data/tasks/law/train.jsonl",
      "refused: one line naming the file and `--force`, exit 2, the user's file kept; `--force` overwrites")
def test_demo_data_keeps_user_files(work):
    mine = {}
    for name in ("project", "project_forced"):
        mine[name] = work / name / "data" / "tasks" / "law" / "train.jsonl"
        mine[name].parent.mkdir(parents=True)
        mine[name].write_text('{"messages": [{"role": "user", "content": "my own"}, '
                              '{"role": "assistant", "content": "x"}]}\n')
    refused, forced = batch(["demo-data", "--tasks", "law", "--n-train", 5, "--n-eval", 2],
                            ["demo-data", "--tasks", "law", "--n-train", 5, "--n-eval", 2, "--force", "--out",
                             work / "project_forced" / "data"], cwd=work / "project")
    one_line_error(refused, "demo-data", "data/tasks/law/train.jsonl", "--force")
    assert "my own" in mine["project"].read_text()
    assert sorted(str(p.relative_to(work / "project")) for p in (work / "project").rglob("*")) == [
        "data", "data/tasks", "data/tasks/law", "data/tasks/law/train.jsonl"]
    assert forced.returncode == 0, forced.stderr
    text = mine["project_forced"].read_text()
    assert "my own" not in text and len(text.splitlines()) == 5


@case("`esft scores --out` onto an existing file or a directory; `esft select --out` onto an existing file",
      "one line naming --out and `--force` (or `is a directory`), exit 2, no stray .tmp; `--force` overwrites")
def test_scores_select_out_protection(work, db):
    existing = work / "scores.csv"
    existing.write_text("keep")
    folder = work / "out_dir"
    folder.mkdir()
    cfg = work / "sel.json"
    cfg.write_text("keep")
    rs = batch(["scores", "--db", db, "--task", "law", "--out", existing],
                  ["scores", "--db", db, "--task", "law", "--out", folder],
                  ["select", "--db", db, "--task", "law", "--metric", "token", "--top-p", 0.2, "--out", cfg],
                  ["scores", "--db", db, "--task", "law", "--out", existing, "--force"])
    one_line_error(rs[0], "scores", "scores.csv", "--force")
    one_line_error(rs[1], "scores", "out_dir", "is a directory")
    one_line_error(rs[2], "select", "sel.json", "--force")
    assert cfg.read_text() == "keep" and not list(folder.iterdir()) and not list(work.glob("*.tmp"))
    assert rs[3].returncode == 0 and existing.read_text().startswith("layer,expert"), rs[3].stderr


@case("a recorder killed with kill -9 mid-run, then `esft runs --prune`",
      "the dead run is marked failed, then its rows and staging folder are deleted; earlier runs stay complete")
def test_runs_prune(work, db, small_data):
    mine = work / "prune.duckdb"
    shutil.copy(db, mine)
    p = popen("record", "--data", LAW / "train.jsonl", "--task", "law", "--db", mine, "--max-tokens", 20000,
              "--quiet")
    staged = Path(f"{mine}.staging") / "run-2"
    wait_until(lambda: staged.is_dir() or p.poll() is not None, what="the recorder to register its run")
    p.kill()
    p.wait()
    r = esft("runs", "--db", mine, "--prune")
    assert r.returncode == 0, r.stderr
    assert "pruned 1 failed run(s): 2" in r.stderr, r.stderr
    assert not Path(f"{mine}.staging").exists()
    assert [ln.split("|")[4].strip() for ln in r.stdout.splitlines()[2:]] == ["complete"]


@case("`--model no-such/model` with HF_HUB_OFFLINE=1 (not a folder, not cached)",
      "one line at once naming the model and what is accepted, exit 2 (no minute of network retries)")
def test_unknown_hub_id_offline(work, small_data):
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    t = time.monotonic()
    r = esft("record", "--model", "no-such/model", "--data", small_data, "--task", "x", "--db", work / "h.duckdb",
             env=env)
    one_line_error(r, "record", "no-such/model", "nor in the hub cache")
    assert time.monotonic() - t < 30 and not (work / "h.duckdb").exists()


# -- found trying the tool as a new user (issue 19) ----------------------------------------------------------------
@case("a truncated trace DB (its first 300 kB) as `--db` to `esft runs` / `esft scores`",
      "one line saying the file is damaged and how to recover (backup, `esft import`), exit 2, file unchanged")
def test_truncated_db(db, work):
    cut = work / "cut.duckdb"
    cut.write_bytes(db.read_bytes()[:300_000])
    before = cut.read_bytes()
    for r, cmd in zip(batch(["runs", "--db", cut], ["scores", "--db", cut, "--task", "law"]), ("runs", "scores"),
                      strict=True):
        one_line_error(r, cmd, str(cut), "damaged", "esft import")
    assert cut.read_bytes() == before


@case("a chat JSONL whose text holds a lone surrogate (`\"\\ud800x\"`, valid JSON)",
      "`FILE line N: ...` naming the message and the surrogate, exit 2, from the shared reader (record and train)")
def test_lone_surrogate(work, small_data, experts_cfg):
    bad = work / "surrogate.jsonl"
    lines = small_data.read_text().splitlines(keepends=True)[:3]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "\ud800x"},
                                          {"role": "assistant", "content": "ok"}]}) + "\n")
    bad.write_text("".join(lines), encoding="utf-8")
    assert "\\ud800" in bad.read_text()  # json.dumps escapes it: the file itself is valid UTF-8 and valid JSON
    rec, tr = batch(["record", "--data", bad, "--task", "s", "--db", work / "s.duckdb", "--quiet"],
                    train_args(bad, experts_cfg, work / "s-run"))
    for r, cmd in ((rec, "record"), (tr, "train")):
        one_line_error(r, cmd, f"{bad} line 4", "message 1", "surrogate")
    assert not (work / "s.duckdb").exists() and not (work / "s-run").exists()


@case("an expert config listing 10^6 expert ids for one layer",
      "refused in one line of at most a few hundred characters (the first ids, then \"and N more\"), exit 2")
def test_huge_expert_config_error_is_bounded(work, small_data):
    cfg = work / "huge_cfg.json"
    cfg.write_text(json.dumps({"experts": {"1": list(range(10**6))}, "shared_experts": False,
                               "non_expert_modules": False}))
    dup = work / "dup_cfg.json"
    dup.write_text(json.dumps({"experts": {"1": [3, 3] * 500_000}}))
    a, b = batch(train_args(small_data, cfg, work / "huge-run"), train_args(small_data, dup, work / "dup-run"))
    line = one_line_error(a, "train", "out of range", "more")
    assert len(line) < 700, len(line)
    line = one_line_error(b, "train", "twice")
    assert len(line) < 700, len(line)
    assert not (work / "huge-run").exists() and not (work / "dup-run").exists()


@case("a JSONL written with a UTF-8 BOM and CRLF line ends (as Windows editors save it)",
      "read as the same records; a real encoding error is still refused with its line number")
def test_bom_and_crlf_jsonl(work, small_data):
    win = work / "windows.jsonl"
    rows = small_data.read_text().splitlines()[:20]
    win.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    latin = work / "latin1.jsonl"
    latin_row = rows[1].encode().replace(b'"content": "', b'"content": "\xe9', 1)  # a Latin-1 byte in a string
    assert b"\xe9" in latin_row
    latin.write_bytes(b"\xef\xbb\xbf" + rows[0].encode() + b"\r\n" + latin_row + b"\r\n")
    ok, bad = batch(["record", "--data", win, "--task", "win", "--db", work / "win.duckdb", "--max-tokens", 200,
                     "--quiet"],
                    ["record", "--data", latin, "--task", "l", "--db", work / "latin.duckdb", "--quiet"])
    assert ok.returncode == 0, ok.stderr
    one_line_error(bad, "record", f"{latin} line 2", "not UTF-8")
    sys.path.insert(0, str(REPO))
    from esft_core.data import read_records

    assert read_records(win) == read_records(small_data)[:20]


# -- what held before and must keep holding -----------------------------------------------------------------------
@case("`esft sql` reading a file, ATTACH, COPY TO a file, DELETE",
      "each refused by the sandbox (external access disabled, read-only): one line, exit 2, DB unchanged")
def test_sql_sandbox_holds(sql_runs, db, work):
    for name in ("read_file", "attach", "copy", "delete"):
        one_line_error(sql_runs[name], "sql")
    assert not (work / "leak.csv").exists() and not (work / "other.duckdb").exists()
    assert db.read_bytes() == sql_runs["db_before"]


@case("two `esft record` processes writing one DB at the same time",
      "both finish with their own complete run (distinct ids, all rows ingested)")
def test_two_concurrent_recorders(db, work, small_data):
    mine = work / "two.duckdb"
    shutil.copy(db, mine)
    rs = parallel(*[["record", "--data", small_data, "--task", f"law{i}", "--db", mine, "--max-tokens", 400,
                     "--quiet"] for i in (1, 2)])
    assert all(r.returncode == 0 for r in rs), [r.stderr for r in rs]
    import duckdb

    with duckdb.connect(str(mine), read_only=True) as con:
        rows = con.execute("SELECT task, status, n_tokens = (SELECT count(*) FROM tokens t WHERE t.run_id = r.run_id) "
                           "FROM runs r WHERE task LIKE 'law_' ORDER BY task").fetchall()
    assert rows == [("law1", "complete", True), ("law2", "complete", True)]


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
