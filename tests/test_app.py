"""Every page of the Streamlit app renders without exception (AppTest) on a recorded trace DB, on a missing DB and on
an empty DB file; key content is present; the SQL console reports bad queries as messages."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import duckdb
import pytest
from explorer_support import REPO, cached_model_and_db
from streamlit.testing.v1 import AppTest

from esft_core.workspace import jobs, launchers

PAGES = ["runs", "specialization", "overlap", "tokens", "attribution", "select_train", "results", "sql"]


@pytest.fixture(scope="module")
def tiny(request):
    return cached_model_and_db(request.config.cache.mkdir("esft-explorer"))


def app(monkeypatch, tmp_path, db, model="demo") -> AppTest:
    monkeypatch.setenv("ESFT_DB", str(db))
    monkeypatch.setenv("ESFT_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("ESFT_MODEL", str(model))
    monkeypatch.setenv("ESFT_AUTO_RECORD", "0")
    monkeypatch.setenv("ESFT_STANDBY", "0")  # no warm runner processes from in-process app tests
    return AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"explorer/page_{page}.py").run()
    assert not at.exception, f"{page}: {[e.value for e in at.exception]}"
    assert at.title, f"{page} shows no title"
    return at


def charts_on(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def test_every_page_renders_on_a_recorded_db(monkeypatch, tmp_path, tiny):
    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "runs")
    assert at.dataframe[0].value.shape[0] == 3 and [m.value for m in at.metric][:2] == ["3", "3"]
    visit(at, "specialization")
    assert at.sidebar.selectbox[0].value == str(model) and charts_on(at) == 3  # heatmap, curves, bars
    visit(at, "overlap")
    assert charts_on(at) == 3 and at.dataframe[0].value.shape[0] == 3  # 3 task pairs
    visit(at, "tokens")
    assert 'class="tok"' in at.get("html")[0].proto.body
    visit(at, "attribution")
    assert any("Compute attribution" in b.label for b in at.button)
    visit(at, "select_train")
    assert [t.label for t in at.tabs] == ["Top-p selection", "Contrast", "Stability"]
    assert at.get("download_button") and any("Trainable" in m.label for m in at.metric)
    visit(at, "results")
    assert "No training runs yet" in at.info[0].value
    visit(at, "sql")
    assert at.dataframe[0].value.shape[0] == 3  # the default example lists the runs


def test_pages_react_to_controls(monkeypatch, tmp_path, tiny):
    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "specialization")
    at.radio(key="spec_metric").set_value("token").run()
    assert not at.exception
    assert at.slider(key="spec_p_token").value == 0.2  # the paper's p for the token score
    visit(at, "sql")
    at.text_area[0].set_value("SELECT * FROM read_csv('/etc/passwd')")
    at.button(key="sql_run").click().run()
    assert not at.exception and "disabled" in at.error[0].value
    at.text_area[0].set_value("DELETE FROM runs")
    at.button(key="sql_run").click().run()
    assert "read-only" in at.error[0].value
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.sql("SELECT count(*) FROM runs").fetchall()[0][0] == 3
    visit(at, "attribution")
    at.button(key="att_go").click().run(timeout=120)
    assert not at.exception and at.get("progress")  # a background job, polled with a progress bar
    (job,) = jobs.list_jobs(tmp_path / "work", "attribution")
    t = time.monotonic()
    while not any(m.label == "Router logit" for m in at.metric) and time.monotonic() - t < 120:
        time.sleep(0.5)
        at.run()
    assert not at.exception and any(m.label == "Router logit" for m in at.metric), jobs.log_tail(job)
    assert "rgba(" in at.get("html")[0].proto.body and jobs.load_job(job.dir).state == "complete"
    assert any(b.key == "att_go" for b in at.button) and not at.get("progress")  # polling over, button back


def test_score_controls_and_task_set_hold_across_pages(monkeypatch, tmp_path, tiny):
    """One session context: the score, p and task set chosen on one page are the ones the next page opens on."""
    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "specialization")
    assert at.multiselect(key="spec_tasks").value == ["intent", "law", "math"]  # one default: every task
    visit(at, "overlap")
    assert at.multiselect(key="ov_tasks").value == ["intent", "law", "math"]
    at.multiselect(key="ov_tasks").set_value(["law", "math"]).run()
    at.radio(key="ov_metric").set_value("token").run()
    at.slider(key="ov_p_token").set_value(0.35).run()
    visit(at, "specialization")
    assert at.multiselect(key="spec_tasks").value == ["law", "math"]
    assert at.radio(key="spec_metric").value == "token" and at.slider(key="spec_p_token").value == 0.35
    visit(at, "select_train")
    assert at.radio(key="sel_metric").value == "token" and at.slider(key="sel_p_token").value == 0.35
    at.radio(key="sel_metric").set_value("gate").run()
    visit(at, "specialization")
    assert at.radio(key="spec_metric").value == "gate" and at.slider(key="spec_p_gate").value == 0.1


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_every_page_renders_without_data(monkeypatch, tmp_path, kind):
    db = tmp_path / "traces.duckdb"
    if kind == "empty":
        duckdb.connect(str(db)).close()
    at = app(monkeypatch, tmp_path, db)
    for page in PAGES:
        visit(at, page)
        assert not at.error, f"{page}: {[e.value for e in at.error]}"
        if page not in ("runs", "attribution") or kind == "missing":
            assert at.info, f"{page} explains that there is no data"


def test_a_failed_recording_job_shows_its_error_and_keeps_the_data(monkeypatch, tmp_path, tiny):
    import time

    from esft_core.workspace import jobs

    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    monkeypatch.setenv("ESFT_STANDBY", "0")
    job = launchers.start_esft_job(tmp_path / "work", "record", [["esft", "record", "--model", str(model), "--data",
                                                        str(tmp_path / "nope.jsonl"), "--task", "x", "--db", str(db)]],
                         title="Recording 'x'", meta={"db": str(db)})
    t = time.monotonic()
    while not jobs.load_job(job.dir).done:
        assert time.monotonic() - t < 60
        time.sleep(0.2)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "runs")
    errors = [e.value for e in at.error]
    assert any("esft record: error:" in e and "nope.jsonl" in e for e in errors), errors
    assert at.dataframe[0].value.shape[0] == 3  # the earlier runs are all there


def test_runs_without_token_text_get_a_note_not_a_crash(monkeypatch, tmp_path, tiny):
    """Defect 1: the authors' imported logs (no samples' text, no tokens) as the newest model; a new session still
    opens on a model with tokens, and picking the imported one shows a note on the token pages."""
    import subprocess
    import sys

    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    subprocess.run([sys.executable, "-m", "esft_core.cli", "import-official",
                    str(REPO / "tests" / "fixtures" / "esft-official" / "expert_scores" / "law"), "--task", "law",
                    "--db", str(db)], check=True, capture_output=True, timeout=120)
    at = app(monkeypatch, tmp_path, db, "not-in-this-db")
    visit(at, "tokens")
    assert at.sidebar.selectbox[0].value == str(model)  # the newest model is the import; the default skips it
    at.session_state["ctx_model"] = "deepseek-ai/ESFT-vanilla-lite"
    for page in ("tokens", "attribution"):
        visit(at, page)
        assert at.sidebar.selectbox[0].value == "deepseek-ai/ESFT-vanilla-lite"
        assert any("no token text" in i.value for i in at.info), page
    visit(at, "specialization")
    assert charts_on(at) == 3


def test_results_page_evaluates_a_finished_run_on_more_examples_in_a_job(monkeypatch, tmp_path, tiny):
    from esft_core.experts.expert_config import ExpertConfig
    from esft_core.tuning.train import TrainConfig
    from esft_core.workspace import runs

    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    work = tmp_path / "work"
    monkeypatch.setenv("ESFT_STANDBY", "0")
    cfg = TrainConfig(data=str(REPO / "data/tasks/code/train.jsonl"), out="", model=str(model), method="esft",
                      experts=runs.EXPERT_CFG, steps=2, lr=1e-3, batch_size=2, seq_len=128, eval_limit=2,
                      eval_data=[str(REPO / "data/tasks/code/eval.jsonl"), str(REPO / "data/general/heldout.jsonl")])
    job, run_dir = launchers.start_training(work, cfg, "code", ExpertConfig({1: [3], 2: [5]}), eval_baseline=False)
    t = time.monotonic()
    while not jobs.load_job(job.dir).done and time.monotonic() - t < 180:
        time.sleep(0.3)
    assert runs.read_run(run_dir).status == "complete", jobs.log_tail(job)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "results")
    at.number_input(key=f"res_eval_n_{run_dir.name}").set_value(3)
    at.button(key="res_eval_go").click().run()
    assert not at.exception and at.get("progress")  # the job runs in the background, polled with a progress bar
    (ev_job,) = jobs.list_jobs(work, "eval")
    t = time.monotonic()
    while not any("examples per file" in d.value.columns for d in at.dataframe) and time.monotonic() - t < 180:
        time.sleep(0.5)
        at.run()
    assert not at.exception and jobs.load_job(ev_job.dir).state == "complete", jobs.log_tail(ev_job)
    table = at.dataframe[0].value
    assert table["more-examples n"].tolist() == [3] and table["more-examples general loss"].iloc[0] > 0
    extra = next(d.value for d in at.dataframe if "examples per file" in d.value.columns)
    assert extra["examples per file"].tolist() == [3] and "code score" in extra.columns


def test_select_and_train_first_visit_does_not_import_torch(tmp_path, tiny):
    """Importing torch costs ~1 s of the first visit on a small CPU (model facts used to go through
    esft_core.models.loading);
    a fresh process shows whether any page code still pulls it in."""
    import os
    import subprocess
    import sys

    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    code = ("import sys\nfrom streamlit.testing.v1 import AppTest\n"
            f"at = AppTest.from_file({str(REPO / 'app.py')!r}, default_timeout=60).run()\n"
            "at.switch_page('explorer/page_select_train.py').run()\n"
            "assert not at.exception, [e.value for e in at.exception]\n"
            "assert any('Trainable' in m.label for m in at.metric)\n"
            "print('torch' in sys.modules)")
    env = {**os.environ, "ESFT_DB": str(db), "ESFT_WORKDIR": str(tmp_path / "work"), "ESFT_MODEL": str(model),
           "ESFT_AUTO_RECORD": "0", "ESFT_STANDBY": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_train_form_launches_a_table3_variant(monkeypatch, tmp_path, tiny):
    """The Train form's '+ shared experts' box reaches the job's `esft train` command, and the run trains."""
    model, cached = tiny
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    at = app(monkeypatch, tmp_path, db, model)
    visit(at, "select_train")
    at.number_input(key="tr_steps").set_value(2)
    at.checkbox(key="tr_also_shared").check()
    at.button[[b.label for b in at.button].index("Train")].click().run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    (job,) = jobs.list_jobs(tmp_path / "work", "train")
    argv = job.commands[0]
    assert "--train-shared" in argv and "--no-train-non-expert" in argv and argv[argv.index("--method") + 1] == "esft"
    t = time.monotonic()
    while jobs.load_job(job.dir).state in ("queued", "running") and time.monotonic() - t < 240:
        time.sleep(0.5)
    assert jobs.load_job(job.dir).state == "complete", jobs.log_tail(job)
    saved = json.loads((Path(job.meta["out"]) / "adapter" / "expert_cfg.json").read_text())
    assert saved["shared_experts"] is True and saved["non_expert_modules"] is False
