"""Recording at scale: aggregate-only runs (--routes), the gate scale and scale-free gate score, dropped
non-expert slots, and data-parallel recording under torchrun (2 CPU ranks, gloo) = one process, row for row."""

import json
import os
import subprocess
import sys

import pytest

from esft_core.errors import EsftError
from esft_core.models.loading import save_tiny, tiny_moe, tiny_tokenizer
from esft_core.selection.scores import load_scores
from esft_core.traces import record, staging, store

RECORDS = [{"text": f"sample {i}: " + "abc xyz " * (1 + i % 7)} for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_routes_modes_keep_scores(tok, tmp_db):
    model = tiny_moe("deepseek_v3", seed=2)  # scaled sigmoid router: gate scale != 1
    kw = dict(max_tokens=300, seq_len=40, batch_size=4)
    runs = {m: record.record(model, tok, RECORDS, tmp_db, m.replace(":", "_"), routes=m, **kw)
            for m in ("all", "none", "sample:3")}
    for metric in ("gate", "token", "gate_norm"):
        for norm in ("token", "sample"):
            ref = load_scores(tmp_db, "all", metric, norm).values
            for task in ("none", "sample_3"):
                assert load_scores(tmp_db, task, metric, norm).values == pytest.approx(ref, abs=1e-6)
    with store.reader(tmp_db) as con:
        n = {t: con.execute("SELECT count(*) FROM routes WHERE run_id = ?", [r]).fetchone()[0]
             for t, r in runs.items()}
        assert n["none"] == 0 < n["sample:3"] < n["all"]
        assert con.execute("SELECT max(sample_id) FROM routes WHERE run_id = ?", [runs["sample:3"]]).fetchone()[0] == 2
        assert con.execute("SELECT count(*) FROM expert_tokens WHERE run_id = ?", [runs["none"]]).fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM tokens WHERE run_id = ?", [runs["none"]]).fetchone()[0] > 0
        assert "aggregate-only" in store.routes_note(con, runs["none"])
        assert "first 3 samples" in store.routes_note(con, runs["sample:3"])
        assert store.routes_note(con, runs["all"]) is None
        params = json.loads(con.execute("SELECT params FROM runs WHERE run_id = ?", [runs["none"]]).fetchone()[0])
        assert params["routes"] == "none" and "dropped_slots" in params
        # the gate scale: mean per-token top-K weight sum per layer, equal to what the routes say
        scale = con.execute("SELECT layer, weight_sum / n_tokens, weight_sum_min, weight_sum_max FROM layer_stats "
                            "WHERE run_id = ? ORDER BY layer", [runs["all"]]).fetchall()
        from_routes = con.execute("""SELECT layer, avg(s), min(s), max(s) FROM (SELECT layer, sum(weight) s FROM routes
                                     WHERE run_id = ? GROUP BY sample_id, position, layer) GROUP BY layer
                                     ORDER BY layer""", [runs["all"]]).fetchall()
    for a, b in zip(scale, from_routes, strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-5)
    assert all(abs(s[1] - 1.0) > 0.05 for s in scale)  # this router does scale its weights
    g = load_scores(tmp_db, "all", "gate_norm", "token").values
    assert g.sum(axis=1) == pytest.approx(1.0, abs=1e-6)  # scale-free: a distribution over experts per layer
    raw = load_scores(tmp_db, "all", "gate", "token").values
    assert raw.sum(axis=1) == pytest.approx([s[1] for s in scale], rel=1e-5)
    with pytest.raises(EsftError, match="--routes: expected all, none or sample:N"):
        record.record(model, tok, RECORDS, tmp_db, "bad", routes="some")


def test_zero_computation_experts_are_dropped_and_counted(tok, tmp_db):
    model = tiny_moe("longcat_flash", seed=0, zero_expert_num=4)
    run = record.record(model, tok, RECORDS, tmp_db, "t", max_tokens=300, seq_len=40, batch_size=4)
    with store.reader(tmp_db) as con:
        e, max_e = con.execute("SELECT num_experts, (SELECT max(expert) FROM routes) FROM runs WHERE run_id = ?",
                               [run]).fetchone()
        dropped = con.execute("SELECT sum(n_dropped) FROM layer_stats WHERE run_id = ?", [run]).fetchone()[0]
        n_routes, n_tok, k = con.execute("SELECT (SELECT count(*) FROM routes), n_tokens, top_k FROM runs").fetchone()
        zero_w = con.execute("SELECT count(*) FROM routes WHERE weight = 0").fetchone()[0]
    assert e == 8 and max_e < 8
    # transformers >= 5.25 passes the identity slots on as (a real expert id, weight 0): not routes either
    assert zero_w == 0
    assert dropped > 0 and n_routes + dropped == n_tok * 3 * k  # 3 MoE layers


TORCHRUN_TIMEOUT = 240


def test_torchrun_two_ranks_equal_one_process(tmp_path, run_esft):
    model_dir = save_tiny(tmp_path / "tiny", "qwen3_moe", seed=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    one, two = tmp_path / "one.duckdb", tmp_path / "two.duckdb"
    args = ["record", "--model", model_dir, "--data", data, "--task", "t", "--max-tokens", "400", "--seq-len",
            "32", "--batch-size", "3", "--quiet"]
    r = run_esft(*args, "--db", one)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "esft_core.cli", *map(str, args), "--db", str(two)], capture_output=True, text=True,
                       env=env, timeout=TORCHRUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run 1 (record) of task 't'") == 1  # rank 0 reports the one run
    q = {t: f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL" for t in
         ("samples", "tokens", "routes", "expert_stats", "expert_tokens", "sample_expert_stats", "layer_stats",
          "expert_norm_stats")}
    with store.reader(one) as a, store.reader(two) as b:
        assert b.execute("SELECT status, n_tokens FROM runs").fetchall() == a.execute(
            "SELECT status, n_tokens FROM runs").fetchall()
        assert json.loads(b.execute("SELECT params FROM runs").fetchone()[0])["world_size"] == 2
        for t, sql in q.items():
            ra, rb = a.execute(sql).fetchall(), b.execute(sql).fetchall()
            assert len(ra) == len(rb) > 0, t
            for x, y in zip(ra, rb, strict=True):  # floats up to batch-shape rounding, everything else exact
                assert list(x) == [
                    pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v for v in y], (t, x, y)
    assert not staging.staging_root(two).exists() or not any(staging.staging_root(two).iterdir())


def test_progressive_ingest_equals_end_ingest_and_cleans_up_on_failure(tok, tmp_db):
    model = tiny_moe("mixtral", seed=5)
    kw = dict(max_tokens=300, seq_len=40, batch_size=3, flush_rows=500)  # many flushes: many early inserts
    a = record.record(model, tok, RECORDS, tmp_db, "end", **kw)
    b = record.record(model, tok, RECORDS, tmp_db, "prog", progressive=True, **kw)
    with store.reader(tmp_db) as con:
        for t in store.TABLES[1:]:
            q = f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ? ORDER BY ALL"
            ra, rb = con.execute(q, [a]).fetchall(), con.execute(q, [b]).fetchall()
            assert len(ra) == len(rb) > 0, t
            for x, y in zip(ra, rb, strict=True):  # aggregates: float sums in another order
                assert list(x) == [pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for v in y], (t, x, y)
    calls = []

    def boom(done, total):  # fail after a few batches, i.e. after some parts were inserted
        calls.append(done)
        if len(calls) == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        record.record(model, tok, RECORDS, tmp_db, "broken", progressive=True, progress=boom, **kw)
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT status FROM runs WHERE task = 'broken'").fetchone()[0] == "failed"
        for t in store.PROGRESSIVE_TABLES:
            assert con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [b + 1]).fetchone()[0] == 0


