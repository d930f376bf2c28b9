"""Selected-expert parameterisation on fused experts (esft_core/experts/esft.py), on real tiny seeded MoE models."""

import json

import pytest
import torch

from esft_core.errors import EsftError
from esft_core.experts.esft import (
    ExpertConfig,
    apply_esft,
    check_config,
    merge_selected,
    optimizer_state_bytes,
    random_config,
    selected_parameters,
    tensor_bytes,
    trainable_parameters,
)
from esft_core.models.loading import moe_layout, tiny_moe

CFG = ExpertConfig({1: [0, 3, 5], 2: [7]})
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def _model(impl="grouped_mm", family="deepseek_v2"):
    m = tiny_moe(family, seed=0)
    m.set_experts_implementation(impl)
    return m


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_wrapped_logits_equal_base_exactly(impl):
    m = _model(impl)
    with torch.no_grad():
        base = m(IDS).logits
        apply_esft(m, CFG)
        wrapped = m(IDS).logits
    assert m.config._experts_implementation == impl
    assert torch.equal(base, wrapped)


def test_other_family_qwen2_moe_equal_and_trainable():
    m = _model("grouped_mm", "qwen2_moe")
    base = m(IDS).logits.detach()
    apply_esft(m, ExpertConfig({1: [2], 2: [0, 1]}))
    assert torch.equal(m(IDS).logits, base)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == [f"model.layers.{k}.mlp.experts.esft.{w}" for k in (1, 2) for w in ("gate_up_proj", "down_proj")]


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_gradients_match_the_fused_rows(impl):
    """The small tensors get exactly the gradient the corresponding fused rows would get."""
    ref = _model(impl)
    ref.requires_grad_(False)
    layout = moe_layout(ref)
    for k in CFG.experts:
        layout.experts[k].gate_up_proj.requires_grad_(True)
        layout.experts[k].down_proj.requires_grad_(True)
    ref(IDS, labels=IDS).loss.backward()

    m = _model(impl)
    sel = apply_esft(m, CFG)
    m(IDS, labels=IDS).loss.backward()
    for k, ids in CFG.experts.items():
        torch.testing.assert_close(sel[k].gate_up_proj.grad, layout.experts[k].gate_up_proj.grad[ids])
        torch.testing.assert_close(sel[k].down_proj.grad, layout.experts[k].down_proj.grad[ids])
    assert [p for p in m.parameters() if p.grad is not None] == trainable_parameters(m)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_adamw_state_and_decay_touch_only_selected_experts(impl):
    m = _model(impl)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_esft(m, CFG)
    sel = selected_parameters(m)
    assert trainable_parameters(m) == sel
    opt = torch.optim.AdamW(trainable_parameters(m), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        m(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    # optimizer state: exp_avg + exp_avg_sq of the selected experts only
    n_sel = 4
    layout = moe_layout(m)
    one_expert = sum(p[0].numel() * p.element_size() for p in layout.expert_params(1).values())
    assert tensor_bytes(sel) == n_sel * one_expert
    assert optimizer_state_bytes(opt) == 2 * tensor_bytes(sel)
    # every original parameter (fused experts included, all rows) is bit-identical; the selected copies moved
    after = dict(m.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n], p), n
    moved = layout.experts[1].esft.gate_up_proj.detach()
    assert not torch.equal(moved, before["model.layers.1.mlp.experts.gate_up_proj"][[0, 3, 5]])


def test_merge_selected_gives_plain_model_with_same_logits():
    m = _model("eager")
    apply_esft(m, CFG)
    with torch.no_grad():
        for p in selected_parameters(m):
            p.add_(0.05 * torch.randn_like(p))
        tuned = m(IDS).logits
    merge_selected(m)
    assert not any(".esft." in n for n, _ in m.named_parameters())
    assert "forward" not in moe_layout(m).experts[1].__dict__
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, tuned)
    m.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, tuned)


def test_shared_and_non_expert_options_follow_the_authors():
    m = _model()
    apply_esft(m, ExpertConfig({1: [1]}, shared_experts=True))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in names if "shared_experts" in n} == {
        f"model.layers.{k}.mlp.shared_experts.{w}_proj.weight" for k in (1, 2) for w in ("gate", "up", "down")}
    assert all("shared_experts" in n or ".esft." in n for n in names)

    m = _model()
    apply_esft(m, ExpertConfig({1: [1]}, non_expert_modules=True))
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{k}.mlp.experts.{w}" for k in (1, 2) for w in ("gate_up_proj", "down_proj")} | {
        f"model.layers.{k}.mlp.shared_experts.{w}_proj.weight" for k in (1, 2) for w in ("gate", "up", "down")}
    assert m.model.embed_tokens.weight.requires_grad and m.model.layers[1].mlp.gate.weight.requires_grad


def test_bad_config_names_every_problem_in_one_line():
    m = _model()
    with pytest.raises(EsftError) as e:
        check_config(ExpertConfig({0: [1], 1: [2, 8, 11], 7: [0]}), m)
    msg = str(e.value)
    assert "\n" not in msg
    assert "layer(s) 7 do not exist (model has 3 decoder layers)" in msg
    assert "layer(s) 0 are not MoE layers (MoE layers: 1, 2)" in msg
    assert "layer 1: expert id(s) 8, 11 out of range 0..7" in msg
    with pytest.raises(EsftError, match="not MoE layers"):
        apply_esft(m, ExpertConfig({0: [1]}))
    assert all(p.requires_grad for p in m.parameters())  # nothing was changed


