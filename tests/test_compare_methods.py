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
