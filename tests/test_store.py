"""The trace store on real DuckDB files: schema, ingest + aggregates, locking, stale runs, Parquet export/import."""

import json
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from esft_core.errors import EsftError
from esft_core.traces import exchange, staging, store

CONTRACT = {
    "runs": [("run_id", "INTEGER"), ("task", "VARCHAR"), ("model", "VARCHAR"), ("source", "VARCHAR"),
             ("status", "VARCHAR"), ("num_experts", "INTEGER"), ("top_k", "INTEGER"), ("layers", "INTEGER[]"),
             ("n_samples", "INTEGER"), ("n_tokens", "BIGINT"), ("params", "VARCHAR"), ("created_at", "TIMESTAMP"),
             ("finished_at", "TIMESTAMP")],
    "samples": [("run_id", "INTEGER"), ("sample_id", "INTEGER"), ("n_tokens", "INTEGER"), ("text", "VARCHAR")],
    "tokens": [("run_id", "INTEGER"), ("sample_id", "INTEGER"), ("position", "INTEGER"), ("token_id", "INTEGER"),
               ("token_text", "VARCHAR"), ("loss", "BOOLEAN")],
    "routes": [("run_id", "INTEGER"), ("sample_id", "INTEGER"), ("position", "INTEGER"), ("layer", "SMALLINT"),
               ("rank", "TINYINT"), ("expert", "SMALLINT"), ("weight", "FLOAT")],
    "expert_stats": [("run_id", "INTEGER"), ("layer", "SMALLINT"), ("expert", "SMALLINT"), ("n_selected", "BIGINT"),
                     ("gate_sum", "DOUBLE"), ("sample_token_sum", "DOUBLE"), ("sample_gate_sum", "DOUBLE")],
    "expert_tokens": [("run_id", "INTEGER"), ("layer", "SMALLINT"), ("expert", "SMALLINT"), ("token_id", "INTEGER"),
                      ("token_text", "VARCHAR"), ("n", "BIGINT"), ("gate_sum", "DOUBLE")],
    # added (not in the contract): per-sample pre-aggregate for bootstrap / per-sample views
    "sample_expert_stats": [("run_id", "INTEGER"), ("sample_id", "INTEGER"), ("layer", "SMALLINT"),
                            ("expert", "SMALLINT"), ("n_selected", "INTEGER"), ("gate_sum", "DOUBLE")],
}

META = dict(task="t", model="m", source="record", num_experts=4, top_k=2, layers=[1], params={"x": 1})


def small_run() -> dict[str, pa.Table]:
    """Two samples (2 and 1 tokens), one MoE layer, K=2, E=4."""
    tokens = pa.table({"run_id": [0, 0, 0], "sample_id": [0, 0, 1], "position": [0, 1, 0],
                       "token_id": [5, 6, 5], "token_text": ["a", "b", "a"]})
    routes = pa.table({
        "run_id": pa.array([0] * 6, pa.int32()), "sample_id": pa.array([0, 0, 0, 0, 1, 1], pa.int32()),
        "position": pa.array([0, 0, 1, 1, 0, 0], pa.int32()), "layer": pa.array([1] * 6, pa.int16()),
        "rank": pa.array([0, 1] * 3, pa.int8()), "expert": pa.array([0, 1, 0, 2, 3, 0], pa.int16()),
        "weight": pa.array([0.5, 0.25, 0.75, 0.125, 0.5, 0.5], pa.float32())})
    samples = pa.table({"run_id": [0, 0], "sample_id": pa.array([0, 1], pa.int32()),
                        "n_tokens": pa.array([2, 1], pa.int32()), "text": ["ab", "a"]})
    return {"samples": samples, "tokens": tokens, "routes": routes}


def test_schema_matches_contract(tmp_db):
    con = store.connect(tmp_db)
    for table, cols in CONTRACT.items():
        got = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {table}").fetchall()]
        assert got == cols, table
    con.close()


