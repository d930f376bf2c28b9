"""Explorer queries on real DuckDB files: scores agree with the raw routes, selection follows the authors' stop rule,
overlap/stability are consistent, the SQL console is read-only and bounded, readers survive a concurrent writer."""

from __future__ import annotations

import subprocess
import sys
import time

import duckdb
import numpy as np
import polars as pl
import pytest

from explorer import queries as q
from explorer import sql_console as sc
from explorer import synth

TASKS = ("math", "code", "law")


@pytest.fixture(scope="module")
def sdb(tmp_path_factory):
    db = tmp_path_factory.mktemp("q") / "synth.duckdb"
    synth.synthesize(str(db), tasks=TASKS, tokens_per_task=2048, layers=(1, 2, 3), num_experts=16, top_k=4,
                     sample_len=128, model="m")
    return db


@pytest.mark.parametrize("metric,norm", [("gate", "token"), ("token", "token"), ("gate", "sample"),
                                         ("token", "sample")])
def test_scores_match_direct_computation_from_routes(sdb, metric, norm):
    with q.reading(sdb) as con:
        got = q.expert_scores(con, "m", ["law"], metric, norm)
        val = "r.weight" if metric == "gate" else "1.0 / 4"
        if norm == "token":
            sql = f"""SELECT layer, expert, sum({val}) / (SELECT n_tokens FROM runs WHERE task='law') s
                      FROM routes r WHERE run_id = (SELECT run_id FROM runs WHERE task='law') GROUP BY ALL"""
        else:  # the paper: mean over samples of (1/L_j) Σ_k
            sql = f"""SELECT layer, expert, sum(v) / (SELECT n_samples FROM runs WHERE task='law') s FROM (
                        SELECT r.sample_id, layer, expert, sum({val}) / any_value(s.n_tokens) v
                        FROM routes r JOIN samples s USING (run_id, sample_id)
                        WHERE run_id = (SELECT run_id FROM runs WHERE task='law') GROUP BY ALL) GROUP BY ALL"""
        want = {(int(a), int(b)): float(c) for a, b, c in con.sql(sql).fetchall()}
    assert got.height == 3 * 16  # zero-filled full grid
    for row in got.iter_rows(named=True):
        assert row["score"] == pytest.approx(want.get((row["layer"], row["expert"]), 0.0), rel=1e-6, abs=1e-9)
    if metric == "token":  # each token picks exactly K experts → scores of a layer sum to 1
        sums = got.group_by("layer").agg(pl.col("score").sum())["score"].to_list()
        assert sums == pytest.approx([1.0, 1.0, 1.0])


def test_top_p_uses_authors_stop_rule():
    s = pl.DataFrame({"task": ["t"] * 4, "layer": [1] * 4, "expert": [0, 1, 2, 3], "score": [0.2, 0.5, 0.3, 0.0]})
    sel = q.select_top_p(s, 0.6)
    assert q.selection_dict(sel, "t") == {1: [1, 2]}  # 0.5 < 0.6 → add next; 0.8 ≥ 0.6 → stop
    assert q.selection_dict(q.select_top_p(s, 0.5), "t") == {1: [1]}
    assert q.selection_dict(q.select_top_p(s, 1.0), "t") == {1: [0, 1, 2]}  # zero-score experts never added
    assert q.selection_dict(q.select_top_p(s.with_columns(score=pl.col("score") / 2), 1.0), "t") == {1: [0, 1, 2]}
    # 4-decimal rounding first, as the authors' configs: 0.50004 and 0.5 tie → expert id order
    tie = pl.DataFrame({"task": ["t"] * 2, "layer": [1] * 2, "expert": [0, 1], "score": [0.50004, 0.5]})
    assert q.select_top_p(tie, 0.3).sort("rank")["expert"].to_list() == [0, 1]
    assert q.select_top_p(tie.with_columns(expert=pl.Series([1, 0])), 0.3).filter(pl.col("selected"))[
        "expert"].to_list() == [0]
    assert q.experts_needed(s, 0.6)["n_experts"].to_list() == [2]
    with pytest.raises(ValueError, match="p must be"):
        q.select_top_p(s, 0.0)


