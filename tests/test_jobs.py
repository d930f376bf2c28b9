"""Background jobs: real detached runner processes running real `esft` commands; status, progress, errors, stop,
and a runner that dies without a final state."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import duckdb
import pytest
from explorer_support import REPO, cached_model_and_db

from esft_core import cli
from esft_core.workspace import jobs, launchers


def wait(job, timeout=60.0, until=lambda j: j.done):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        j = jobs.load_job(job.dir)
        if until(j):
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} still {jobs.load_job(job.dir).state} after {timeout} s:\n{jobs.log_tail(job)}")


@pytest.fixture(scope="module")
def tiny(request):
    return cached_model_and_db(request.config.cache.mkdir("esft-explorer"))


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture(autouse=True)
def no_standby(monkeypatch):
    monkeypatch.setenv("ESFT_STANDBY", "0")


def test_chain_of_commands_completes_with_log_and_progress(tmp_path):
    job = jobs.start_job(tmp_path, "demo", [py("print('one')"), py("print('two')")], title="two steps",
                         meta={"x": 1})
    j = wait(job)
    assert j.state == "complete" and j.status["returncode"] == 0 and j.status["step"] == 1
    assert j.status["peak_rss"] > 1_000_000
    log = jobs.log_tail(j)
    assert "one" in log and "two" in log and log.index("one") < log.index("two")
    assert launchers.progress(j) == (1.0, "done")
    assert [x.id for x in jobs.list_jobs(tmp_path)] == [j.id] and jobs.active_jobs(tmp_path) == []
    assert j.meta == {"x": 1} and j.title == "two steps"


def test_progress_from_tqdm_while_running_then_stop(tmp_path):
    code = ("import sys, time; sys.stderr.write('rec:  30%|###  | 3/10 [00:01<00:02]\\r'); sys.stderr.flush(); "
            "time.sleep(60)")
    job = jobs.start_job(tmp_path, "record", [py(code), py("print('never')")])
    j = wait(job, until=lambda j: "3/10" in jobs.log_tail(j))
    frac, label = launchers.progress(j)
    assert frac == pytest.approx(0.15) and "3/10" in label  # command 1 of 2 at 30 %
    t = time.monotonic()
    st = jobs.stop_job(j, grace_s=3)
    assert st["state"] == "stopped" and time.monotonic() - t < 6
    assert "never" not in jobs.log_tail(j)
    assert not jobs.pid_alive(st["pid"])


def test_runner_killed_without_final_state_reads_as_failed(tmp_path):
    job = jobs.start_job(tmp_path, "demo", [py("import time; time.sleep(60)")])
    j = wait(job, until=lambda j: j.state == "running")
    os.killpg(j.status["pid"], signal.SIGKILL)
    j = wait(job, timeout=10)
    assert j.state == "failed" and "died" in j.error


def test_record_job_adds_a_run_and_a_failing_command_keeps_earlier_data(tmp_path, tiny):
    model, cached_db = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached_db, db)
    with duckdb.connect(str(db), read_only=True) as con:
        before = con.sql("SELECT task, n_tokens FROM runs WHERE status = 'complete' ORDER BY run_id").fetchall()
    data = str(REPO / "data" / "tasks" / "code" / "train.jsonl")
    cmds = [["esft", "record", "--model", str(model), "--data", data, "--task", "code", "--db", str(db),
             "--max-tokens", "200", "--seq-len", "64", "--batch-size", "4"],
            ["esft", "record", "--model", str(model), "--data", str(tmp_path / "missing.jsonl"), "--task", "x",
             "--db", str(db)]]
    job = launchers.start_esft_job(tmp_path, "record", cmds, meta={"db": str(db)})
    j = wait(job, timeout=90)
    assert j.state == "failed" and j.status["step"] == 1
    assert j.error.startswith("esft record: error:") and "missing.jsonl" in j.error
    with duckdb.connect(str(db), read_only=True) as con:
        after = con.sql("SELECT task, n_tokens FROM runs WHERE status = 'complete' ORDER BY run_id").fetchall()
    assert after[: len(before)] == before and [t for t, _ in after[len(before):]] == ["code"]


def test_cli_options_reflect_the_installed_commands():
    assert {"--steps", "--eval-data", "--eval-limit", "--experts", "--no-progress"} <= cli.cli_options("train")
    assert {"--max-tokens", "--seq-len", "--db"} <= cli.cli_options("record")
    assert cli.cli_options("no-such-command") == set()


def test_jobs_are_handed_to_a_warm_standby_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_STANDBY", "1")
    monkeypatch.setenv("ESFT_STANDBY_PRELOAD", "json")  # the real one preloads torch/transformers
    pid = jobs.ensure_standby(tmp_path)
    assert jobs.ensure_standby(tmp_path) == pid  # one standby per work folder
    sd = tmp_path / "jobs" / ".standby"
    t = time.monotonic()
    while not (sd / f"ready-{pid}").exists():
        assert time.monotonic() - t < 30
        time.sleep(0.05)
    job = jobs.start_job(tmp_path, "demo", [py("print('warm')")])
    j = wait(job)
    assert j.state == "complete" and j.status["pid"] == pid and "warm" in jobs.log_tail(j)
    assert not list(sd.glob(f"*-{pid}"))  # claimed and consumed
    cold = wait(jobs.start_job(tmp_path, "demo", [py("print('cold')")]))  # no standby left → a fresh runner
    assert cold.state == "complete" and cold.status["pid"] != pid


def test_bad_job_specs_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        jobs.start_job(tmp_path, "x", [])
    with pytest.raises(ValueError):
        jobs.start_job(tmp_path, "x", [[]])
    assert jobs.list_jobs(tmp_path / "none") == []


def test_jobs_of_one_queue_run_one_after_another(tmp_path):
    first = jobs.start_job(tmp_path, "a", [py("import time; time.sleep(1.5)")], meta={"queue": "compute"})
    second = jobs.start_job(tmp_path, "b", [py("print('second')")], meta={"queue": "compute"})
    other = jobs.start_job(tmp_path, "c", [py("print('other')")], meta={"queue": "elsewhere"})
    assert wait(other).state == "complete"  # another queue does not wait
    s = wait(second, until=lambda j: j.status.get("waiting_for") or j.done)
    assert s.state == "queued" and s.status["waiting_for"] == first.id and launchers.progress(s)[1].startswith("queued")
    done = wait(second)
    assert done.state == "complete" and done.status["started"] >= jobs.load_job(first.dir).status["finished"] - 0.05


def test_a_finished_runner_leaves_no_zombie_in_the_parent(tmp_path):
    job = wait(jobs.start_job(tmp_path, "z", [py("print('x')")]))
    pid = int(job.status["pid"])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # reaped → the entry disappears
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the runner is still a defunct child of this process"


def test_attribution_job_writes_its_result_and_reports_bad_requests(tmp_path, tiny):
    import json

    model, _ = tiny
    req = launchers.AttributionRequest(str(model), [1, 5, 9, 33, 70, 12, 8, 100], layer=1, expert=2, target=5,
                                       n_steps=32)
    same = launchers.AttributionRequest(**{**req.__dict__})
    assert req.path(tmp_path) == same.path(tmp_path)  # same request, same file
    bad = launchers.AttributionRequest(str(model), req.input_ids, layer=1, expert=99, target=5)
    assert bad.path(tmp_path) != req.path(tmp_path)
    good_job, bad_job = launchers.start_attribution(tmp_path, req), launchers.start_attribution(tmp_path, bad)
    assert good_job.meta["queue"] == "compute" and good_job.meta["out"] == str(req.path(tmp_path))
    g = wait(good_job, timeout=180)
    assert g.state == "complete", jobs.log_tail(g)
    res = json.loads(req.path(tmp_path).read_text())
    assert len(res["tokens"]) == len(res["scores"]) == 6 and res["target"] == 5 and res["request"]["expert"] == 2
    # completeness: the attributions add up to the logit change, up to the reported integration error
    assert abs(sum(res["scores"]) - (res["logit"] - res["baseline_logit"])) <= res["delta"] + 1e-4
    assert "3/3" in jobs.log_tail(g) and launchers.progress(g) == (1.0, "done")
    b = wait(bad_job, timeout=180)
    assert b.state == "failed" and "expert 99 does not exist" in b.error and b.error.startswith("esft attribution:")
    assert not bad.path(tmp_path).exists()
