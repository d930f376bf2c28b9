"""The Results page's "Benchmark results" view: explorer/benchmarks.py on the saved bench/compare_methods.py results
(the real files in bench/results) and on synthetic files with unknown methods, swept settings, missing keys and
broken JSON; an AppTest of the page picking a file and showing the numbers."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import polars as pl
import pytest
from explorer_support import REPO
from streamlit.testing.v1 import AppTest

from explorer import benchmarks as b
from explorer import charts

DIAG = REPO / "bench" / "results" / "compare_methods_quick_diag.json"


def _row(method, task, lr, seed, score, gl, params, **extra):
    return {"method": method, "task": task, "lr": lr, "seed": seed, "eval_score": score, "eval_scores": [score] * 4,
            "general_eval_loss": gl, "trainable_params": params, "step_time": 0.1 + score / 7,
            "new_metric": {"a": 1.0, "b": 2.0}[task], "note": "same", **extra}


def sweep_file() -> dict:
    """A p-sweep + rank-sweep file with methods and keys the explorer has never seen, no 'sweep' / 'comparisons'."""
    rows = [_row("vanilla", t, None, 0, 0.0, 4.0, None) for t in "ab"]
    for p, (sa, ga, sb, gb), (pa, pb) in ((0.1, (.2, 4.1, .4, 4.3), (100, 300)), (0.2, (.5, 4.2, .5, 4.4), (400, 400)),
                                          (0.5, (.6, 5.0, .4, 5.0), (1000, 1000))):
        rows += [_row("esft_token", "a", 3e-3, 0, sa, ga, pa, top_p=p), _row("esft_token", "b", 3e-3, 0, sb, gb, pb,
                                                                             top_p=p)]
    rows += [_row("esft_token", t, 3e-3, 1, 0.9, 4.0, 400, top_p=0.2) for t in "ab"]  # a 2nd seed: not a point
    for r, (s1, s2, g), n in ((2, (.1, .1, 4.05), 50), (8, (.4, .4, 4.5), 200), (32, (.7, .5, 6.0), 800)):
        rows += [_row("lora", "a", 1e-3, 0, s1, g, n, lora_r=r), _row("lora", "b", 1e-3, 0, s2, g, n, lora_r=r)]
    rows += [_row("esft_token_shared", t, 3e-3, 0, .45, 4.6, 600) for t in "ab"]
    means = {"vanilla": {"lr": None, "task_score": 0.0, "task_score_ci": [0.0, 0.0], "general_loss": 4.0},
             "esft_token_shared": {"lr": 3e-3, "task_score": 0.45, "task_score_ci": [0.4, 0.5],
                                   "per_task": {"a": {"score": .45, "lo": .41, "hi": .49}}},
             "lora": {"lr": 1e-3, "task_score": 0.4},  # no CI: the bar gets a zero-width interval
             "weird": 3, "_pareto": []}
    return {"meta": {"mode": "quick", "tasks": ["a", "b"], "seeds": [0, 1], "steps": 50, "tag": "sweep_p"},
            "ratios": {}, "means": means, "rows": rows}


def test_real_results_files_reshape_to_the_numbers_they_hold():
    files = b.list_files()
    assert DIAG in files and all(f.name.startswith("compare_methods") for f in files)
    data, warn = b.load(DIAG)
    assert warn is None and b.notes(data) == []
    assert b.label(DIAG, data) == "compare_methods_quick_diag.json · quick · law, math · 1 seed · 100 steps · tag diag"
    assert b.tag(REPO / "bench/results/compare_methods_quick__merged.json", data) == "merged"
    s = b.score_table(data)
    fft = s.filter((pl.col("method") == "fft") & (pl.col("task") == "mean")).row(0, named=True)
    assert (fft["score"], fft["lo"], fft["hi"], fft["lr"]) == pytest.approx((0.4925, 0.465, 0.5175, 1e-3))
    assert b.task_order(s) == ["law", "math", "mean"] and s.height == 6 * 3  # 6 methods × (2 tasks + mean)
    # trade-off points = the benchmark's own Pareto table (every method × lr of seed 0, rise over vanilla)
    pts = b.points(data)
    mine = {(r["method"], r["lr"]): (r["task score"], r["general loss rise"], r["trainable params"], r["pareto"])
            for r in pts.iter_rows(named=True)}
    theirs = {(p["method"], p["lr"]): (p["task_score"], p["general_loss_rise"], p["trainable_params"], p["pareto"])
              for p in data["means"]["_pareto"]}
    assert mine.keys() == theirs.keys() and len(mine) == 13
    for k, v in theirs.items():
        assert mine[k][:3] == pytest.approx(v[:3]) and mine[k][3] == v[3], k
    assert pts.filter(pl.col("chosen"))["method"].to_list() == ["fft", "lora", "esft_token", "esft_token_answer",
                                                                "random_token"]
    front = b.params_points(pts).filter(pl.col("pareto")).select("method", "lr").rows()
    assert front == [("fft", 1e-3), ("lora", 3e-3), ("esft_token", 1e-2), ("esft_token_answer", 3e-3)]
    law = b.points(data, "law").filter((pl.col("method") == "fft") & (pl.col("lr") == 1e-3)).row(0, named=True)
    assert law["task score"] == pytest.approx(0.915)  # per task: law only
    sw = b.lr_sweep(data)
    assert sw.filter(pl.col("chosen")).select("method", "lr").rows() == [
        ("fft", 1e-3), ("lora", 3e-3), ("esft_token", 3e-3), ("esft_token_answer", 3e-3)]
    assert sw.filter((pl.col("method") == "lora") & (pl.col("lr") == 1e-2))["validation score"].item() == 0.28
    c = b.comparisons(data)
    rnd = c.filter(pl.col("comparison") == "esft_token - random_token task score").row(0, named=True)
    assert (rnd["value"], rnd["p"], rnd["significant"]) == (0.015, 0.459, False)
    assert c["significant"].sum() == 10 and b.swept(data) == []
    for f in files:  # every shipped file reads without notes or warnings, and yields points
        d, w = b.load(f)
        assert w is None and b.notes(d) == [] and b.points(d).height > 0, f.name
        if b.is_sweep_file(d):  # a --sweep file: its knob is found from the rows, one point per value
            assert b.swept(d) == [d["meta"]["knob"]] and len(d["points"]) == len(d["meta"]["values"]), f.name


def test_unknown_methods_swept_settings_and_missing_keys():
    data = sweep_file()
    assert b.swept(data) == ["top_p", "lora_r"]  # found from the rows; new_metric / note / step_time are not settings
    assert b.methods(data) == ["vanilla", "esft_token_shared", "lora", "esft_token"]
    notes = b.notes(data)
    assert len(notes) == 2 and "'sweep'" in notes[0] and "'comparisons'" in notes[1]
    assert b.label("compare_methods_quick_sweep_p.json", data).endswith("2 seeds · 50 steps · tag sweep_p")
    pts = b.points(data)
    got = {r["label"]: (r["task score"], r["general loss rise"], r["trainable params"], r["pareto"])
           for r in pts.iter_rows(named=True)}
    want = {"esft_token lr=0.003 top_p=0.1": (.3, .2, 200, True), "esft_token lr=0.003 top_p=0.2": (.5, .3, 400, True),
            "esft_token lr=0.003 top_p=0.5": (.5, 1.0, 1000, False), "lora lr=0.001 lora_r=2": (.1, .05, 50, True),
            "lora lr=0.001 lora_r=8": (.4, .5, 200, False), "lora lr=0.001 lora_r=32": (.6, 2.0, 800, True),
            "esft_token_shared lr=0.003": (.45, .6, 600, False)}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k][:3] == pytest.approx(v[:3]) and got[k][3] == v[3], k
    pp = dict(b.params_points(pts).select("label", "pareto").rows())
    assert [k for k, v in pp.items() if v] == ["esft_token lr=0.003 top_p=0.2", "lora lr=0.001 lora_r=2",
                                               "lora lr=0.001 lora_r=8", "lora lr=0.001 lora_r=32"]
    s = b.score_table(data)  # 'weird' and '_pareto' skipped; lora without a CI gets lo = hi = score
    assert s.rows() == [("vanilla", "mean", 0.0, 0.0, 0.0, None), ("esft_token_shared", "a", .45, .41, .49, 3e-3),
                        ("esft_token_shared", "mean", .45, .4, .5, 3e-3), ("lora", "mean", .4, .4, .4, 1e-3)]
    assert b.lr_sweep(data).height == 0 and b.comparisons(data).height == 0
    # the charts build (valid Vega-Lite) with unknown method names, each its own colour
    spec = json.loads(charts.params_chart(b.params_points(pts), b.swept(data)).to_json())
    rng = spec["layer"][1]["encoding"]["color"]["scale"]["range"]
    assert spec["layer"][1]["encoding"]["x"]["scale"]["type"] == "log" and len(set(rng)) == len(rng) == 3
    assert any(t.get("field") == "top_p" for t in spec["layer"][1]["encoding"]["tooltip"])
    json.loads(charts.score_ci_chart(s, b.task_order(s), b.methods(data)).to_json())
    json.loads(charts.tradeoff_chart(b.with_rise(pts)).to_json())
    # older / partial formats: notes, empty frames, never an exception
    old = {"rows": [{"method": "fft", "task": "a", "eval_score": 0.5}]}
    assert len(b.notes(old)) == 5 and b.points(old).height == 0 and b.score_table(old).height == 0
    bad = b.notes({"meta": [], "means": {}, "sweep": {}, "comparisons": {}, "rows": []})
    assert len(bad) == 2 and bad[0].startswith("'meta' is a list") and bad[1].startswith("'comparisons' is a dict")
    no_base = {**data, "rows": [r for r in data["rows"] if r["method"] != "vanilla"], "means": {}}
    assert b.with_rise(b.points(no_base)).height == 0 and b.params_points(b.points(no_base)).height == 7
    assert any("vanilla" in n for n in b.notes(no_base))


def test_broken_files_give_one_line_warnings(tmp_path):
    (tmp_path / "compare_methods_broken.json").write_text('{"meta": {')
    (tmp_path / "compare_methods_list.json").write_text("[1, 2]")
    (tmp_path / "compare_methods_bin.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "other.json").write_text("{}")
    for f in tmp_path.iterdir():
        os.utime(f, (1e9, 1e9))
    os.utime(tmp_path / "compare_methods_list.json", (2e9, 2e9))
    files = b.list_files(tmp_path)  # newest first, then by name
    assert [f.name for f in files] == ["compare_methods_list.json", "compare_methods_bin.json",
                                       "compare_methods_broken.json"]
    for f in files:
        data, warn = b.load(f)
        assert data is None and f.name in warn and "\n" not in warn and b.label(f, None).endswith("unreadable")
    assert "not valid JSON" in b.load(tmp_path / "compare_methods_broken.json")[1]
    assert b.list_files(tmp_path / "nope") == []


def test_user_runs_join_a_benchmark_task(tmp_path):
    from esft_core.workspace.runs import RunInfo
    from explorer import results

    d = tmp_path / "r1"
    d.mkdir()
    info = RunInfo(d, {"task": "a", "config": {"method": "esft", "lr": 1e-3}},
                   {"method": "esft", "status": "complete", "step": 40, "trainable_params": 300}, "complete", None,
                   [], {"tasks": {"a": {"score": 0.9, "loss": 0.2}}, "general_loss": 4.1}, {"general_loss": 4.0})
    table = results.runs_table([info])
    pts = b.points(sweep_file(), "a")
    both = b.with_user_runs(pts, table, "a")
    mine = both.filter(pl.col("method").str.starts_with("your runs")).row(0, named=True)
    assert mine["task score"] == 0.9 and mine["general loss rise"] == pytest.approx(0.1) and mine["pareto"]
    assert both.height == pts.height + 1 and b.with_user_runs(pts, table, "b").height == pts.height


def _app(monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("ESFT_DB", str(tmp_path / "none.duckdb"))
    monkeypatch.setenv("ESFT_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("ESFT_AUTO_RECORD", "0")
    monkeypatch.setenv("ESFT_STANDBY", "0")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    at.switch_page("explorer/page_results.py").run()
    at.radio(key="res_view").set_value("Benchmark results").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _datasets(at) -> list[list[dict]]:
    """Per chart on the page, the rows of all its datasets (Streamlit ships them as Arrow IPC streams)."""
    import pyarrow.ipc

    return [[row for d in ch.proto.datasets for row in pyarrow.ipc.open_stream(d.data.data).read_all().to_pylist()]
            for ch in at.get("vega_lite_chart")]


def _finished_run(work, task: str, score: float, general: float, base: float) -> None:
    """A run directory as the Train button leaves it (launch, run.json, eval.json, the untuned baseline), written
    with esft_core.workspace.runs' own writers: the page reads it through esft_core.workspace.runs.list_runs."""
    from esft_core.workspace import runs

    d = runs.new_run_dir(work, task, "esft")
    (d / "train").mkdir()
    baseline = work / "baselines" / "eval-x.json"
    baseline.parent.mkdir(parents=True, exist_ok=True)
    baseline.write_text(json.dumps({"tasks": {task: {"score": 0.0, "loss": 7.0}}, "general_loss": base}))
    runs.write_launch(d, {"method": "esft", "lr": 3e-3, "steps": 60}, task, None, baseline,
                      selection={"metric": "token", "p": 0.2})
    (d / "train" / "run.json").write_text(json.dumps({"method": "esft", "status": "complete", "step": 60,
                                                      "trainable_params": 270336}))
    (d / "train" / "eval.json").write_text(json.dumps({"tasks": {task: {"score": score, "loss": 0.4}},
                                                       "general_loss": general}))