def test_concentration_is_monotone_and_ends_at_layer_total(sdb):
    with q.reading(sdb) as con:
        s = q.expert_scores(con, "m", None, "token", "token")
    conc = q.concentration(s)
    for (_task, _layer), g in conc.group_by(["task", "layer"]):
        cum = g.sort("n")["cum"].to_numpy()
        assert np.all(np.diff(cum) >= -1e-12) and cum[-1] == pytest.approx(1.0)
    spread = q.concentration_spread(conc)
    assert (spread["lo"] <= spread["q25"]).all() and (spread["q75"] <= spread["hi"]).all()


def test_overlap_measures(sdb):
    with q.reading(sdb) as con:
        s = q.expert_scores(con, "m", None, "gate", "token")
    shared = q.shared_topk(s, 4)
    assert shared.height == 9
    diag = shared.filter(pl.col("task_a") == pl.col("task_b"))["shared"].to_list()
    assert diag == [4.0, 4.0, 4.0]
    m = {(a, b): v for a, b, v in shared.iter_rows()}
    assert all(m[(a, b)] == m[(b, a)] for a in TASKS for b in TASKS)
    assert all(0 <= v <= 4 for v in m.values())
    w = {(a, b): v for a, b, v in q.weighted_overlap(s).iter_rows()}
    assert w[("law", "law")] == pytest.approx(1.0) and 0 < w[("law", "math")] < 1
    # the same task twice under two names → Jaccard 1 on every layer
    twin = pl.concat([s.filter(pl.col("task") == "law"), s.filter(pl.col("task") == "law").with_columns(
        task=pl.lit("law2"))])
    jac = q.jaccard_by_layer(q.select_top_p(twin, 0.3))
    assert jac["jaccard"].to_list() == [1.0, 1.0, 1.0]


def test_tokens_queries_agree_with_tables(sdb):
    with q.reading(sdb) as con:
        run = q.latest_run(con, "m", "code")
        r = q.sample_routes(con, run, 3, 2)
        assert r.height == 128 and all(len(e) == 4 for e in r["experts"])
        assert r["top_expert"].to_list() == [e[0] for e in r["experts"]]
        w = r["weights"].to_list()
        assert all(x[0] >= x[-1] for x in w)  # rank 0 = highest gate weight
        ids = q.sample_token_ids(con, run, 3)
        assert ids == r["token_id"].to_list()
        tt = q.top_tokens(con, [run], 2, int(r["top_expert"][0]), 5)
        assert 1 <= tt.height <= 5 and ((tt["share"] > 0) & (tt["share"] <= 1.0 + 1e-9)).all()
        assert tt["n"].to_list() == sorted(tt["n"].to_list(), reverse=True)
        ctx = q.expert_contexts(con, run, 2, int(r["top_expert"][0]), 3, 4)
        assert 1 <= ctx.height <= 3
        for row in ctx.iter_rows(named=True):
            tok = con.sql("SELECT token_text FROM tokens WHERE run_id=? AND sample_id=? AND position=?",
                          params=[run, row["sample_id"], row["position"]]).fetchall()[0][0]
            assert row["token"] == tok
        load = q.expert_load(con, [run])
        assert load.group_by("layer").agg(pl.col("load").sum())["load"].to_list() == pytest.approx([1.0] * 3)


def test_contrast_prefers_task_specific_experts(sdb):
    with q.reading(sdb) as con:
        c = q.contrast_selection(con, "m", "law", ["math", "code"], "gate", "token", 0.2)
    # renormalised to 1 per layer; experts the contrast tasks use at least as much get 0
    assert c.group_by("layer").agg(pl.col("score").sum())["score"].to_list() == pytest.approx([1.0] * 3)
    assert c.filter(pl.col("raw") <= pl.col("contrast_mean"))["score"].max() == 0.0
    assert c.filter(pl.col("selected"))["score"].min() > 0


