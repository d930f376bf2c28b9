"""Scores (SQL, both normalisations), selection rules, contrast and bootstrap stability on real DuckDB runs."""

import numpy as np
import pyarrow as pa
import pytest

from esft_core.errors import EsftError
from esft_core.experts.expert_config import ExpertConfig
from esft_core.selection.scores import SCORES, compute_scores, get_score, load_scores, score_sql
from esft_core.selection.select import (
    contrast,
    parse_expert_lists,
    select,
    select_for_task,
    stability,
    top_k,
    top_p,
)
from esft_core.traces import staging, store


def run_tables(routing: list[list[list[tuple[int, float]]]]) -> dict[str, pa.Table]:
    """routing[sample][position] = [(expert, weight)] * K for a single MoE layer 1 (rank order as given)."""
    rows = {k: [] for k in ("sample_id", "position", "rank", "expert", "weight")}
    for s, sample in enumerate(routing):
        for p, token in enumerate(sample):
            for r, (e, w) in enumerate(token):
                for k, v in zip(rows, (s, p, r, e, w), strict=True):
                    rows[k].append(v)
    n = len(rows["expert"])
    routes = pa.table({"run_id": pa.array([0] * n, pa.int32()), "sample_id": pa.array(rows["sample_id"], pa.int32()),
                       "position": pa.array(rows["position"], pa.int32()), "layer": pa.array([1] * n, pa.int16()),
                       "rank": pa.array(rows["rank"], pa.int8()), "expert": pa.array(rows["expert"], pa.int16()),
                       "weight": pa.array(rows["weight"], pa.float64())})
    samples = pa.table({"run_id": pa.array([0] * len(routing), pa.int32()),
                        "sample_id": pa.array(range(len(routing)), pa.int32()),
                        "n_tokens": pa.array([len(s) for s in routing], pa.int32()),
                        "text": pa.nulls(len(routing), pa.string())})
    return {"samples": samples, "routes": routes}


def add_run(db, task, routing, num_experts=4, k=2):
    meta = dict(task=task, model="m", source="record", num_experts=num_experts, top_k=k, layers=[1], params={})
    return store.ingest_arrow(db, meta, run_tables(routing), exact_weights=True)


# sample 0: 3 tokens, sample 1: 1 token; K=2 of E=4
ROUTING = [[[(0, 0.6), (1, 0.2)], [(0, 0.5), (2, 0.3)], [(1, 0.4), (0, 0.4)]], [[(3, 0.9), (2, 0.1)]]]


def test_registry_and_formulas(tmp_db):
    assert set(SCORES) == {"gate", "token", "gate_norm"}
    add_run(tmp_db, "t", ROUTING)
    with store.reader(tmp_db) as con:
        tok = compute_scores(con, "t", "token", "token")
        assert tok.values[0].tolist() == pytest.approx([3 / 8, 2 / 8, 2 / 8, 1 / 8])
        gate = compute_scores(con, "t", "gate", "token")
        assert gate.values[0].tolist() == pytest.approx([1.5 / 4, 0.6 / 4, 0.4 / 4, 0.9 / 4])
        tok_s = compute_scores(con, "t", "token", "sample")  # 1/N_s Σ_j 1/L_j Σ_k 1(.)/K
        assert tok_s.values[0].tolist() == pytest.approx([(3 / 3) / 4, (2 / 3) / 4, (1 / 3 + 1) / 4, 1 / 4])
        gate_s = compute_scores(con, "t", "gate", "sample")
        assert gate_s.values[0].tolist() == pytest.approx([(1.5 / 3) / 2, (0.6 / 3) / 2, (0.3 / 3 + 0.1) / 2,
                                                          0.9 / 2])
        assert (tok.n_tokens, tok.n_samples, tok.top_k, tok.layers) == (4, 2, 2, [1])
        # the SQL is usable as is
        assert len(con.execute(score_sql("gate", "token", tok.run_ids)).fetchall()) == 4
    with pytest.raises(EsftError, match="unknown metric 'x'; choose one of gate, token"):
        get_score("x")
    with pytest.raises(EsftError, match="unknown normalization"):
        load_scores(tmp_db, "t", "gate", "per-layer")


