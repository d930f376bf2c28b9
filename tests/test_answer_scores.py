"""Answer-token scores: the recorder's per-token loss flags and `--tokens answer` in scores/select (real DuckDB,
real tiny MoE, real CLI subprocesses)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from esft_core.data import IGNORE_INDEX, encode_record
from esft_core.errors import EsftError
from esft_core.models.loading import save_tiny, tiny_moe, tiny_tokenizer
from esft_core.selection.scores import compute_scores
from esft_core.selection.select import select_for_task
from esft_core.traces import record, store

CHATS = [{"messages": [{"role": "user", "content": f"question {i}: " + "abc " * (1 + i % 5)},
                       {"role": "assistant", "content": "xyz " * (1 + i % 3)}]} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_loss_flags_mark_positions_predicting_labels(tok):
    ids, labels = encode_record(CHATS[0], tok)
    flags = record.loss_flags(labels)
    assert len(flags) == len(ids) and flags[-1] is False
    # position t is flagged exactly when token t+1 is in the loss; the last prompt position is the first flagged one
    assert [t for t, f in enumerate(flags) if f] == [t - 1 for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert record.loss_flags([IGNORE_INDEX, 5, 6]) == [True, True, False]


def test_answer_scores_equal_a_direct_count(tok, tmp_db):
    model = tiny_moe("deepseek_v2", seed=0)
    record.record(model, tok, CHATS, tmp_db, "t", max_tokens=10**6, seq_len=64, batch_size=5)
    with store.reader(tmp_db) as con:
        n_flag, n_all = con.execute("SELECT count(*) FILTER (WHERE loss), count(*) FROM tokens").fetchone()
        # answer tokens + EOS per chat, each predicted from the position before it
        assert n_flag == sum(sum(lab != IGNORE_INDEX for lab in encode_record(c, tok)[1]) for c in CHATS)
        assert 0 < n_flag < n_all
        k = con.execute("SELECT top_k FROM runs").fetchone()[0]
        rows = con.execute("SELECT r.layer, r.expert, r.sample_id, r.weight FROM routes r JOIN tokens t "
                           "USING (run_id, sample_id, position) WHERE t.loss").fetchnumpy()
        lens = dict(con.execute("SELECT sample_id, count(*) FROM tokens WHERE loss GROUP BY 1").fetchall())
        for metric, normalize in (("token", "token"), ("gate", "token"), ("token", "sample"), ("gate", "sample")):
            s = compute_scores(con, "t", metric, normalize, tokens="answer")
            allt = compute_scores(con, "t", metric, normalize)
            want = np.zeros_like(s.values)
            for layer, e, sid, w in zip(rows["layer"], rows["expert"], rows["sample_id"], rows["weight"],
                                        strict=True):
                v = (1 / k if metric == "token" else float(w))
                want[s.layers.index(int(layer)), int(e)] += v / (n_flag if normalize == "token" else
                                                                 lens[int(sid)] * len(lens))
            assert s.values == pytest.approx(want, abs=1e-6)
            assert not np.allclose(s.values, allt.values)  # the filter changes the scores
            if metric == "token":
                assert s.values.sum(1) == pytest.approx(1.0)  # every answer position picks K experts
        sel = select_for_task(con, "t", "token", "token", p=0.3, tokens="answer")
        assert sel.experts == {la: sel.experts[la] for la in s.layers} and all(sel.experts.values())


def test_runs_without_flags_are_refused(tmp_db, tmp_path, run_esft, tok):
    # an imported (official-style) run has no loss flags: --tokens answer must say so, default scores still work
    routes = pa.table({"run_id": pa.array([0, 0], pa.int32()), "sample_id": pa.array([0, 0], pa.int32()),
                       "position": pa.array([0, 0], pa.int32()), "layer": pa.array([1, 1], pa.int16()),
                       "rank": pa.array([0, 1], pa.int8()), "expert": pa.array([0, 1], pa.int16()),
                       "weight": pa.array([0.7, 0.3], pa.float32())})
    samples = pa.table({"run_id": pa.array([0], pa.int32()), "sample_id": pa.array([0], pa.int32()),
                        "n_tokens": pa.array([1], pa.int32()), "text": pa.nulls(1, pa.string())})
    meta = dict(task="t", model="m", source="official", num_experts=2, top_k=2, layers=[1], params={})
    store.ingest_arrow(tmp_db, meta, {"samples": samples, "routes": routes})
    with store.reader(tmp_db) as con:
        assert compute_scores(con, "t", "token").values.tolist() == [[0.5, 0.5]]
        with pytest.raises(EsftError, match="answer-token flags"):
            compute_scores(con, "t", "token", tokens="answer")
        with pytest.raises(EsftError, match="--tokens"):
            compute_scores(con, "t", "token", tokens="prompt")
    r = run_esft("scores", "--db", tmp_db, "--task", "t", "--tokens", "answer")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "answer-token flags" in r.stderr and "run(s) 1" in r.stderr
    out = tmp_path / "cfg.json"
    r = run_esft("select", "--db", tmp_db, "--task", "t", "--metric", "token", "--top-p", "0.2", "--tokens",
                 "answer", "--out", out)
    assert r.returncode == 2 and not out.exists()


def test_cli_record_then_answer_select(tmp_path, run_esft):
    model_dir = tmp_path / "m"
    save_tiny(model_dir, "deepseek_v2", seed=0)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    db = tmp_path / "t.duckdb"
    assert run_esft("record", "--model", model_dir, "--data", data, "--task", "t", "--db", db,
                    "--seq-len", "64").returncode == 0
    r = run_esft("scores", "--db", db, "--task", "t", "--metric", "token", "--format", "json", "--tokens", "answer")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tokens"] == "answer"
    assert sum(doc["scores"]["token"][next(iter(doc["scores"]["token"]))].values()) == pytest.approx(1.0)
    out = tmp_path / "cfg.json"
    r = run_esft("select", "--db", db, "--task", "t", "--metric", "token", "--top-p", "0.3", "--tokens", "answer",
                 "--out", out)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(out.read_text())["experts"]) == set(doc["scores"]["token"])