def _cli_select(db, *args) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "esft_core.cli", "select", "--db", str(db), *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _page_dict(frame: pl.DataFrame) -> dict:
    return {str(layer): sorted(frame.filter((pl.col("layer") == layer) & pl.col("selected"))["expert"].to_list())
            for layer in sorted(set(frame["layer"].to_list()))}


def _cfg_dict(cfg: dict) -> dict:
    return {k: sorted(v) for k, v in cfg["experts"].items()}


def test_page_selections_equal_esft_select_for_every_page_option(sdb):
    """Every option the Select & Train page offers (metric, normalisation, p, contrast set and λ, stability) gives
    the same experts on the page as `esft select` (a real subprocess) on the same DB."""
    import itertools
    import json

    for metric, norm, p in itertools.product(("gate", "token"), ("token", "sample"), (0.1, 0.35)):
        with q.reading(sdb) as con:
            scores = q.expert_scores(con, "m", None, metric, norm)
            page_plain = q.select_top_p(scores.filter(pl.col("task") == "law"), p)
            page_con = {lam: q.contrast_selection(con, "m", "law", ["math", "code"], metric, norm, p, lam)
                        for lam in (1.0, 0.5)}
            page_one = q.contrast_selection(con, "m", "law", ["math"], metric, norm, p, 1.0)
        base = ["--task", "law", "--metric", metric, "--normalize", norm, "--top-p", str(p), "--model", "m"]
        assert _page_dict(page_plain) == _cfg_dict(_cli_select(sdb, *base))
        for lam, frame in page_con.items():
            want = _cli_select(sdb, *base, "--contrast", "math,code", "--contrast-weight", str(lam))
            assert _page_dict(frame) == _cfg_dict(want), (metric, norm, p, lam)
        assert _page_dict(page_one) == _cfg_dict(_cli_select(sdb, *base, "--contrast", "math"))
    # stability: the page's bootstrap probabilities are `esft select --bootstrap`'s
    with q.reading(sdb) as con:
        prob, curve = q.stability_view(con, "m", "math", "gate", "token", 0.3, 30)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        _cli_select(sdb, "--task", "math", "--metric", "gate", "--top-p", "0.3", "--bootstrap", "30",
                    "--stability-out", f"{d}/stab.json", "--model", "m")
        stab = json.loads(open(f"{d}/stab.json").read())
    assert _page_dict(prob) == {k: sorted(v) for k, v in stab["selected"].items()}
    got = {}
    for r in prob.filter(pl.col("prob") > 0).iter_rows(named=True):
        got.setdefault(str(r["layer"]), {})[str(r["expert"])] = round(r["prob"], 4)
    assert got == {k: v for k, v in stab["selection_probability"].items() if v}
    assert curve["tokens"].to_list()[-1] == 2048 and curve["jaccard"].to_list()[-1] == 1.0


def test_stability_matches_selection_and_converges(sdb):
    with q.reading(sdb) as con:
        prob, curve = q.stability_view(con, "m", "math", "gate", "token", 0.3, 30)
        s = q.expert_scores(con, "m", ["math"], "gate", "token")
    want = q.selection_dict(q.select_top_p(s, 0.3, round_digits=None), "math")
    got = {layer: sorted(prob.filter((pl.col("layer") == layer) & pl.col("selected"))["expert"].to_list())
           for layer in (1, 2, 3)}
    assert got == want  # the bootstrap path and the score path select the same experts
    assert ((prob["prob"] >= 0) & (prob["prob"] <= 1)).all()
    assert curve["jaccard"].to_list()[-1] == 1.0