def test_ingest_writes_rows_and_aggregates(tmp_db):
    run_id = store.ingest_arrow(tmp_db, META, small_run())
    assert run_id == 1
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT status, n_samples, n_tokens, layers, json_extract(params, '$.x')::INT "
                           "FROM runs").fetchall() == [("complete", 2, 3, [1], 1)]
        stats = con.execute("SELECT expert, n_selected, gate_sum, sample_token_sum, sample_gate_sum "
                            "FROM expert_stats ORDER BY expert").fetchall()
        # expert 0: tokens (s0,p0),(s0,p1) of sample 0 (L=2) and (s1,p0) of sample 1 (L=1)
        assert stats == [(0, 3, 1.75, 2.0, 0.625 + 0.5), (1, 1, 0.25, 0.5, 0.125), (2, 1, 0.125, 0.5, 0.0625),
                         (3, 1, 0.5, 1.0, 0.5)]
        per_sample = con.execute("SELECT sample_id, expert, n_selected, gate_sum FROM sample_expert_stats "
                                 "ORDER BY sample_id, expert").fetchall()
        assert per_sample == [(0, 0, 2, 1.25), (0, 1, 1, 0.25), (0, 2, 1, 0.125), (1, 0, 1, 0.5), (1, 3, 1, 0.5)]
        top = con.execute("SELECT expert, token_text, n, gate_sum FROM expert_tokens ORDER BY expert, token_text")
        assert top.fetchall() == [(0, "a", 2, 1.0), (0, "b", 1, 0.75), (1, "a", 1, 0.25), (2, "b", 1, 0.125),
                                  (3, "a", 1, 0.5)]
    assert store.ingest_arrow(tmp_db, {**META, "task": "u"}, small_run()) == 2


def test_reader_needs_existing_db_and_creates_nothing(tmp_db):
    with pytest.raises(EsftError, match="does not exist"):
        store.connect(tmp_db, read_only=True)
    assert not tmp_db.exists()


def test_reader_waits_for_a_writer_in_another_process(tmp_db):
    store.ingest_arrow(tmp_db, META, small_run())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
        "time.sleep(1.5); con.close()"), str(tmp_db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with store.reader(tmp_db, timeout=30) as con:
            waited = time.monotonic() - t0
            assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == 6
        assert waited > 0.3  # it really hit the lock and retried
        with pytest.raises(EsftError, match="locked by another process"):
            holder2 = subprocess.Popen([sys.executable, "-c", (
                "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
                "time.sleep(3)"), str(tmp_db)], stdout=subprocess.PIPE, text=True)
            try:
                holder2.stdout.readline()
                store.connect(tmp_db, read_only=True, timeout=0.3)
            finally:
                holder2.kill()
                holder2.wait()
    finally:
        holder.wait()


def test_staged_run_lifecycle_and_stale_reaping(tmp_db):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = staging.StagedRun(tmp_db, "t", "m", 4, 2, [1], {})
    with store.reader(tmp_db) as con:  # the DB is free while the run records
        assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]
    # pretend the writer died: point its pid at a finished process
    con = store.connect(tmp_db)
    con.execute("UPDATE runs SET params = json_merge_patch(params, ?)", [json.dumps({"pid": int(dead.stdout)})])
    con.close()
    run.stage({k: v for k, v in small_run().items()})
    assert sorted(p.name for p in run.dir.iterdir()) == ["routes-000000.parquet", "samples-000000.parquet",
                                                          "tokens-000000.parquet"]
    second = staging.StagedRun(tmp_db, "t", "m", 4, 2, [1], {})
    assert second.run_id == 2
    assert not run.dir.exists()  # the dead run's staging folder is gone
    second.stage(small_run())
    assert second.commit() == (2, 3)
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT run_id, status FROM runs ORDER BY 1").fetchall() == [(1, "failed"),
                                                                                      (2, "complete")]
        assert con.execute("SELECT DISTINCT run_id FROM routes").fetchall() == [(2,)]
    assert not second.dir.exists()
    third = staging.StagedRun(tmp_db, "t", "m", 4, 2, [1], {})
    third.stage(small_run())
    third.fail("RuntimeError: out of memory")
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT status, json_extract_string(params, '$.error') FROM runs WHERE run_id = 3"
                           ).fetchone() == ("failed", "RuntimeError: out of memory")
        assert con.execute("SELECT count(*) FROM routes WHERE run_id = 3").fetchone()[0] == 0
    assert not third.dir.exists()


