"""Training runs launched through the library (launchers.start_training → esft_core.workspace.runs): real runner
processes running
real `esft train`; Stop reads `stopped`, keeps the last checkpoint and resumes; a runner killed with -9 does not
leave the run `running`."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from explorer_support import REPO, cached_model_and_db

from esft_core import cli
from esft_core.experts.expert_config import ExpertConfig
from esft_core.tuning.train import TrainConfig
from esft_core.workspace import jobs, launchers, runs

DATA = str(REPO / "data" / "tasks" / "code" / "train.jsonl")


@pytest.fixture(scope="module")
def tiny(request):
    return cached_model_and_db(request.config.cache.mkdir("esft-explorer"))


@pytest.fixture(autouse=True)
def no_standby(monkeypatch):
    monkeypatch.setenv("ESFT_STANDBY", "0")


def _until(cond, timeout=120.0, what=""):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _cfg(model, steps):
    return TrainConfig(data=DATA, out="", model=str(model), method="esft", experts=runs.EXPERT_CFG, steps=steps,
                       lr=1e-3, batch_size=2, seq_len=128, save_every=2)


def test_train_argv_is_built_from_the_config_and_accepted_by_the_cli(tiny):
    cfg = _cfg(tiny[0], 5)
    cfg.eval_data = ["a.jsonl", "b.jsonl"]
    argv = launchers.train_argv(cfg)
    assert argv[:2] == ["esft", "train"] and argv[argv.index("--steps") + 1] == "5"
    assert argv[argv.index("--eval-data") + 1: argv.index("--eval-data") + 3] == ["a.jsonl", "b.jsonl"]
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= cli.cli_options("train")


def test_stop_reads_stopped_keeps_checkpoint_and_resumes(tmp_path, tiny):
    ec = ExpertConfig({1: [3, 0], 2: [5]})
    job, run_dir = launchers.start_training(tmp_path, _cfg(tiny[0], 400), "code", ec)
    assert (run_dir / "expert_cfg.json").read_text() == ec.to_json()
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["job"] == str(job.dir) and launch["task"] == "code" and launch["config"]["steps"] == 400
    ckpt = run_dir / "train" / "checkpoints"
    _until(lambda: ckpt.is_dir() and any((p / "state.json").is_file() for p in ckpt.glob("step_*")), what="ckpt")
    assert runs.read_run(run_dir).status == "running"
    st = jobs.stop_job(job, grace_s=10)
    assert st["state"] == "stopped"
    info = runs.read_run(run_dir)
    assert info.status == "stopped" and info.peak_rss and info.peak_rss > 1e6
    kept = sorted(p.name for p in ckpt.glob("step_*") if (p / "state.json").is_file())
    assert kept, "the last checkpoint is kept"
    last = int(kept[-1].split("_")[1])
    # resume from it to a close total: the run completes and its metrics continue from the checkpoint
    job2 = launchers.resume_training(tmp_path, run_dir, steps=last + 2)
    _until(lambda: jobs.load_job(job2.dir).done, what="resume")
    info = runs.read_run(run_dir)
    assert jobs.load_job(job2.dir).state == "complete", jobs.log_tail(job2)
    assert info.status == "complete" and info.run["step"] == last + 2 and info.adapter_dir.is_dir()
    assert [m["step"] for m in info.metrics] == list(range(1, last + 3))
    assert [r.name for r in runs.list_runs(tmp_path)] == [run_dir.name]


def test_runner_killed_with_sigkill_does_not_stay_running(tmp_path, tiny):
    job, run_dir = launchers.start_training(tmp_path, _cfg(tiny[0], 400), "code", ExpertConfig({1: [1]}))
    _until(lambda: runs.read_run(run_dir).metrics, what="first step")
    pid = jobs.load_job(job.dir).status["pid"]
    os.killpg(pid, signal.SIGKILL)
    _until(lambda: not jobs.pid_alive(pid), 20, "runner gone")
    info = runs.read_run(run_dir)
    assert info.run.get("status") == "running"  # what train.py left behind …
    assert info.status == "failed" and "died" in info.error  # … is reconciled with the dead job


def test_standalone_eval_of_a_finished_run_lands_in_the_run_and_the_table(tmp_path, tiny):
    from esft_core.errors import EsftError
    from explorer import results

    cfg = _cfg(tiny[0], 2)
    cfg.eval_data = [str(REPO / "data" / "tasks" / "code" / "eval.jsonl"),
                     str(REPO / "data" / "general" / "heldout.jsonl")]
    cfg.eval_limit = 2
    job, run_dir = launchers.start_training(tmp_path, cfg, "code", ExpertConfig({1: [3], 2: [5]}), eval_baseline=False)
    with pytest.raises(EsftError, match="no finished adapter"):  # not finished yet (queued or running)
        launchers.start_eval(tmp_path, run_dir, 4)
    _until(lambda: jobs.load_job(job.dir).done, what="training")
    assert runs.read_run(run_dir).status == "complete", jobs.log_tail(job)
    with pytest.raises(EsftError, match="positive integer, got 0"):
        launchers.start_eval(tmp_path, run_dir, 0)
    ev_job = launchers.start_eval(tmp_path, run_dir, 4)
    assert ev_job.kind == "eval" and ev_job.meta["queue"] == "compute" and "--adapter" in ev_job.commands[0]
    done = _until(lambda: (j := jobs.load_job(ev_job.dir)).done and j, what="eval")
    assert done.state == "complete", jobs.log_tail(done)
    info = runs.read_run(run_dir)
    ev = info.extra_evals[4]
    assert set(ev["tasks"]) == {"code"} and ev["general_loss"] > 0 and list(info.extra_evals) == [4]
    assert ev["tasks"]["code"]["n"] == 4 and info.eval["tasks"]["code"]["n"] == 2  # 4 examples, not the run's 2
    row = results.runs_table([info]).row(0, named=True)
    assert row["more-examples n"] == 4 and row["more-examples general loss"] == ev["general_loss"]
    assert row["more-examples task loss"] == ev["tasks"]["code"]["loss"]
    assert info.eval and info.eval != ev  # the training-time evaluation (2 examples) is kept beside it
