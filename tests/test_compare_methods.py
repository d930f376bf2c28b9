"""bench/compare_methods.py's fixed lr rule and summary (the statistics path), on constructed per-example rows."""

import importlib.util
import json
import zlib

import numpy as np
import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("compare_methods", REPO / "bench" / "compare_methods.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)

TASKS = ["law", "math"]


def row(method, task, lr, seed, val, general_val, eval_p=0.5, rise=0.0, n=200):
    rng = np.random.default_rng(zlib.crc32(repr((method, task, lr, seed)).encode()))
    r = {"method": method, "task": task, "lr": lr, "seed": seed, "val_score": val, "general_val_loss": general_val,
         "eval_scores": (rng.random(n) < eval_p).astype(float).tolist(), "eval_loss": 1.0,
         "general_eval_losses": (4.0 + rise + 0.1 * rng.standard_normal(64)).tolist()}
    r["eval_score"], r["general_eval_loss"] = np.mean(r["eval_scores"]), np.mean(r["general_eval_losses"])
    if method != "vanilla":
        r.update(step_time=0.2, train_peak_rss=100, trainable_params=10, optimizer_bytes=80, adapter_bytes=40)
    return r


def test_lr_rule_best_validation_score_then_general_loss():
    rows = [row("fft", t, lr, 0, val, g) for t in TASKS
            for lr, val, g in ((1e-4, 0.2, 4.0), (3e-4, 0.5, 4.6), (1e-3, 0.5, 4.4))]
    rows += [row("esft_token", t, lr, 0, 0.3, 4.0) for t in TASKS for lr in cm.GRIDS["esft_token"]]
    chosen, table = cm.choose_lrs(rows, ["vanilla", "fft", "esft_token", "random_token"], TASKS)
    assert chosen["fft"] == 1e-3  # tie on score 0.5 → the lower general loss
    assert chosen["esft_token"] == cm.GRIDS["esft_token"][0]  # all tied → the first (lowest) lr with the lowest loss
    assert chosen["random_token"] == chosen["esft_token"]  # the ablation inherits its counterpart's lr
    assert table["fft"][1e-4] == (0.2, 4.0)
    assert all(len(g) == 3 and max(g) / min(g) == pytest.approx(10) for g in cm.GRIDS.values())  # same width
    assert cm.choose_lrs(rows, ["fft"], TASKS, fixed={"fft": 5e-4})[0]["fft"] == 5e-4


def test_summary_keys_cis_and_significance():
    seeds = [0, 1, 2]
    methods = ["vanilla", "fft", "lora", "esft_token", "random_token"]
    rows = [row("vanilla", t, None, 0, 0, 4.0, eval_p=0.0) for t in TASKS]
    for t in TASKS:
        for s in seeds:
            rows += [row("fft", t, 1e-4, s, 0.9, 4.5, eval_p=0.9, rise=1.0),
                     row("lora", t, 1e-3, s, 0.5, 4.3, eval_p=0.5, rise=0.6),
                     row("esft_token", t, 3e-3, s, 0.5, 4.1, eval_p=0.5, rise=0.2),
                     row("random_token", t, 3e-3, s, 0, 0, eval_p=0.5, rise=0.2)]
        for m, grid in (("fft", [3e-4, 1e-3]), ("lora", [3e-3, 1e-2]), ("esft_token", [1e-3, 1e-2])):
            rows += [row(m, t, lr, 0, 0.0, 9.0, eval_p=0.1, rise=2.0) for lr in grid]
    ratios, means, sweep, comps = cm.summarise(rows, TASKS, methods, seeds, n_boot=300)
    e = ratios["esft_token"]
    for k in ("step_time", "peak_rss", "optimizer_bytes", "adapter_bytes", "task_score", "general_loss_rise",
              "minus_lora_task_score", "minus_random_task_score"):
        assert k in e
    assert e["lr"] == 3e-3 and ratios["chosen_lr"] == {"fft": 1e-4, "lora": 1e-3, "esft_token": 3e-3,
                                                       "random_token": 3e-3}
    lo, hi = e["task_score_ci"]
    assert lo < e["task_score"] < hi and hi < 1 and e["task_score_p"] < 0.05  # 0.5/0.9: clearly below FFT
    assert e["general_loss_rise"] == pytest.approx(0.2, abs=0.05) and e["general_loss_rise_p"] < 0.05
    assert e["minus_random_task_score_ci"][0] < 0 < e["minus_random_task_score_ci"][1]  # same p: not significant
    assert means["fft"]["task_score"] == pytest.approx(0.9, abs=0.05)
    json.dumps(ratios, allow_nan=False)  # strict JSON
    assert ratios["esft_gate"]["task_score"] is None  # not run: keys kept, values null
    md = cm.markdown(ratios, means, sweep, comps, {"mode": "test", "model": "m", "tasks": TASKS, "steps": 1,
                                                  "batch_size": 1, "seq_len": 8, "val": 10, "val_limit": 10,
                                                  "eval_limit": 200, "general_eval_docs": 64, "seeds": seeds,
                                                  "n_boot": 300, "elapsed_s": 1.0})
    assert "| esft_token - random_token task score |" in md and "**0.0001**" in md
    front = {(p["method"], p["lr"]): p["pareto"] for p in means["_pareto"]}
    # seed-0 eval points: fft 1e-4 (0.9, rise 1.0) is on the front; the losing sweep lrs (0.1, rise 2.0) are not
    assert front[("fft", 1e-4)] and not front[("fft", 3e-4)] and not front[("lora", 1e-2)]
    assert front[("esft_token", 3e-3)] or front[("random_token", 3e-3)]  # (0.5, 0.2): the lowest rise


def test_table3_methods_grids_and_summary_keys():
    assert set(cm.TABLE3_METHODS) >= {"esft_token_shared", "esft_token_nonexpert", "shared_only", "esft_token", "fft"}
    assert all(m in cm.GRIDS and len(cm.GRIDS[m]) == 3 for m in cm.TABLE3_METHODS[1:])  # every one is swept
    assert cm.GRIDS["esft_token_nonexpert"] == cm.GRIDS["fft"]  # touches what FFT touches besides the experts
    seeds, methods = [0], ["vanilla", "fft", "esft_token", "esft_token_shared", "esft_token_nonexpert", "shared_only"]
    rows = [row("vanilla", t, None, 0, 0, 4.0, eval_p=0.0) for t in TASKS]
    for t in TASKS:
        for m, p, rise in (("fft", 0.9, 1.0), ("esft_token", 0.5, 0.2), ("esft_token_shared", 0.7, 0.5),
                           ("esft_token_nonexpert", 0.9, 0.4), ("shared_only", 0.3, 0.3)):
            rows += [row(m, t, lr, 0, p if i == 1 else 0.1, 4.0, eval_p=p, rise=rise)
                     for i, lr in enumerate(cm.GRIDS[m])]
    ratios, means, sweep, comps = cm.summarise(rows, TASKS, methods, seeds, n_boot=200)
    assert ratios["chosen_lr"] == {m: cm.GRIDS[m][1] for m in methods[1:]}  # the best validation score: the middle
    for m in methods[2:]:
        assert ratios[m]["task_score"] is not None and ratios[m]["lr"] == cm.GRIDS[m][1]
    assert ratios["esft_token_nonexpert"]["minus_esft_token_task_score"] == pytest.approx(0.4, abs=0.1)
    assert ratios["esft_token_nonexpert"]["minus_esft_token_task_score_p"] < 0.05
    assert ratios["shared_only"]["minus_lora_task_score"] is None  # lora not run: key kept, value null
    assert {c["comparison"] for c in comps} >= {"shared_only - esft_token task score",
                                               "esft_token_shared / fft general-loss rise"}


def sweep_rows(knob, values, score_of, rise_of, params_of):
    rows = [row("vanilla", t, None, 0, 0, 4.0, eval_p=0.0) for t in TASKS]
    method = {"top_p": "esft_token", "lora_r": "lora"}[knob]
    for v in values:
        for t in TASKS:
            r = row(method, t, 3e-3, 0, 0.0, 4.0, eval_p=score_of(v), rise=rise_of(v))
            r[knob], r["trainable_params"] = v, params_of(v)
            rows.append(r)
    return rows


def test_sweep_summary_fronts_and_incomplete_points():
    # more experts: higher score, more parameters and a larger rise, except p = 0.35, dominated by p = 0.2
    score = {0.05: 0.1, 0.1: 0.3, 0.2: 0.6, 0.35: 0.5, 0.5: 0.8}
    rows = sweep_rows("top_p", cm.P_GRID, score.get, lambda p: p, lambda p: int(1e6 * p))
    rows = [r for r in rows if not (r.get("top_p") == 0.5 and r["task"] == "math")]  # a killed run
    pts = cm.sweep_summary(rows, TASKS, "esft_token", "top_p", cm.P_GRID, [0], n_boot=200)
    assert [p["top_p"] for p in pts] == [0.05, 0.1, 0.2, 0.35]  # 0.5 lacks a task: left out, not half-averaged
    by = {p["top_p"]: p for p in pts}
    assert by[0.2]["task_score"] == pytest.approx(0.6, abs=0.08)
    lo, hi = by[0.2]["task_score_ci"]
    assert lo < by[0.2]["task_score"] < hi
    assert by[0.2]["general_loss_rise"] == pytest.approx(0.2, abs=0.05)
    assert [p["top_p"] for p in pts if p["pareto_trainable_params"]] == [0.05, 0.1, 0.2]
    assert not by[0.35]["pareto_general_loss_rise"] and by[0.2]["pareto_general_loss_rise"]
    meta = {"mode": "test", "model": "m", "tasks": TASKS, "steps": 1, "batch_size": 1, "seq_len": 8, "eval_limit": 200,
            "general_eval_docs": 64, "seeds": [0], "n_boot": 200, "elapsed_s": 1.0, "knob": "top_p",
            "method": "esft_token", "lr": 3e-3, "lr_source": "the middle"}
    text = cm.sweep_markdown(pts, meta)  # names the knob, the lr and its source
    assert "| 0.35 | 350,000 |" in text and "lr **0.003** (the middle)" in text and "sweep of top-p" in text


def test_run_keys_separate_sweep_points_and_keep_old_keys():
    base = {"method": "lora", "task": "law", "lr": 3e-3, "seed": 0, "steps": 150, "batch_size": 4, "seq_len": 256,
            "val_limit": 100, "eval_limit": 200, "model": "demo", "out": "x"}
    old = json.dumps({k: base[k] for k in ("method", "task", "lr", "seed", "steps", "batch_size", "seq_len",
                                           "val_limit", "eval_limit", "model")}, sort_keys=True)
    assert cm._key(base) == old  # the main comparison's caches stay valid
    keys = {cm._key({**base, "lora_r": r}) for r in cm.RANK_GRID} | {cm._key({**base, "top_p": p}) for p in cm.P_GRID}
    assert len(keys) == len(cm.RANK_GRID) + len(cm.P_GRID) and old not in keys


def test_sweep_lr_from_a_results_file_or_the_grid_middle(tmp_path):
    from esft_core.errors import EsftError

    assert cm.sweep_lr("lora", None) == (cm.GRIDS["lora"][1], "the middle of lora's grid [0.001, 0.003, 0.01]: "
                                                              "no --lr-from given")
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"ratios": {"chosen_lr": {"esft_token": 0.01}}}))
    assert cm.sweep_lr("esft_token", str(f))[0] == 0.01
    with pytest.raises(EsftError, match="no chosen lr for lora"):
        cm.sweep_lr("lora", str(f))
    f.write_text("{}")
    with pytest.raises(EsftError, match="not a compare_methods results JSON"):
        cm.sweep_lr("lora", str(f))


@pytest.mark.parametrize("args, err", [
    (["--sweep", "p", "--table3"], "--sweep runs one method at one lr"),
    (["--lr-from", "x.json"], "--lr-from applies to --sweep only"),
    (["--sweep", "rank", "--lr-from", "/nonexistent.json"], "--lr-from /nonexistent.json: not a compare_methods"),
])
def test_bad_sweep_flags_are_one_line_exit_2(capsys, args, err, tmp_path):
    assert cm.main([*args, "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written