def test_runs_pool_and_failed_runs_are_ignored(tmp_db):
    add_run(tmp_db, "t", ROUTING)
    add_run(tmp_db, "t", [[[(3, 1.0), (2, 0.0)]]] * 4)
    run = staging.StagedRun(tmp_db, "t", "m", 4, 2, [1], {})  # a 'running' run with rows staged: ignored
    run.stage(run_tables([[[(0, 1.0), (1, 0.0)]]]))
    s = load_scores(tmp_db, "t", "token", "token")
    assert s.run_ids == [1, 2]
    assert s.values[0].tolist() == pytest.approx([3 / 16, 2 / 16, 6 / 16, 5 / 16])
    assert load_scores(tmp_db, "t", "token", "token", run_ids=[2]).values[0].tolist() == [0, 0, 0.5, 0.5]


def test_top_p_stop_rule_and_rounding():
    row = np.array([0.5, 0.3, 0.2, 0.0])
    assert top_p(row, 0.5) == [0]  # running sum 0.5 is not < 0.5: stop
    assert top_p(row, 0.51) == [0, 1]
    assert top_p(row, 1.0) == [0, 1, 2]  # zero-score experts are never added
    # ties (after rounding to 4 decimals) go to the lower expert id, as the authors' stable sort
    assert top_p(np.array([0.10001, 0.1, 0.3]), 0.35) == [2, 0]
    assert top_p(np.array([0.10001, 0.1, 0.3]), 0.35, round_digits=None) == [2, 0]
    assert top_p(np.array([0.1, 0.10001, 0.3]), 0.35) == [2, 0]
    assert top_p(np.array([0.1, 0.10001, 0.3]), 0.35, round_digits=None) == [2, 1]
    for bad in (0, -0.1, 1.01):
        with pytest.raises(EsftError, match=r"--top-p must be in \(0, 1\]"):
            top_p(row, bad)


def test_top_k_include_exclude():
    row = np.array([0.4, 0.3, 0.2, 0.1])
    assert top_k(row, 2) == [0, 1]
    assert top_k(row, 2, exclude={0}) == [1, 2]
    assert top_k(row, 2, include=[3]) == [0, 3]
    assert top_p(row, 0.5, include=[3]) == [0, 3]  # 0.1 (forced) + 0.4 ≥ 0.5
    assert top_p(row, 0.5, exclude={0}) == [1, 2]
    spec = parse_expert_lists(["*:1", "2:0,3"], [1, 2], 4, "--include")
    assert spec == {1: {1}, 2: {0, 1, 3}}
    with pytest.raises(EsftError, match="layer 5 is not an MoE layer"):
        parse_expert_lists(["5:1"], [1, 2], 4, "--include")
    with pytest.raises(EsftError, match="expert 9 out of range"):
        parse_expert_lists(["1:9"], [1, 2], 4, "--exclude")
    with pytest.raises(EsftError, match="expected LAYER:E1,E2"):
        parse_expert_lists(["3"], [1, 2], 4, "--exclude")
    assert ExpertConfig({2: [1], 10: [3, 0]}).to_dict() == {"experts": {"10": [3, 0], "2": [1]},
                                                        "shared_experts": False, "non_expert_modules": False}


def test_select_and_contrast(tmp_db):
    # task uses expert 0 (shared by everything) and expert 3 (task-specific); general uses 0 and 1
    add_run(tmp_db, "task", [[[(0, 0.6), (3, 0.4)]] * 4])
    add_run(tmp_db, "general", [[[(0, 0.6), (1, 0.4)]] * 4])
    with store.reader(tmp_db) as con:
        s = compute_scores(con, "task", "token")
        g = compute_scores(con, "general", "token")
        assert select(s, p=0.5).experts == {1: [0]}  # tie 0.5/0.5 → lower id first
        c = contrast(s, g)
        assert c.values.tolist() == [[0.0, 0.0, 0.0, 1.0]]
        assert select_for_task(con, "task", "token", p=0.5, contrast_tasks=["general"]).experts == {1: [3]}
        assert select_for_task(con, "task", "token", k=1, exclude_specs=["1:0"]).experts == {1: [3]}
        with pytest.raises(EsftError, match="exactly one of --top-p or --top-k"):
            select(s)
        with pytest.raises(EsftError, match="both included and excluded"):
            select_for_task(con, "task", "token", p=0.5, include_specs=["1:3"], exclude_specs=["*:3"])