def test_sql_console_is_read_only_capped_and_time_limited(sdb):
    r = sc.run_sql(sdb, "SELECT * FROM routes", row_cap=7)
    assert r.frame.height == 7 and r.truncated
    assert sc.run_sql(sdb, "SELECT count(*) AS n FROM runs").frame["n"].to_list() == [3]
    for bad, msg in [("DELETE FROM runs", "read-only"), ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
                     ("SET enable_external_access = true", "locked"), ("SELEC 1", "syntax"),
                     ("ATTACH '/tmp/x.duckdb' AS x", "disabled")]:
        with pytest.raises(ValueError, match=msg):
            sc.run_sql(sdb, bad)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="time limit"):
        sc.run_sql(sdb, "SELECT count(*) FROM range(1000000000000) a, range(10) b", timeout_s=0.3)
    assert time.perf_counter() - t < 5
    # the next query after an interrupt runs at once, with no configuration error (the SQL page's defect 4)
    t = time.perf_counter()
    assert sc.run_sql(sdb, "SELECT 42 AS x").frame["x"].to_list() == [42]
    assert time.perf_counter() - t < 3
    for name, sql in sc.EXAMPLE_QUERIES.items():
        assert sc.run_sql(sdb, sql).frame.height > 0, name


def test_readers_wait_for_a_writer_then_succeed(sdb, tmp_path):
    db = tmp_path / "busy.duckdb"
    db.write_bytes(sdb.read_bytes())
    hold = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(float(sys.argv[2])); c.close()")
    p = subprocess.Popen([sys.executable, "-c", hold, str(db), "1.5"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(q.DbBusy), q.reading(db, wait_s=0.2):
        pass
    t = time.perf_counter()
    with q.reading(db, wait_s=10) as con:  # retries until the writer lets go
        assert con.sql("SELECT count(*) FROM runs").fetchall()[0][0] == 3
    assert time.perf_counter() - t > 0.3
    p.wait(10)


def test_empty_and_missing_databases(tmp_path):
    from esft_core.errors import EsftError

    with pytest.raises(EsftError, match="does not exist"), q.reading(tmp_path / "nope.duckdb"):
        pass
    db = tmp_path / "empty.duckdb"
    duckdb.connect(str(db)).close()
    with q.reading(db) as con:
        assert q.list_runs(con).height == 0 and q.models(con) == []
        assert q.model_layout(con, "x") == {"layers": [], "num_experts": 0, "top_k": 0}
        assert q.expert_scores(con, "x").height == 0


# ---------------------------------------------------------------------------------------- explorer/results.py
def test_model_facts_count_parameters_without_loading(request):
    from explorer_support import cached_model_and_db

    from esft_core.models.loading import load_model
    from explorer import results

    model_dir, _ = cached_model_and_db(request.config.cache.mkdir("esft-explorer"))
    facts = results.model_facts(str(model_dir))
    model, _ = load_model(model_dir)
    assert facts["total"] == sum(p.numel() for p in model.parameters())
    experts = model.model.layers[1].mlp.experts
    assert facts["per_expert"] * facts["num_experts"] == experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert results.model_facts("/nonexistent/model")["total"] is None


def test_selection_editing_config_and_eval_comparison(tmp_path):
    from esft_core.errors import EsftError
    from esft_core.experts.expert_config import ExpertConfig
    from explorer import results

    assert ExpertConfig.parse_ids("3, 1 3,7", 8) == [3, 1, 7]  # order kept (score order), duplicates dropped
    with pytest.raises(EsftError, match="does not exist"):
        ExpertConfig.parse_ids("8", 8)
    with pytest.raises(EsftError, match="not an expert id"):
        ExpertConfig.parse_ids("x1", 8)
    assert ExpertConfig({2: [5, 1], 10: [0], 1: []}).to_json() == (
        '{"experts": {"1": [], "10": [0], "2": [5, 1]}, "shared_experts": false, "non_expert_modules": false}')
    tuned = {"tasks": {"law": {"score": 0.5, "loss": 1.0}}, "general_loss": 2.5}
    base = {"tasks": {"law": {"score": 0.1, "loss": 3.0}}, "general_loss": 2.0}
    cmp = results.compare_eval(tuned, base)
    assert cmp.rows() == [("law score", 0.1, 0.5, pytest.approx(0.4)), ("law loss", 3.0, 1.0, -2.0),
                          ("general loss", 2.0, 2.5, 0.5)]
    from esft_core.workspace.runs import RunInfo

    d = tmp_path / "r1"
    (d / "train" / "adapter").mkdir(parents=True)
    (d / "train" / "adapter" / "a.bin").write_bytes(b"x" * 2**20)
    runs = [RunInfo(d, {"task": "law", "config": {"method": "esft"}},
                    {"method": "esft", "status": "complete", "step": 3, "trainable_params": 10}, "complete", None,
                    [{"step": 1, "loss": 2.0, "elapsed": 1.0, "step_time": 0.5}], tuned, base, 2**21)]
    table = results.runs_table(runs)
    row = table.row(0, named=True)
    assert row["adapter MB"] == 1.0 and row["peak RSS MB"] == 2.0 and row["general loss rise"] == 0.5
    assert row["task score"] == 0.5 and row["task loss"] == 1.0 and row["final loss"] == 2.0


def test_shared_experts_list_what_the_matrix_counts(sdb):
    with q.reading(sdb) as con:
        s = q.expert_scores(con, "m", None, "gate", "token")
        ids = q.complete_runs(con)["run_id"].to_list()
        assert all(q.run_detail(con, r) == {"tokens": True, "text": True} for r in ids)
        assert q.run_detail(con, 999) == {"tokens": False, "text": False} and q.models_with_tokens(con) == ["m"]
    m = {(a, b): v for a, b, v in q.shared_topk(s, 4).iter_rows()}
    both = q.shared_experts(s, "law", "math", 4)
    assert both.height / 3 == pytest.approx(m[("law", "math")])  # 3 layers
    assert q.shared_experts(s, "law", "law", 4).height == 12


def test_run_notes_delete_and_tradeoff(tmp_path):
    from esft_core.errors import EsftError
    from esft_core.workspace import runs
    from explorer import results

    d = runs.new_run_dir(tmp_path, "law", "esft")
    runs.write_launch(d, {"method": "esft", "lr": 1e-3, "steps": 4}, "law", None, None,
                      selection={"metric": "gate", "p": 0.1, "contrast": ["math"]})
    runs.annotate(d, label="gate p=0.1", tags=["paper", " ", "paper", "a"], notes="first try")
    info = runs.read_run(d)
    assert info.label == "gate p=0.1" and info.notes["tags"] == ["a", "paper"] and info.method_label == "ESFT-Gate"
    with pytest.raises(EsftError, match="one line"):
        runs.annotate(d, label="x\ny")
    row = results.runs_table([info]).row(0, named=True)
    assert (row["label"], row["method"], row["lr"], row["p"], row["contrast"], row["tags"]) == (
        "gate p=0.1", "ESFT-Gate", 1e-3, 0.1, "math", "a, paper")
    runs.delete_run(d)
    assert not d.exists()
    with pytest.raises(EsftError):
        runs.annotate(d, label="gone")
    t = pl.DataFrame({"label": list("abcd"), "task score": [0.5, 0.4, 0.7, 0.6],
                      "general loss rise": [0.1, 0.2, 0.5, 0.6]})
    front = dict(zip(*results.tradeoff(t).select("label", "pareto").to_dict(as_series=False).values(), strict=True))
    assert front == {"a": True, "b": False, "c": True, "d": False}
    sm = results.smooth(pl.DataFrame({"run": ["r"] * 3, "step": [1, 2, 3], "loss": [3.0, 1.0, 1.0]}), 0.5)
    assert sm["loss"][0] == 3.0 and 1.0 < sm["loss"][1] < 3.0