def test_bf16_model_records_and_bad_dtype_is_refused(tok, tmp_db, tmp_path, run_esft):
    import torch

    model = tiny_moe("deepseek_v3", seed=2).to(torch.bfloat16)
    run = record.record(model, tok, RECORDS, tmp_db, "bf16", max_tokens=200, seq_len=40, batch_size=4)
    with store.reader(tmp_db) as con:
        n_t, k, n_l = con.execute("SELECT n_tokens, top_k, len(layers) FROM runs WHERE run_id = ?", [run]).fetchone()
        assert con.execute("SELECT count(*) FROM routes WHERE isfinite(weight) AND weight > 0").fetchone()[0] == \
            n_t * k * n_l
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    r = run_esft("record", "--data", data, "--task", "t", "--db", tmp_path / "x.duckdb", "--dtype", "fp8")
    assert r.returncode == 2 and "--dtype: invalid choice: 'fp8'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.duckdb").exists()


def test_select_on_gate_norm(tok, tmp_db, run_esft):
    model = tiny_moe("deepseek_v3", seed=2)
    record.record(model, tok, RECORDS, tmp_db, "t", max_tokens=200, seq_len=40, batch_size=4)
    r = run_esft("select", "--db", tmp_db, "--task", "t", "--metric", "gate_norm", "--top-p", "0.5")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["experts"] and all(len(v) >= 1 for v in cfg["experts"].values())
    r = run_esft("select", "--db", tmp_db, "--task", "t", "--metric", "gate_norm", "--top-p", "0.5",
                 "--bootstrap", "10")
    assert r.returncode == 2 and "--bootstrap supports --metric gate or token" in r.stderr


