"""The paper's Table 3 training variants (`--train-shared`, `--train-non-expert`, `--method shared`) on a real tiny
seeded DeepSeek-V2 directory: only the named parameters change, the merged checkpoint reproduces the trained model's
logits, bf16 keeps fp32 masters, and bad combinations are refused with one line (real CLI subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esft_core.errors import EsftError
from esft_core.experts.esft import merge_selected
from esft_core.experts.expert_config import ExpertConfig
from esft_core.models.loading import load_model, save_tiny
from esft_core.tuning.train import Recipe, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(3))
SELECTED = {1: [0, 3], 2: [5]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_train import write_chat

    d = tmp_path_factory.mktemp("variants")
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps({"experts": {str(k): v for k, v in SELECTED.items()}}))
    return {"model": str(save_tiny(d / "tiny")), "data": str(write_chat(d / "train.jsonl")), "experts": str(cfg),
            "dir": d}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "esft_core.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=180)


def _expected_changes(name: str, variant: str) -> bool | list[int]:
    """Whether tensor `name` of the merged checkpoint may (must) differ from the base: True, False, or for a fused
    routed-expert tensor the expert rows that must differ (all others equal)."""
    fused = ".mlp.experts." in name
    shared = ".mlp.shared_experts." in name
    if fused:
        layer = int(name.split(".")[2])
        return [] if variant == "shared" else SELECTED.get(layer, [])
    if shared:
        return variant in ("esft+shared", "shared")
    return variant == "esft+non_expert"


def _train_in_process(env, out, **kw):
    """Recipe steps by hand: the trained model's logits are taken before the adapter is written."""
    cfg = TrainConfig(model=env["model"], data=env["data"], out=str(out), steps=3, seq_len=96, batch_size=2, lr=1e-2,
                      **kw)
    if cfg.experts:
        cfg.experts_cfg = ExpertConfig.load(cfg.experts).to_dict()
    recipe = Recipe(cfg, progress=False)
    recipe.setup()
    recipe.train()
    recipe.model.eval()
    with torch.no_grad():
        logits = recipe.model(IDS).logits.float()
    # the AdamW moments' dtypes, read before save() frees the optimizer state
    recipe.state_dtypes = {v.dtype for st in recipe.opt.state.values() for v in st.values() if v.dim() > 0}
    recipe.save()
    assert not recipe.opt.state  # freed before the adapter is gathered
    return recipe, logits


@pytest.mark.parametrize("variant, kw", [
    ("esft+shared", dict(train_shared=True)),
    ("esft+non_expert", dict(train_non_expert=True)),
    ("shared", dict(method="shared")),
])
def test_only_the_named_parameters_change_and_merge_reproduces_the_trained_logits(env, tmp_path, variant, kw):
    experts = None if variant == "shared" else env["experts"]
    recipe, trained_logits = _train_in_process(env, tmp_path / "run", experts=experts, **kw)
    res = _cli("merge", "--model", env["model"], "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    merged, _ = load_model(str(tmp_path / "merged"))
    base, _ = load_model(env["model"])
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, trained_logits, rtol=1e-5, atol=1e-5)
    after, before = merged.state_dict(), base.state_dict()
    assert after.keys() == before.keys()
    changed = 0
    for name, t0 in before.items():
        t1 = after[name]
        want = _expected_changes(name, variant)
        if isinstance(want, list):  # fused routed experts: exactly the selected rows move
            rows = [e for e in range(t0.shape[0]) if not torch.equal(t0[e], t1[e])]
            assert rows == want, (name, rows)
            changed += bool(rows)
        elif want:
            assert not torch.equal(t0, t1), f"{name} should have trained"
            changed += 1
        else:
            assert torch.equal(t0, t1), f"{name} changed but {variant} does not train it"
    assert changed > 0
    saved = json.loads((tmp_path / "run" / "adapter" / "expert_cfg.json").read_text())
    assert saved["shared_experts"] is (variant != "esft+non_expert")
    assert saved["non_expert_modules"] is (variant == "esft+non_expert")
    assert saved["experts"] == ({} if variant == "shared" else {str(k): v for k, v in SELECTED.items()})
    n_opt = {id(p) for g in recipe.opt.param_groups for p in g["params"]}
    assert n_opt == {id(p) for p in recipe.named.values()}  # AdamW holds only what trains