def test_export_import_roundtrip_and_merge(tmp_path, tmp_db):
    store.ingest_arrow(tmp_db, META, small_run())
    store.ingest_arrow(tmp_db, {**META, "task": "other"}, small_run())
    counts = exchange.export_runs(tmp_db, [1], tmp_path / "exp")
    assert counts == {"runs": 1, "samples": 2, "tokens": 3, "routes": 6, "expert_stats": 4, "expert_tokens": 5,
                      "sample_expert_stats": 5, "layer_stats": 1, "expert_norm_stats": 4}
    other = tmp_path / "other.duckdb"
    assert exchange.import_runs(other, tmp_path / "exp") == [1]
    assert exchange.import_runs(other, tmp_path / "exp", task="renamed") == [2]
    with store.reader(other) as con:
        assert con.execute("SELECT run_id, task, source, status FROM runs ORDER BY 1").fetchall() == [
            (1, "t", "import", "complete"), (2, "renamed", "import", "complete")]
        a = con.execute("SELECT * EXCLUDE (run_id) FROM routes WHERE run_id = 1 ORDER BY ALL").fetchall()
        b = con.execute("SELECT * EXCLUDE (run_id) FROM routes WHERE run_id = 2 ORDER BY ALL").fetchall()
    with store.reader(tmp_db) as con:
        orig = con.execute("SELECT * EXCLUDE (run_id) FROM routes WHERE run_id = 1 ORDER BY ALL").fetchall()
        # Parquet files are queryable in place, too
        assert con.execute("SELECT count(*) FROM read_parquet(?)",
                           [str(tmp_path / "exp" / "routes.parquet")]).fetchone()[0] == 6
    assert a == b == orig
    with pytest.raises(EsftError, match="not an exported trace folder"):
        exchange.import_runs(other, tmp_path)


def test_complete_runs_errors(tmp_db):
    store.ingest_arrow(tmp_db, META, small_run())
    with store.reader(tmp_db) as con:
        assert [r[0] for r in store.complete_runs(con, "t")] == [1]
        with pytest.raises(EsftError, match="unknown task 'nope'.*known tasks: t"):
            store.complete_runs(con, "nope")
        with pytest.raises(EsftError, match="run\\(s\\) 7"):
            store.complete_runs(con, "t", [7])


def test_runs_of_two_models_are_never_pooled_silently(tmp_db):
    store.ingest_arrow(tmp_db, META, small_run())
    store.ingest_arrow(tmp_db, {**META, "model": "other-moe"}, small_run())
    with store.reader(tmp_db) as con:
        with pytest.raises(EsftError, match="runs of 2 models.*--model"):
            store.complete_runs(con, "t")
        assert [r[0] for r in store.complete_runs(con, "t", model="other-moe")] == [2]
        assert [r[0] for r in store.complete_runs(con, "t", pool_models=True)] == [1, 2]
        with pytest.raises(EsftError, match="no complete run of model 'x'"):
            store.complete_runs(con, "t", model="x")
    # `esft scores --task t` refuses in one line (exit 2); --model picks one
    cmd = [sys.executable, "-m", "esft_core.cli", "scores", "--db", str(tmp_db), "--task", "t"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith("esft scores: error: task 't' has complete runs of 2 models")
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + ["--model", "other-moe"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("layer,expert")