def test_token_sums_and_their_merge_equal_a_group_by():
    import numpy as np

    from esft_core.traces.writer import TokenSums, _token_key, token_sums

    rng = np.random.default_rng(0)
    layers, want = [2, 3, 5], {}
    sums = TokenSums()
    for _ in range(7):  # batches of (L, T, K) routes, dropped slots (-1), repeated token ids
        experts = rng.integers(-1, 8, (3, 40, 2)).astype(np.int16)
        weights = rng.random((3, 40, 2)).astype(np.float32)
        token_ids = rng.integers(0, 15, 40).astype(np.int32)
        part = token_sums(layers, experts, weights, token_ids, experts >= 0)
        assert np.all(np.diff(part["key"].to_numpy()) > 0)  # sorted, one row per key
        sums.add(part)
        for li, layer in enumerate(layers):
            for t in range(40):
                for k in range(2):
                    if experts[li, t, k] >= 0:
                        key = int(_token_key(np.array([layer]), experts[li, t, k:k + 1], token_ids[t:t + 1])[0])
                        n, g = want.get(key, (0, 0.0))
                        want[key] = (n + 1, g + float(weights[li, t, k]))
    assert len(sums.parts) < 7  # merged as it goes
    total = sums.total()
    got = dict(zip(total["key"].to_pylist(), zip(total["n"].to_pylist(), total["gate_sum"].to_pylist(), strict=True),
                   strict=True))
    assert got.keys() == want.keys()
    for key, (n, g) in want.items():
        assert got[key][0] == n and got[key][1] == pytest.approx(g, rel=1e-12)


def test_in_memory_recording_equals_parquet_parts_and_stages_nothing(tok, tmp_db):
    model = tiny_moe("qwen3_moe", seed=6)
    kw = dict(max_tokens=300, seq_len=40, batch_size=3)
    a = record.record(model, tok, RECORDS, tmp_db, "parts", flush_rows=500, **kw)  # spills many Parquet parts
    seen = []
    b = record.record(model, tok, RECORDS, tmp_db, "memory", **kw,  # default: tables held until the one ingest
                      progress=lambda d, t: seen.append(list(staging.staging_root(tmp_db).rglob("*.parquet"))))
    assert seen and not any(seen)  # no Parquet part was written while it recorded
    with store.reader(tmp_db) as con:
        for t in store.TABLES[1:]:
            q = f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ? ORDER BY ALL"
            ra, rb = con.execute(q, [a]).fetchall(), con.execute(q, [b]).fetchall()
            assert len(ra) == len(rb) > 0, t
            for x, y in zip(ra, rb, strict=True):
                assert list(x) == [pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for v in y], (t, x, y)
    assert not staging.staging_root(tmp_db).exists() or not any(staging.staging_root(tmp_db).iterdir())