def test_bf16_non_expert_and_shared_train_fp32_masters_and_merge_to_the_trained_logits(env, tmp_path):
    recipe, _ = _train_in_process(env, tmp_path / "run", experts=env["experts"], dtype="bfloat16",
                                  train_non_expert=True, train_shared=True)
    assert {p.dtype for p in recipe.named.values()} == {torch.float32}  # masters: selected + shared + non-expert
    assert recipe.state_dtypes == {torch.float32}
    assert any(".parametrizations." in n for n in recipe.named)  # the cast masters
    assert recipe.frozen_unchanged()
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert "model.embed_tokens.weight" in tensors and "model.layers.1.mlp.shared_experts.up_proj.weight" in tensors
    assert not any(".parametrizations." in n for n in tensors)  # plain names, the model's dtype
    assert {t.dtype for n, t in tensors.items() if not n.endswith(("expert_ids", "mlp.gate.weight"))} == {
        torch.bfloat16}  # the base model's dtypes: bf16, routers fp32 (the model keeps them so)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    res = _cli("merge", "--model", env["model"], "--adapter", tmp_path / "run", "--out", tmp_path / "merged",
               "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    merged, _ = load_model(str(tmp_path / "merged"), dtype=torch.bfloat16)
    # In bf16 the wrapped forward (selected experts apart from the fused tensor) and the fused one round differently
    # (plain ESFT too), so the reference is the trained model merged in place: the cast masters leave their bf16 value
    merge_selected(recipe.model)
    assert not any(".parametrizations." in n for n, _ in recipe.model.named_parameters())
    base, _ = load_model(env["model"], dtype=torch.bfloat16)  # routers stay fp32 (the model keeps them so)
    assert {n: p.dtype for n, p in recipe.model.named_parameters()} == {n: p.dtype for n, p in base.named_parameters()}
    trained = recipe.model.state_dict()
    assert all(torch.equal(t, trained[n]) for n, t in merged.state_dict().items())  # every tensor, bit for bit
    with torch.no_grad():  # (the trained model runs without KV cache and with checkpointing: bf16 rounding differs)
        torch.testing.assert_close(merged(IDS).logits, recipe.model(IDS).logits, rtol=1e-2, atol=1e-2)


def test_cli_train_shared_then_eval_through_the_adapter(env, tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "--model", env["model"], "--data", env["data"], "--method", "shared", "--out", out,
               "--steps", "2", "--seq-len", "96", "--batch-size", "2", "--lr", "0.01", "--no-progress")
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["frozen_unchanged"] is True and run["method"] == "shared"
    names = set(load_file(out / "adapter" / "adapter.safetensors"))
    assert names and all(".mlp.shared_experts." in n for n in names)
    assert run["trainable_params"] == 2 * 3 * 32 * 32  # 2 MoE layers x (gate, up, down) of (32 x 32)
    res = _cli("eval", "--model", env["model"], "--adapter", out, "--data", env["data"], "--limit", "2")
    assert res.returncode == 0, res.stderr
    assert "score" in res.stdout or "loss" in res.stdout


@pytest.mark.parametrize("args, err", [
    (["--method", "fft", "--train-shared"], "--train-shared applies to --method esft, random or shared, not fft"),
    (["--method", "lora", "--train-non-expert"], "--train-non-expert applies to --method esft, random or shared"),
    (["--method", "shared", "--experts", "CFG"], "--method shared trains only the shared experts; drop --experts"),
])
def test_bad_combinations_are_one_line_exit_2_nothing_written(env, tmp_path, args, err):
    out = tmp_path / "r"
    args = [env["experts"] if a == "CFG" else a for a in args]
    res = _cli("train", "--model", env["model"], "--data", env["data"], "--out", out, "--steps", "1", "--no-progress",
               *args)
    assert res.returncode == 2 and err in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_shared_experts_on_a_model_without_them_is_refused(env, tmp_path):
    model = save_tiny(tmp_path / "mixtral", family="mixtral")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"1": [0]}}))
    out = tmp_path / "r"
    res = _cli("train", "--model", model, "--data", env["data"], "--experts", cfg, "--train-shared", "--out", out,
               "--steps", "1", "--seq-len", "96", "--no-progress")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--train-shared: MixtralForCausalLM has no shared experts" in res.stderr
    assert not out.exists()
    with pytest.raises(EsftError, match="--method shared: MixtralForCausalLM has no shared experts"):
        Recipe(TrainConfig(model=str(model), data=env["data"], out=str(out), method="shared", seq_len=96),
               progress=False).setup()
    assert not out.exists()