def test_stability_bootstrap(tmp_db):
    rng = np.random.default_rng(0)
    # 40 samples; expert 0 dominant everywhere, expert 1 vs 2 close → unstable between them
    routing = []
    for _ in range(40):
        n = int(rng.integers(3, 8))
        routing.append([[(0, 0.7), (int(rng.choice([1, 2], p=[0.52, 0.48])), 0.3)] for _ in range(n)])
    add_run(tmp_db, "t", routing)
    with store.reader(tmp_db) as con:
        st = stability(con, "t", "token", "token", p=0.6, n_boot=200, n_orders=10, seed=1)
        st2 = stability(con, "t", "token", "token", p=0.6, n_boot=200, n_orders=10, seed=1)
        with pytest.raises(EsftError, match="--bootstrap must be >= 1"):
            stability(con, "t", "token", "token", p=0.6, n_boot=0)
    con = store.connect(tmp_db)  # a DB from before sample_expert_stats existed: stability reads the routes
    con.execute("DROP TABLE sample_expert_stats")
    con.close()
    with store.reader(tmp_db) as con:
        assert stability(con, "t", "token", "token", p=0.6, n_boot=200, n_orders=10, seed=1) == st
    assert st == st2  # seeded
    prob = st["selection_probability"]["1"]
    assert prob["0"] == 1.0  # always selected
    assert 0 < prob["1"] < 1 and 0 < prob["2"] < 1  # the close call flips between resamples
    assert prob["1"] + prob["2"] == pytest.approx(1.0)  # exactly one of them completes p = 0.6
    assert st["selected"]["1"][0] == 0 and len(st["selected"]["1"]) == 2
    assert 0 < st["tokens_to_stable"]["all_layers"] <= st["n_tokens"] == sum(len(s) for s in routing)
    assert 0 <= st["same_selection_rate"]["1"] < 1


def test_select_refuses_bad_inputs_in_one_line_and_writes_nothing(tmp_db, tmp_path):
    """nan/inf contrast weights, contrast against the task itself, excluding every expert, a negative --round,
    --top-k above the expert count, and an all-zero selection: exit 2, one line naming the flag, no --out file."""
    import subprocess
    import sys

    add_run(tmp_db, "task", [[[(0, 0.6), (3, 0.4)]] * 4])
    add_run(tmp_db, "general", [[[(0, 0.7), (1, 0.3)]] * 4])
    add_run(tmp_db, "same", [[[(0, 0.6), (3, 0.4)]] * 4])
    out = tmp_path / "cfg.json"
    base = ["select", "--db", str(tmp_db), "--task", "task", "--metric", "gate", "--out", str(out)]
    cases = [(["--top-p", "0.5", "--contrast", "general", "--contrast-weight", "nan"], "--contrast-weight"),
             (["--top-p", "0.5", "--contrast", "general", "--contrast-weight", "inf"], "--contrast-weight"),
             (["--top-p", "0.5", "--contrast", "task"], "cannot be contrasted against itself"),
             (["--top-p", "0.5", "--exclude", "1:0,1,2,3"], "--exclude removes every expert of layer 1"),
             (["--top-p", "0.5", "--round", "-1"], "--round must be"),
             (["--top-k", "5"], "--top-k 5 is larger than the number of experts"),
             (["--top-p", "0.5", "--contrast", "same"], "selection of task 'task' is empty")]
    procs = [subprocess.Popen([sys.executable, "-m", "esft_core.cli", *base, *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for extra, _ in cases]
    before = tmp_db.read_bytes()
    for (extra, want), p in zip(cases, procs, strict=True):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert err.startswith("esft select: error: ") and want in err, (extra, err)
    assert not out.exists() and tmp_db.read_bytes() == before
    # the library refuses the same way
    with store.reader(tmp_db) as con, pytest.raises(EsftError, match="finite"):
        select_for_task(con, "task", "gate", p=0.5, contrast_tasks=["general"], contrast_weight=float("-inf"))
