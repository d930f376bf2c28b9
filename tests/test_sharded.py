"""Sharded loading (esft_core/models/sharded.py): a model built on meta and filled from the checkpoint equals the
whole-model load, for per-expert (v4-era, transformers-saved) and fused checkpoints, in float32 and bfloat16; under
torchrun (2 gloo ranks) bf16 ESFT trains exactly as one process; a missing shard, a missing tensor and a rank killed
with -9 during loading each give one line and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_core.errors import EsftError
from esft_core.models.loading import load_model, save_tiny
from esft_core.models.sharded import empty_model, materialize

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
LAW = ROOT / "data" / "tasks" / "law" / "train.jsonl"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The tiny DeepSeek-V2 as transformers saves it (per-expert tensors) and the same weights in fused form."""
    d = tmp_path_factory.mktemp("sharded")
    per_expert = save_tiny(d / "per_expert")
    fused = d / "fused"
    shutil.copytree(per_expert, fused, ignore=shutil.ignore_patterns("*.safetensors"))
    model, _ = load_model(str(per_expert))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(fused / "model.safetensors"))
    assert any(".experts.0.gate_proj." in k for k in load_file(per_expert / "model.safetensors"))
    return {"per_expert": per_expert, "fused": fused, "dir": d}


@pytest.mark.parametrize("kind", ["per_expert", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_build_then_materialize_equals_the_whole_load(ckpts, kind, dtype):
    ref, _ = load_model(str(ckpts[kind]), dtype=dtype)
    model, _ = empty_model(str(ckpts[kind]), dtype)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables are computed, not read
    assert materialize(model, torch.device("cpu")) == set()
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        assert got[n].dtype == p.dtype, n  # the router stays float32 in a bf16 model, as from_pretrained keeps it
        assert torch.equal(got[n], p), n
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_tensor_missing_from_the_checkpoint_is_named(ckpts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["fused"], broken)
    sd = load_file(broken / "model.safetensors")
    del sd["model.layers.2.mlp.experts.down_proj"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    model, _ = empty_model(str(broken), torch.float32)
    assert materialize(model, torch.device("cpu")) == {"model.layers.2.mlp.experts.down_proj"}
    # through the CLI: one line, exit 2, no run directory
    out = tmp_path / "run"
    r = _train(broken, out, "--load", "sharded", "--method", "fft")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"esft train: error: {broken}: the checkpoint lacks 1 tensors of the model "
        "(first: model.layers.2.mlp.experts.down_proj); is a shard file missing or truncated?"]
    assert not out.exists()


def test_a_missing_shard_file_is_one_line_and_nothing_is_written(ckpts, tmp_path):
    d = tmp_path / "two_shards"
    shutil.copytree(ckpts["per_expert"], d)
    keys = list(load_file(d / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i % 2 else
                                                "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}}
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EsftError, match=r"is missing 1 of 2 shard files \(model-00002-of-00002.safetensors\)"):
        empty_model(str(d), torch.float32)
    out = tmp_path / "run"
    r = _train(d, out, "--load", "sharded", "--method", "fft")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "missing 1 of 2 shard files" in r.stderr and not out.exists()


def test_lora_refuses_sharded_loading(ckpts, tmp_path):
    r = _train(ckpts["per_expert"], tmp_path / "lora", "--load", "sharded", "--method", "lora")
    assert r.returncode == 2 and "--load sharded does not serve --method lora" in r.stderr
    assert not (tmp_path / "lora").exists()


def _train(model, out, *extra, ranks: int = 1, **kw):
    launch = [sys.executable, "-m", "esft_core.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m",
        "esft_core.cli"]
    args = [*launch, "train", "--model", str(model), "--data", str(LAW), "--out", str(out), "--steps", "3",
            "--seq-len", "256", "--lr", "1e-3", "--no-progress", *extra]
    if kw.get("popen"):
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)


def test_torchrun_bf16_esft_sharded_equals_one_process(ckpts, tmp_path):
    """bf16 weights, fp32 masters of the selected experts (their own FSDP group), the router kept in float32 (its
    own group): the 2-rank sharded-load run's losses and adapter equal one process's, bit for bit."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"1": [0, 3, 6], "2": [5]}, "shared_experts": False,
                               "non_expert_modules": False}))
    common = ["--experts", str(cfg), "--dtype", "bfloat16", "--global-batch", "4"]
    one = _train(ckpts["per_expert"], tmp_path / "one", *common, "--grad-accum", "4")
    two = _train(ckpts["per_expert"], tmp_path / "two", *common, "--grad-accum", "2", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and run["config"]["load"] == "auto" and run["frozen_unchanged"] is True
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    a, b = (load_file(tmp_path / n / "adapter" / "adapter.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    fp = [json.loads((tmp_path / n / "adapter" / "base_fingerprint.json").read_text()) for n in ("one", "two")]
    assert fp[0] == fp[1]  # sampled where the shards live, it equals the whole model's


def _rank_pids(launcher: int) -> list[int]:
    """The training processes under torchrun: the agent's python children."""
    try:
        agent = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return []
    return [int(x) for x in agent]


def test_a_rank_killed_during_loading_leaves_nothing(ckpts, tmp_path):
    """kill -9 of rank 1 while it reads the checkpoint (its mmap of the safetensors file is open): the survivor
    stops with one line, torchrun fails, and no run directory exists."""
    big = save_tiny(tmp_path / "big", hidden_size=256, moe_intermediate_size=256, intermediate_size=512,
                    n_routed_experts=64, num_experts_per_tok=6)  # ~60 MB: reading it takes a visible moment
    out = tmp_path / "run"
    proc = _train(big, out, "--method", "fft", ranks=2, popen=True)
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        ranks = _rank_pids(proc.pid)
        if len(ranks) == 2:
            try:
                if str(big) in Path(f"/proc/{ranks[1]}/maps").read_text():
                    victim = ranks[1]
            except OSError:
                pass
        time.sleep(0.005)
    assert victim is not None, "rank 1 was never seen reading the checkpoint"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    ours = [x for x in err.splitlines() if x.startswith("esft train: error:")]
    print(ours)
    assert len(ours) <= 1, ours  # the surviving rank: one line (none when the launcher stopped it first)
    assert all("another rank stopped while setting up (loading the model)" in x or "terminated by SIGTERM" in x
               for x in ours), ours
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


@pytest.mark.parametrize(("experts", "flags"), [({"1": [0, 3, 5, 6], "2": [2, 7]}, ()),
                                               ({"1": [0, 3], "2": [1, 2]}, ()),
                                               ({"1": [0, 3], "2": [1, 2]}, ("--no-grad-checkpointing",))],
                         ids=["both_ranks", "rank1_holds_none", "rank1_holds_none_no_checkpointing"])
def test_expert_parallel_equals_fsdp_only(ckpts, tmp_path, experts, flags):
    """--expert-parallel on 2 gloo ranks (4 of 8 experts each, tokens by all-to-all) trains what FSDP-only trains:
    the same losses, the same adapter (global expert ids, every rank's copies), the same trainable count, and it
    reports the all-to-all bytes it sent. Also when one rank holds no selected expert at all (it trains nothing,
    has no optimizer, and still takes part in every collective) — also without activation checkpointing, where its
    loss used to have no grad_fn and the other rank hung in the backward all-to-all."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": experts, "shared_experts": False, "non_expert_modules": False}))
    common = ["--experts", str(cfg), "--global-batch", "4", "--grad-accum", "2", *flags]
    fsdp = _train(ckpts["per_expert"], tmp_path / "fsdp", *common, ranks=2)
    ep = _train(ckpts["per_expert"], tmp_path / "ep", *common, "--expert-parallel", ranks=2)
    assert fsdp.returncode == 0 and ep.returncode == 0, (fsdp.stderr[-1500:], ep.stderr[-1500:])
    runs = [json.loads((tmp_path / n / "run.json").read_text()) for n in ("fsdp", "ep")]
    assert runs[1]["config"]["expert_parallel"] is True and runs[1]["frozen_unchanged"] is True
    n_sel = sum(len(v) for v in experts.values())
    assert runs[0]["trainable_params"] == runs[1]["trainable_params"] == n_sel * 3 * 16 * 32
    m = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("fsdp", "ep")]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(*m, strict=True)) < 1e-5
    assert all(x["ep_bytes"] > 0 for x in m[1]) and "ep_bytes" not in m[0][0]
    a, b = (load_file(tmp_path / n / "adapter" / "adapter.safetensors") for n in ("fsdp", "ep"))
    assert a.keys() == b.keys()
    assert b["model.layers.1.mlp.experts.esft.expert_ids"].tolist() == experts["1"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_expert_parallel_bad_input(ckpts, tmp_path):
    """9 experts over 2 ranks, fft, one process: one line each, exit 2, nothing written."""
    nine = save_tiny(tmp_path / "nine", n_routed_experts=9)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"1": [0]}, "shared_experts": False, "non_expert_modules": False}))
    r = _train(nine, tmp_path / "a", "--experts", str(cfg), "--expert-parallel", ranks=2)
    lines = [x for x in r.stderr.splitlines() if x.startswith("esft train: error:")]
    assert r.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, r.stderr[-2000:]  # one per rank
    assert "--expert-parallel: 9 experts per layer do not divide over 2 ranks (layer(s) 1, 2)" in lines[0]
    assert "exitcode  : 2" in r.stderr and not (tmp_path / "a").exists()
    r = _train(ckpts["per_expert"], tmp_path / "b", "--experts", str(cfg), "--expert-parallel")
    assert r.returncode == 2 and "needs torchrun with at least 2 ranks" in r.stderr and not (tmp_path / "b").exists()
    r = _train(ckpts["per_expert"], tmp_path / "c", "--method", "fft", "--expert-parallel")
    assert r.returncode == 2 and "not --method fft" in r.stderr and not (tmp_path / "c").exists()
    r = _train(ckpts["per_expert"], tmp_path / "d", "--experts", str(cfg), "--expert-parallel", "--save-every", "1")
    assert r.returncode == 2 and "(--save-every) are not supported" in r.stderr and not (tmp_path / "d").exists()