def test_a_run_from_before_the_flags_resumes(env, tmp_path):
    """run.json of an older version has no train_shared / train_non_expert: they read as off, not as a different run."""
    from esft_core.tuning.train import check_out_dir

    out = tmp_path / "old"
    out.mkdir()
    cfg = TrainConfig(model=env["model"], data=env["data"], experts=env["experts"], out=str(out))
    config = {k: v for k, v in __import__("dataclasses").asdict(cfg).items() if not k.startswith("train_")}
    (out / "run.json").write_text(json.dumps({"method": "esft", "status": "running", "config": config}))
    assert check_out_dir(cfg, resume=True)["status"] == "running"
    cfg.train_shared = True
    with pytest.raises(EsftError, match="differs in train_shared"):
        check_out_dir(cfg, resume=True)


def _hand_seq_aux(logits: torch.Tensor, ids: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V2's seq_aux written out loop by loop, as the authors' MoEGate defines it."""
    n_exp, k = logits.shape[-1], ids.shape[-1]
    seq = logits.shape[0] // batch
    probs = logits.float().softmax(-1)
    total = 0.0
    for b in range(batch):
        rows = slice(b * seq, (b + 1) * seq)
        for i in range(n_exp):
            f = (ids[rows] == i).sum().item() / (seq * k / n_exp)
            total = total + f * probs[rows, i].mean()
    return alpha * total / batch


def test_router_gradient_is_lm_plus_alpha_aux_computed_by_hand():
    from esft_core.models.loading import moe_layout, tiny_moe
    from esft_core.tuning.aux_loss import RouterAux

    model = tiny_moe("deepseek_v2", seed=2)
    model.train()
    lay = moe_layout(model)
    router_w = [lay.router_weights[layer] for layer in lay.layers]
    seen = []
    hooks = [r.register_forward_hook(lambda m, i, o: seen.append((o[0], o[2]))) for r in lay.routers.values()]
    aux = RouterAux(lay, alpha=0.001)
    out = model(input_ids=IDS, labels=IDS)
    total = out.loss + aux.loss(IDS.shape[0])
    g_total = torch.autograd.grad(total, router_w, retain_graph=True)
    g_lm = torch.autograd.grad(out.loss, router_w, retain_graph=True)
    hand = sum(_hand_seq_aux(lg, ids, IDS.shape[0], 0.001) for lg, ids in seen)
    g_aux = torch.autograd.grad(hand, router_w)
    for t, lm, a in zip(g_total, g_lm, g_aux, strict=True):
        assert a.abs().max() > 0  # the aux term reaches the router
        torch.testing.assert_close(t, lm + a, rtol=1e-5, atol=1e-9)
    for h in hooks:
        h.remove()
    aux.remove()


def test_router_aux_is_on_exactly_when_a_router_trains_and_recorded(env, tmp_path):
    on, _ = _train_in_process(env, tmp_path / "ne", method="esft", experts=env["experts"], train_non_expert=True)
    off, _ = _train_in_process(env, tmp_path / "ne-off", method="esft", experts=env["experts"],
                               train_non_expert=True, router_aux=False)
    plain, _ = _train_in_process(env, tmp_path / "esft", method="esft", experts=env["experts"])
    runs = {n: json.loads((tmp_path / n / "run.json").read_text())["router_aux"] for n in ("ne", "ne-off", "esft")}
    assert runs["ne"] == {"on": True, "router_trains": True, "kind": "seq_aux", "alpha": 0.001}
    assert runs["ne-off"] == {"on": False, "router_trains": True}
    assert runs["esft"] == {"on": False, "router_trains": False}
    # the logged loss is the LM loss; with the aux term the routers move differently
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ne" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    w_on = [p for n, p in on.model.named_parameters() if n.endswith("mlp.gate.weight")]
    w_off = [p for n, p in off.model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert w_on and not all(torch.equal(a, b) for a, b in zip(w_on, w_off, strict=True))
    r = _cli("train", "--help")
    assert "--no-router-aux" in r.stdout
