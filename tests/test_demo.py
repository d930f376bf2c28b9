"""The foundation: shipped demo data and model load offline and behave as documented; the builders are seeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from esft_core.demo import tasks as demo_tasks
from esft_core.models.loading import DEMO_MODEL, REPO_ROOT, load_model, moe_layout

DATA = REPO_ROOT / "data"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=OFFLINE, cwd=REPO_ROOT, **kw)


@pytest.mark.parametrize("task", list(demo_tasks.TASKS))
def test_task_files_have_schema_and_disjoint_splits(task):
    splits = {}
    for split, n_min in (("train", 2000), ("eval", 200)):
        rows = [json.loads(line) for line in (DATA / "tasks" / task / f"{split}.jsonl").open(encoding="utf-8")]
        assert len(rows) >= n_min
        for r in rows:
            assert list(r) == ["messages"]
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
        splits[split] = {r["messages"][0]["content"] for r in rows}
    assert not splits["train"] & splits["eval"], "eval prompts leak into train"
    # the reference answer scores 1 under the task's own metric
    ref = rows[0]["messages"][1]["content"]
    assert demo_tasks.score(task, ref, ref) == 1.0


def test_metrics_can_fail():
    assert demo_tasks.score("math", "2 + 2 = 4. The answer is 4.", "The answer is 5.") == 0.0
    assert demo_tasks.score("math", "The answer is 5.", "2 + 3 = 5. The answer is 5.") == 1.0
    assert demo_tasks.score("intent", '{"slots": {}, "intent": "a"}', '{"intent": "a", "slots": {}}') == 1.0
    assert demo_tasks.score("intent", "not json", '{"intent": "a"}') == 0.0
    assert demo_tasks.score("law", "guilty", "not guilty") == 0.0


def test_general_corpus_has_heldout_split():
    train = [json.loads(x)["text"] for x in (DATA / "general" / "train.jsonl").open(encoding="utf-8")]
    held = [json.loads(x)["text"] for x in (DATA / "general" / "heldout.jsonl").open(encoding="utf-8")]
    assert len(train) > 1000 and len(held) > 100
    assert not set(train) & set(held)


def test_regenerating_data_is_byte_identical(tmp_path):
    r = run("-m", "esft_core.demo.tasks", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    shipped = sorted(p.relative_to(DATA) for p in DATA.glob("tasks/*/*.jsonl")) + sorted(
        p.relative_to(DATA) for p in DATA.glob("general/*.jsonl"))
    assert len(shipped) == 2 * len(demo_tasks.TASKS) + 2
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_committed_sizes_within_budget():
    data_bytes = sum(p.stat().st_size for p in DATA.glob("tasks/**/*") if p.is_file())
    data_bytes += sum(p.stat().st_size for p in DATA.glob("general/*") if p.is_file())
    model_bytes = sum(p.stat().st_size for p in DEMO_MODEL.iterdir() if p.is_file())
    assert data_bytes <= 15 * 2**20
    assert model_bytes <= 16 * 2**20


def test_demo_model_routes_every_token_to_top_k_experts():
    model, tok = load_model("demo")
    cfg = model.config
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    layout = moe_layout(model)
    assert cfg.first_k_dense_replace == 1 and layout.layers[0] == 1 and len(layout.layers) >= 4
    assert layout.num_experts >= 32 and layout.top_k >= 4 and cfg.n_shared_experts == 2
    seen = {}
    hooks = [r.register_forward_hook(lambda m, i, o, key=layer: seen.__setitem__(key, o[2]))
             for layer, r in layout.routers.items()]
    ids = tok(["The answer is 42.", "def add(x):\n    return x + 1"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        out = model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert out.logits.shape[:2] == ids.shape
    assert sorted(seen) == layout.layers
    for idx in seen.values():  # (tokens, top_k)
        assert idx.shape == (ids.numel(), layout.top_k)
        assert all(len(set(row.tolist())) == layout.top_k for row in idx)
        assert int(idx.min()) >= 0 and int(idx.max()) < layout.num_experts


def test_demo_model_loads_with_auto_classes_offline():
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(DEMO_MODEL)!r}); "
            f"t = AutoTokenizer.from_pretrained({str(DEMO_MODEL)!r}); "
            "print(type(m).__name__, t.decode(t('Hello world').input_ids))")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DeepseekV2ForCausalLM", "Hello", "world"]


def test_build_script_runs_end_to_end_tiny(tmp_path):
    out = tmp_path / "tiny-moe"
    r = run("-m", "esft_core.demo.build", "--tiny", "--quiet", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "build_log.json").read_text())
    assert len(log["loss_curve"]) == 3
    model, tok = load_model(out)
    layout = moe_layout(model)
    assert layout.layers == [1, 2] and layout.num_experts == 8 and layout.top_k == 2
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"


@pytest.mark.parametrize("args,needle", [
    (["-m", "esft_core.demo.build", "--tiny", "--steps", "-5", "--out", "X"], "--steps must be positive"),
    (["-m", "esft_core.demo.build", "--tiny", "--top-k", "9", "--out", "X"], "exceeds --num-experts"),
    (["-m", "esft_core.demo.tasks", "--tasks", "poetry", "--out", "X"], "unknown task 'poetry'"),
    (["-m", "esft_core.demo.tasks", "--n-train", "-1", "--out", "X"], "must be non-negative"),
])
def test_builders_refuse_nonsense_with_one_line(args, needle, tmp_path):
    args = [a if a != "X" else str(tmp_path / "out") for a in args]
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_esft_help_lists_commands():
    r = run("-m", "esft_core.cli", "--help")
    assert r.returncode == 0
    assert "demo-data" in r.stdout and "demo-model" in r.stdout