HOLD_DB = """import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=True)
print("holding", flush=True)
sys.stdin.readline()
"""


def test_progressive_insert_falls_back_to_parquet_while_a_reader_holds_the_db(tmp_db):
    import numpy as np
    import pyarrow as pa

    from esft_core.traces.writer import Writer

    run = staging.StagedRun(tmp_db, "t", "m", 4, 1, [1], {})
    writer = Writer(run, flush_rows=1, progressive=True, threaded=False)

    def batch(sid: int):
        tables = {"samples": pa.table({"run_id": np.zeros(1, np.int32), "sample_id": np.array([sid], np.int32),
                                       "n_tokens": np.array([1], np.int32), "text": ["x"]}),
                  "tokens": pa.table({"run_id": np.zeros(1, np.int32), "sample_id": np.array([sid], np.int32),
                                      "position": np.zeros(1, np.int32), "token_id": np.array([7], np.int32),
                                      "token_text": ["x"]}),
                  "routes": pa.table({"run_id": np.zeros(1, np.int32), "sample_id": np.array([sid], np.int32),
                                      "position": np.zeros(1, np.int32), "layer": np.ones(1, np.int16),
                                      "rank": np.zeros(1, np.int8), "expert": np.array([sid % 4], np.int16),
                                      "weight": np.ones(1, np.float32)}),
                  "sample_expert_stats": record.stats_table(0, [1], np.eye(4)[[sid % 4]][:, None, :],
                                                            np.eye(4)[[sid % 4]][:, None, :],
                                                            np.eye(4)[[sid % 4]][:, None, :], sample_ids=[sid])}
        return lambda: tables

    writer.put(batch(0))  # inserted into the DB at once
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DB, str(tmp_db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        writer.put(batch(1))  # the DB is locked: staged as Parquet parts, the recording goes on
        assert sorted(p.name.rsplit("-", 1)[0] for p in run.dir.glob("*.parquet")) == [
            "routes", "sample_expert_stats", "samples", "tokens"]
    finally:
        holder.communicate("\n", timeout=30)
    writer.put(batch(2))  # free again: this flush and the staged rows are inserted (the stats wait for the commit)
    assert [p.name.rsplit("-", 1)[0] for p in run.dir.glob("*.parquet")] == ["sample_expert_stats"]
    writer.close()
    run.hold({"layer_stats": record.LayerScale(1, "cpu").table([1])})
    assert run.commit() == (3, 3)
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT list(sample_id ORDER BY sample_id) FROM routes").fetchone()[0] == [0, 1, 2]
        assert con.execute("SELECT sum(n_selected) FROM expert_stats").fetchone()[0] == 3


def test_device_map_auto_records_the_same_rows(tmp_path, tok, tmp_db, run_esft):
    from esft_core.models.loading import load_model

    model_dir = save_tiny(tmp_path / "tiny", "deepseek_v2", seed=3)
    kw = dict(max_tokens=200, seq_len=32, batch_size=4)
    plain, _ = load_model(model_dir)
    mapped, _ = load_model(model_dir, device_map="auto")  # Accelerate's placement: all on the CPU here
    a = record.record(plain, tok, RECORDS, tmp_db, "plain", **kw)
    b = record.record(mapped, tok, RECORDS, tmp_db, "mapped", **kw)
    with store.reader(tmp_db) as con:
        for t in ("tokens", "routes", "expert_tokens", "sample_expert_stats"):
            q = f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ? ORDER BY ALL"
            assert con.execute(q, [a]).fetchall() == con.execute(q, [b]).fetchall(), t
    r = run_esft("record", "--model", model_dir, "--data", tmp_path / "none.jsonl", "--task", "t", "--db",
                 tmp_path / "x.duckdb", "--device-map", "everywhere")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--device-map" in r.stderr and "auto" in r.stderr and not (tmp_path / "x.duckdb").exists()
