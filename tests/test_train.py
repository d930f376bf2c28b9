"""The training recipe (esft_core/tuning/train.py) on a real tiny DeepSeek-V2 directory; kill -9 and torchrun for
real."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esft_core.data import IGNORE_INDEX
from esft_core.errors import EsftError
from esft_core.models.loading import load_model, save_tiny, tiny_tokenizer
from esft_core.tuning.train import TrainConfig, lr_at, prepare_data, run_training

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def write_chat(path: Path, n: int = 24, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
            msgs = [{"role": "user", "content": f"echo {word}"}, {"role": "assistant", "content": word}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    model = save_tiny(d / "tiny")
    data = write_chat(d / "train.jsonl")
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}, "shared_experts": False,
                               "non_expert_modules": False}))
    return {"model": str(model), "data": str(data), "experts": str(cfg), "dir": d}


def cfg_for(env, out, **kw):
    base = dict(model=env["model"], data=env["data"], experts=env["experts"], out=str(out), steps=4, seq_len=96,
                batch_size=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def test_labels_only_on_assistant_tokens_and_packing(env):
    tok = tiny_tokenizer()
    ids, labels, stats = prepare_data(cfg_for(env, "unused"), tok)
    assert ids.shape[1] == 96 and ids.shape == labels.shape
    assert stats["examples"] == 24 and stats["sequences"] == len(ids) < 24  # several examples per window
    text = tok.decode([t for t in labels.reshape(-1).tolist() if t != IGNORE_INDEX])
    assert "echo" not in text and "User" not in text and "Assistant" not in text  # prompts never trained on
    assert stats["answer_tokens"] == int((labels != IGNORE_INDEX).sum())


def test_esft_run_trains_only_selected_experts(env, tmp_path):
    run = run_training(cfg_for(env, tmp_path / "run", steps=5, weight_decay=0.1), progress=False)
    assert run["status"] == "complete" and run["error"] is None and run["step"] == 5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert set(lines[0]) >= {"step", "loss", "lr", "tokens_per_s", "elapsed"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert sorted(tensors) == sorted(f"model.layers.{k}.mlp.experts.esft.{w}" for k in (1, 2)
                                     for w in ("gate_up_proj", "down_proj", "expert_ids"))
    assert tensors["model.layers.1.mlp.experts.esft.gate_up_proj"].shape == (2, 32, 32)
    assert tensors["model.layers.2.mlp.experts.esft.expert_ids"].tolist() == [5]
    assert run["trainable_params"] == 3 * (32 * 32 + 32 * 16)


def test_clipping_is_really_applied(env, tmp_path):
    """With AdamW the first update is ~lr*sign(g); clipping g to ~1e-12 (below eps) must shrink it a lot."""
    base, _ = load_model(env["model"])
    w0 = base.model.layers[1].mlp.experts.gate_up_proj.detach()[[0, 3]]
    moves = {}
    for clip in (0.0, 1e-12):
        out = tmp_path / f"clip{clip}"
        run_training(cfg_for(env, out, steps=1, clip=clip, weight_decay=0.0), progress=False)
        w1 = load_file(out / "adapter" / "adapter.safetensors")["model.layers.1.mlp.experts.esft.gate_up_proj"]
        moves[clip] = float((w1 - w0).abs().max())
    assert moves[0.0] == pytest.approx(1e-2, rel=1e-3)
    assert moves[1e-12] < 1e-3 * moves[0.0]


def test_fft_and_lora_and_random(env, tmp_path):
    fft = run_training(cfg_for(env, tmp_path / "fft", method="fft", experts=None, steps=2), progress=False)
    n_all = sum(p.numel() for p in load_model(env["model"])[0].parameters())
    assert (tmp_path / "fft" / "adapter" / "config.json").is_file() and fft["trainable_params"] == n_all
    lora = run_training(cfg_for(env, tmp_path / "lora", method="lora", experts=None, steps=2), progress=False)
    lcfg = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert set(lcfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert set(lcfg["target_modules"]) == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert 0 < lora["trainable_params"] < fft["trainable_params"] / 2
    rnd = run_training(cfg_for(env, tmp_path / "rnd", method="random", seed=3), progress=False)
    chosen = rnd["config"]["random_experts"]["experts"]
    assert {k: len(v) for k, v in chosen.items()} == {"1": 2, "2": 1}
    saved = json.loads((tmp_path / "rnd" / "adapter" / "expert_cfg.json").read_text())
    assert saved["experts"] == chosen


def test_schedules():
    c = TrainConfig(data="x", out="y", method="fft", steps=10, lr=1.0, schedule="cosine", warmup=2)
    assert [round(lr_at(c, s), 4) for s in (1, 2, 10)] == [0.5, 1.0, 0.1]
    assert lr_at(c, 6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.5)))
    assert lr_at(TrainConfig(data="x", out="y", method="fft", lr=0.3), 7) == 0.3


@pytest.mark.parametrize("kw, err", [
    (dict(experts=None), "needs --experts"),
    (dict(method="sgd"), "unknown method"),
    (dict(steps=0), "--steps must be positive"),
    (dict(schedule="linear"), "--schedule"),
])
def test_bad_config(env, tmp_path, kw, err):
    with pytest.raises(EsftError, match=err):
        run_training(cfg_for(env, tmp_path / "r", **kw), progress=False)
    assert not (tmp_path / "r").exists()


def test_bad_inputs_write_nothing(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    badcfg = tmp_path / "badcfg.json"
    badcfg.write_text('{"experts": {"0": [1], "9": [0]}}')
    cases = [(dict(data=str(bad)), "line 2: invalid JSON"), (dict(data=str(empty)), "holds no records"),
             (dict(seq_len=8), "--seq-len 8 is too small for any example"),
             (dict(experts=str(badcfg)), "layer(s) 9 do not exist"),
             (dict(experts=str(tmp_path / "none.json")), "does not exist")]
    for kw, err in cases:
        with pytest.raises(EsftError, match=err.replace("(", r"\(").replace(")", r"\)")):
            run_training(cfg_for(env, tmp_path / "r", **kw), progress=False)
        assert not (tmp_path / "r").exists()


def test_out_dir_holding_another_run_is_not_overwritten(env, tmp_path):
    out = tmp_path / "run"
    run_training(cfg_for(env, out, steps=2), progress=False)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(EsftError, match="already holds a run"):
        run_training(cfg_for(env, out, steps=2), progress=False)
    with pytest.raises(EsftError, match=r"holds a different run \(differs in lr\)"):
        run_training(cfg_for(env, out, steps=2, lr=0.5), resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    with pytest.raises(EsftError, match="not empty"):
        run_training(cfg_for(env, tmp_path / "other"), progress=False)
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _cli(*args):
    return [sys.executable, "-m", "esft_core.cli", *args]


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(env, tmp_path):
    out = tmp_path / "killed"
    args = ["train", "--model", env["model"], "--data", env["data"], "--experts", env["experts"], "--out", str(out),
            "--steps", "30", "--seq-len", "96", "--batch-size", "2", "--lr", "0.01", "--save-every", "5",
            "--no-progress"]
    proc = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = len(metrics.read_text().splitlines())
    assert 7 <= logged < 30, "the run must be killed mid-way"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    res = subprocess.run(_cli(*args, "--resume"), env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["step"] == 30
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 31))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic as the OMP_NUM_THREADS=1 subprocesses
    try:
        run_training(cfg_for(env, tmp_path / "straight", steps=30, save_every=5), progress=False)
    finally:
        torch.set_num_threads(threads)
    a = load_file(out / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(env, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "esft_core.cli", "train", "--model", env["model"], "--data", env["data"], "--experts", env["experts"],
            "--out", str(out), "--seq-len", "96", "--batch-size", "1", "--lr", "0.01", "--no-progress", *extra]


def test_fsdp2_two_ranks_match_one_process_and_resume_after_kill_9(env, tmp_path):
    """torchrun with 2 CPU ranks (gloo, FSDP2): killed with -9 after a sharded checkpoint, resumed; the loss curve
    matches one process with the same global batch (batch 1 x 2 ranks == batch 1 x grad-accum 2), frozen weights
    stay bit-identical, and the adapter is written once."""
    out = tmp_path / "fsdp"
    args = _torchrun(env, out, "--steps", "6", "--save-every", "2")
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoints" / "step_000002" / "state.json").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert (out / "checkpoints" / "step_000002" / ".metadata").is_file()  # DCP: sharded files, no optimizer.pt
    assert sorted(p.name for p in (out / "checkpoints" / "step_000002").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    res = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["world_size"] == 2 and run["frozen_unchanged"] is True
    assert len(run["rank_digests"]) == 2
    assert [p for p in tmp_path.rglob("*.safetensors")] == [out / "adapter" / "adapter.safetensors"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_training(cfg_for(env, tmp_path / "one", steps=6, batch_size=1, grad_accum=2), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert ref["frozen_unchanged"] is True
    two = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4, (one, two)
    a = load_file(out / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_global_batch_not_divisible_by_world_size(env, tmp_path):
    out = tmp_path / "bad"
    res = subprocess.run(_torchrun(env, out, "--steps", "1", "--global-batch", "3"), env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert "--global-batch 3 is not divisible by world size 2 x --grad-accum 1" in res.stderr
    assert not out.exists()


def test_sigterm_marks_the_run_failed_with_the_reason(env, tmp_path):
    """A cancelled job (SIGTERM) ends through the failure path: run.json says failed, with the reason."""
    import threading

    out = tmp_path / "term"
    metrics = out / "metrics.jsonl"

    def send_when_training():
        deadline = time.time() + 60
        while time.time() < deadline and not (metrics.is_file() and metrics.stat().st_size):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_when_training, daemon=True).start()
    with pytest.raises(EsftError, match="terminated by SIGTERM"):
        run_training(cfg_for(env, out, steps=100000), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "terminated by SIGTERM" and run["step_failed"] >= 1
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


@pytest.mark.parametrize("flags, err", [
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--device", "tpu"], "--device tpu: unknown device"),
    (["--dtype", "float16"], "--dtype float16 is not supported on the CPU"),
])
def test_bad_device_or_dtype_is_one_line_exit_2_nothing_written(env, tmp_path, flags, err):
    out = tmp_path / "r"
    res = subprocess.run(_cli("train", "--model", env["model"], "--data", env["data"], "--experts", env["experts"],
                              "--out", str(out), "--steps", "1", "--no-progress", *flags),
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and err in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_bf16_training_keeps_fp32_masters_and_writes_bf16_adapter(env, tmp_path):
    run = run_training(cfg_for(env, tmp_path / "bf16", steps=2, dtype="bfloat16"), progress=False)
    assert run["status"] == "complete" and run["frozen_unchanged"] is True
    tensors = load_file(tmp_path / "bf16" / "adapter" / "adapter.safetensors")
    assert tensors["model.layers.1.mlp.experts.esft.gate_up_proj"].dtype == torch.bfloat16
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in lines)
    run = run_training(cfg_for(env, tmp_path / "f32", steps=1, dtype="bfloat16", adapter_dtype="float32"),
                       progress=False)
    assert load_file(tmp_path / "f32" / "adapter" / "adapter.safetensors")[
        "model.layers.1.mlp.experts.esft.gate_up_proj"].dtype == torch.float32


def test_bf16_trained_model_in_memory_is_the_saved_adapter(env, tmp_path):
    """After bf16 training the model in memory (what the benchmark and `train --eval-data` evaluate) must compute
    with the trained weights: the same logits as the base with the saved adapter loaded. The fused AdamW once left
    the forward on a stale bf16 copy of the masters, so training in bf16 never learned (loss flat)."""
    from esft_core.experts.adapters import load_adapter
    from esft_core.tuning.train import Recipe

    recipe = Recipe(cfg_for(env, tmp_path / "r", steps=3, dtype="bfloat16", lr=5e-2), progress=False)
    recipe.setup()
    recipe.train()
    adapter = recipe.save()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    base, _ = load_model(env["model"], dtype=torch.bfloat16)
    with torch.no_grad():
        untuned = base(ids).logits
        load_adapter(base, adapter)
        tuned = recipe.model.eval()(ids).logits
        assert not torch.equal(tuned, untuned)
        assert torch.equal(tuned, base(ids).logits)


def test_grad_checkpointing_gives_the_same_loss_and_gradients_with_esft():
    from esft_core.experts.esft import ExpertConfig, apply_esft, trainable_parameters
    from esft_core.models.loading import tiny_moe

    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        m = tiny_moe("deepseek_v2", seed=0)
        m.set_experts_implementation("grouped_mm")
        if ckpt:
            m.config.use_cache = False
            m.activation_checkpointing_enable({"use_reentrant": False})
        apply_esft(m, ExpertConfig({1: [0, 3, 5], 2: [7]}, shared_experts=True))
        m.train()
        loss = m(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable_parameters(m)]))
    assert torch.equal(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1]) > 4
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