def test_config_file_format_and_errors(tmp_path):
    ok = tmp_path / "cfg.json"
    ok.write_text(json.dumps({"experts": {"2": [5, 1], "1": []}, "shared_experts": False, "non_expert_modules": False}))
    cfg = ExpertConfig.load(ok)
    # order kept (the authors list experts by score)
    assert cfg.to_dict() == {"experts": {"1": [], "2": [5, 1]}, "shared_experts": False, "non_expert_modules": False}
    bad = tmp_path / "bad.json"
    for text, err in [("{nope", "invalid JSON"), ('{"experts": [1]}', "expected"),
                      ('{"experts": {"x": [1]}}', "layer key 'x' is not an integer"),
                      ('{"experts": {"1": [1, 1]}}', "lists an expert twice"),
                      ('{"experts": {"1": ["a"]}}', "integer expert ids")]:
        bad.write_text(text)
        with pytest.raises(EsftError, match=err):
            ExpertConfig.load(bad)
    with pytest.raises(EsftError, match="does not exist"):
        ExpertConfig.load(tmp_path / "missing.json")


def test_random_config_keeps_counts_and_is_seeded():
    like = ExpertConfig({1: [0, 1, 2], 2: [4]})
    a, b, c = random_config(like, 8, seed=1), random_config(like, 8, seed=1), random_config(like, 8, seed=2)
    assert a == b and a != c
    assert {k: len(v) for k, v in a.experts.items()} == {1: 3, 2: 1}
    assert all(0 <= i < 8 for v in a.experts.values() for i in v)


class _LargestAlloc(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op returns while active (a real allocation census, no mocks)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views are no copies
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_no_full_size_copy_or_gradient_of_fused_experts(impl):
    """ESFT forward + backward allocate no tensor as large as a fused expert tensor (no overlay copy, no full-size
    gradient) — except batched_mm's own per-slot weight gather, which the base model's forward makes as well."""
    m = tiny_moe("deepseek_v2", seed=0, n_routed_experts=32, num_experts_per_tok=2, hidden_size=32,
                 moe_intermediate_size=64, vocab_size=64)
    m.set_experts_implementation(impl)
    ids = torch.randint(3, 64, (1, 48), generator=torch.Generator().manual_seed(0))
    base = _LargestAlloc()
    with base, torch.no_grad():
        m(ids)
    apply_esft(m, ExpertConfig({1: list(range(0, 12, 2)), 2: list(range(1, 12, 2))}))
    fused = min(p.numel() for p in moe_layout(m).expert_params(1).values())  # 32 * 32 * 64
    census = _LargestAlloc()
    with census:
        m(ids, labels=ids).loss.backward()
    if impl == "batched_mm":  # (S, 2I, H) gathers: batched_mm's design, not ESFT's
        assert census.largest <= base.largest, (census.largest, base.largest)
    else:
        assert census.largest < fused / 2, (census.largest, fused)  # 6 of 32 rows at most
    assert all(p.grad is None for p in moe_layout(m).expert_params(1).values())


@pytest.mark.parametrize("impl,opt", [("eager", "fused"), ("grouped_mm", "fused"), ("batched_mm", "fused"),
                                      ("grouped_mm", "foreach"), ("grouped_mm", "loop")])
def test_bf16_model_with_fp32_master_copies(impl, opt):
    """bfloat16 base, float32 trainable copies: logits bit-identical before training, fp32 grads, bf16 fused frozen."""
    m = _model(impl).to(torch.bfloat16)
    with torch.no_grad():
        base = m(IDS).logits
    sel = apply_esft(m, CFG, master_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, base)
    m(IDS, labels=IDS).loss.backward()
    for s in sel.values():
        assert s.gate_up_proj.dtype == torch.float32 and s.gate_up_proj.grad.dtype == torch.float32
        assert s.gate_up_proj.grad.abs().sum() > 0
    assert moe_layout(m).experts[1].gate_up_proj.dtype == torch.bfloat16
    # masters move: the cached bf16 copies must follow, also after the fused kernel (the trainer's), which writes
    # the masters without bumping their version counters
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[opt]
    torch.optim.AdamW(trainable_parameters(m), lr=1e-2, **kind).step()
    with torch.no_grad():
        tuned = m(IDS).logits
        assert not torch.equal(tuned, base)
        merge_selected(m)  # writes round(master -> bf16) into the fused rows
        assert torch.equal(m(IDS).logits, tuned)


def test_batched_mm_gradients_match_the_fused_rows():
    ref = _model("batched_mm")
    ref.requires_grad_(False)
    layout = moe_layout(ref)
    layout.experts[1].gate_up_proj.requires_grad_(True)
    ref(IDS, labels=IDS).loss.backward()
    m = _model("batched_mm")
    sel = apply_esft(m, CFG)
    m(IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(sel[1].gate_up_proj.grad, layout.experts[1].gate_up_proj.grad[CFG.experts[1]])


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_gpt_oss_layout_transposed_with_biases(impl):
    """GPT-OSS experts: transposed fused tensors (E, H, 2I) with per-expert biases and their own gate: exact logits,
    gradients reach the selected rows and biases only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=128,
                               layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n or "router" in n:
                p.normal_(0, 0.5)
    m.set_experts_implementation(impl)
    with torch.no_grad():
        base = m(IDS).logits
    sel = apply_esft(m, ExpertConfig({0: [1, 3], 1: [2]}))
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, base)
    assert set(sel[0].names) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    m(IDS, labels=IDS).loss.backward()
    assert sel[0].gate_up_proj_bias.grad.abs().sum() > 0 and sel[0].gate_up_proj.grad.shape == (2, 32, 64)
    assert all(p.grad is None for p in m.model.layers[0].mlp.experts.parameters(recurse=False))
