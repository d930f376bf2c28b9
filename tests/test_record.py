"""The recorder on tiny seeded MoEs of every supported family, plus crash safety with a real SIGKILLed process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from esft_core.errors import EsftError
from esft_core.models.loading import TINY_FAMILIES, moe_layout, save_tiny, tiny_moe, tiny_tokenizer
from esft_core.selection.scores import load_scores
from esft_core.traces import record, staging, store

RECORDS = [{"text": f"sample {i}: " + "abc xyz " * (1 + i % 7)} for i in range(30)] + [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_records_every_family(family, tok, tmp_db):
    model = tiny_moe(family, seed=0)
    lay = moe_layout(model)
    run_id = record.record(model, tok, RECORDS, tmp_db, "t", max_tokens=200, seq_len=48, batch_size=3)
    with store.reader(tmp_db) as con:
        status, layers, k, e, n_s, n_t = con.execute(
            "SELECT status, layers, top_k, num_experts, n_samples, n_tokens FROM runs WHERE run_id = ?",
            [run_id]).fetchone()
        assert (status, layers, k, e) == ("complete", lay.layers, lay.top_k, lay.num_experts)
        assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == n_t * len(layers) * k
        assert con.execute("SELECT count(*), sum(n_tokens) FROM samples").fetchone() == (n_s, n_t)
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == n_t
        # rank 0 carries the highest weight of each (token, layer)
        assert con.execute("""SELECT count(*) FROM (SELECT list(weight ORDER BY rank) w FROM routes GROUP BY
                              sample_id, position, layer) WHERE w != list_reverse_sort(w)""").fetchone()[0] == 0
        # the recorded routing of sample 0 equals the routers' own top-k on that sample alone
        ids = con.execute("SELECT list(token_id ORDER BY position) FROM tokens WHERE sample_id = 0").fetchone()[0]
        got = con.execute("SELECT layer, position, list(expert ORDER BY rank), list(weight ORDER BY rank) "
                          "FROM routes WHERE sample_id = 0 GROUP BY layer, position ORDER BY layer, position"
                          ).fetchall()
    seen = {}
    hooks = [lay.routers[layer].register_forward_hook(
        lambda m, i, o, layer=layer: seen.__setitem__(layer, (o[1].reshape(-1, k), o[2].reshape(-1, k))))
        for layer in lay.layers]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for layer, pos, experts, weights in got:
        w, idx = seen[layer][0][pos], seen[layer][1][pos]
        order = torch.argsort(w, descending=True, stable=True)
        assert experts == idx[order].tolist()
        assert weights == pytest.approx(w[order].tolist(), abs=1e-5)
    assert n_t >= 200 and n_s < len(RECORDS)


def test_batching_and_padding_do_not_change_routing(tok, tmp_db):
    model = tiny_moe("qwen3_moe", seed=3)
    a = record.record(model, tok, RECORDS, tmp_db, "a", max_tokens=150, seq_len=40, batch_size=1)
    b = record.record(model, tok, RECORDS, tmp_db, "b", max_tokens=150, seq_len=40, batch_size=5)
    c = record.record(model, tok, RECORDS, tmp_db, "c", max_tokens=150, seq_len=40, batch_size=5, seed=7)
    q = ("SELECT sample_id, position, layer, rank, expert, round(weight, 4) FROM routes WHERE run_id = ? "
         "ORDER BY ALL")
    with store.reader(tmp_db) as con:
        ra, rb = con.execute(q, [a]).fetchall(), con.execute(q, [b]).fetchall()
        assert len(ra) > 0 and [r[:5] for r in ra] == [r[:5] for r in rb]
        texts = [con.execute("SELECT list(text ORDER BY sample_id) FROM samples WHERE run_id = ?", [r]).fetchone()[0]
                 for r in (a, b, c)]
        longest = con.execute("SELECT max(n_tokens) FROM samples").fetchone()[0]
    assert texts[0] == texts[1] != texts[2]  # the seed decides the sample order
    assert longest == 40  # truncated to seq_len


def test_progress_budget_and_errors(tok, tmp_db):
    model = tiny_moe("mixtral", seed=1)
    calls = []
    record.record(model, tok, RECORDS, tmp_db, "t", max_tokens=100, seq_len=32, batch_size=2,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] >= 100
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(EsftError, match="--max-tokens must be >= 1"):
        record.record(model, tok, RECORDS, tmp_db, "t", max_tokens=0)
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(EsftError, match="has no MoE layers") as e:
        record.record(dense, tok, RECORDS, tmp_db, "dense")
    assert "\n" not in str(e.value)
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


RECORDER = """
import sys, torch
torch.set_num_threads(1)
from esft_core.models.loading import load_model
from esft_core.traces.record import record
model, tok = load_model(sys.argv[1])
recs = [{"text": "slow recording " * 3 + str(i)} for i in range(20000)]
record(model, tok, recs, sys.argv[2], "killed", max_tokens=10**7, seq_len=64, batch_size=2, flush_rows=500)
"""


def test_sigkill_mid_run_leaves_db_consistent(tmp_path, tok, tmp_db):
    model_dir = save_tiny(tmp_path / "tiny", "deepseek_v2", seed=0)
    model = tiny_moe("deepseek_v2", seed=0)
    first = record.record(model, tok, RECORDS, tmp_db, "kept", max_tokens=120, seq_len=32, batch_size=4)
    before = load_scores(tmp_db, "kept", "gate").values
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, str(model_dir), str(tmp_db)], env=env,
                            stderr=subprocess.PIPE)
    stage_dir = staging.staging_root(tmp_db) / f"run-{first + 1}"
    reads_while_running = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            with store.reader(tmp_db) as con:  # the explorer can read while the recording runs
                running = con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0]
                reads_while_running += running
            if running and stage_dir.exists() and any(p.suffix == ".parquet" for p in stage_dir.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert reads_while_running > 0
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT run_id, task, status FROM runs ORDER BY run_id").fetchall() == [
            (first, "kept", "complete"), (first + 1, "killed", "running")]
        assert con.execute("SELECT count(*) FROM routes WHERE run_id != ?", [first]).fetchone()[0] == 0
        pid = json.loads(con.execute("SELECT params FROM runs WHERE run_id = ?", [first + 1]).fetchone()[0])["pid"]
    assert pid == proc.pid
    assert (load_scores(tmp_db, "kept", "gate").values == before).all()  # earlier run intact
    with pytest.raises(EsftError, match="unknown task 'killed'"):
        load_scores(tmp_db, "killed", "gate")  # ignored by scores
    # the next writer marks the dead run failed and clears its staging folder
    record.record(model, tok, RECORDS, tmp_db, "next", max_tokens=50, seq_len=32)
    with store.reader(tmp_db) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", [first + 1]).fetchone()[0] == "failed"
    assert not stage_dir.exists()