def test_results_page_shows_a_benchmark_file(monkeypatch, tmp_path):
    _finished_run(tmp_path / "work", "law", 0.69, 4.9, 4.4)
    at = _app(monkeypatch, tmp_path)
    assert at.selectbox(key="bench_file").value == str(b.list_files()[0])  # newest first
    at.selectbox(key="bench_file").set_value(str(DIAG)).run()
    assert not at.exception and not at.warning
    scores, trade, params = _datasets(at)
    fft = next(r for r in scores if r["method"] == "fft" and r["task"] == "mean")
    assert (fft["score"], fft["lo"], fft["hi"]) == pytest.approx((0.4925, 0.465, 0.5175))
    assert len(trade) == 13 + 4  # the points + the front line's 4 points
    assert {r["label"] for r in trade if r["pareto"]} == {"fft lr=0.0001", "fft lr=0.0003", "fft lr=0.001",
                                                          "esft_token_answer lr=0.001"}
    assert {r["method"] for r in params} == {"fft", "lora", "esft_token", "esft_token_answer", "random_token"}
    sweep, comp = at.dataframe[0].value, at.dataframe[1].value
    assert isinstance(sweep, pd.DataFrame) and sweep[sweep["chosen"]]["lr"].tolist() == [1e-3, 3e-3, 3e-3, 3e-3]
    row = comp[comp["comparison"] == "esft_token - lora task score"].iloc[0]
    assert (row["value"], row["lo"], row["hi"], bool(row["significant"])) == (-0.1475, -0.1825, -0.1125, True)
    at.selectbox(key="bench_task").set_value("law").run()
    (_, trade, _) = _datasets(at)
    assert next(r for r in trade if r["method"] == "fft" and r["lr"] == 1e-3)["task score"] == pytest.approx(0.915)
    at.toggle(key="bench_mine").set_value(True).run()  # the user's run on law beside the benchmark's law points
    (_, trade, _) = _datasets(at)
    mine = [r for r in trade if r["method"] == "your runs: ESFT-Token"]
    assert len(mine) == 1 and (mine[0]["task score"], mine[0]["general loss rise"]) == pytest.approx((0.69, 0.5))

    # another folder: a sweep file with unknown methods and missing parts, and a broken file
    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "compare_methods_quick_sweep_p.json").write_text(json.dumps(sweep_file()))
    (folder / "compare_methods_broken.json").write_text("{")
    at.text_input(key="bench_dir").set_value(str(folder)).run()
    at.selectbox(key="bench_file").set_value(str(folder / "compare_methods_broken.json")).run()
    assert not at.exception and "not valid JSON" in at.warning[0].value and not at.get("vega_lite_chart")
    at.selectbox(key="bench_file").set_value(str(folder / "compare_methods_quick_sweep_p.json")).run()
    assert not at.exception and not at.warning
    infos = [i.value for i in at.info]
    assert any("'sweep'" in i for i in infos) and any("'comparisons'" in i for i in infos)
    scores, trade, params = _datasets(at)
    assert len(params) == 7 + 4 and any(r.get("lora_r") == 32 for r in params)  # points + front line
    assert any("swept: top_p, lora_r" in c.value for c in at.caption)
    shutil.rmtree(folder)
    at.run()
    assert not at.exception and "No `compare_methods*.json`" in at.info[0].value
