"""ESFT adapters (esft_core/experts/adapters.py): save/load, base fingerprints, merge, import of the authors'
adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_core.errors import EsftError
from esft_core.experts.adapters import (
    base_fingerprint,
    import_official_adapter,
    load_adapter,
    save_adapter,
)
from esft_core.experts.esft import ExpertConfig, apply_esft, selected_parameters
from esft_core.models.loading import moe_layout, save_tiny, tiny_moe

CFG = ExpertConfig({1: [2, 6], 2: [0]})
IDS = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(1))


def _tuned(cfg=CFG, seed=0):
    """A tiny DeepSeek-V2 with `cfg` applied and its trainable tensors perturbed (as if trained)."""
    m = tiny_moe("deepseek_v2", seed=seed)
    fp = base_fingerprint(m)
    apply_esft(m, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m, fp


def test_save_holds_only_trained_tensors_and_load_reproduces_logits(tmp_path):
    m, fp = _tuned()
    with torch.no_grad():
        tuned = m(IDS).logits
    save_adapter(m, CFG, tmp_path / "a", fp)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter.safetensors", "base_fingerprint.json", "expert_cfg.json"]
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "model.layers.1.mlp.experts.esft.gate_up_proj": (2, 32, 32),
        "model.layers.1.mlp.experts.esft.down_proj": (2, 32, 16),
        "model.layers.1.mlp.experts.esft.expert_ids": (2,),
        "model.layers.2.mlp.experts.esft.gate_up_proj": (1, 32, 32),
        "model.layers.2.mlp.experts.esft.down_proj": (1, 32, 16),
        "model.layers.2.mlp.experts.esft.expert_ids": (1,),
    }
    sel_bytes = sum(p.numel() * p.element_size() for p in selected_parameters(m))
    size = (tmp_path / "a" / "adapter.safetensors").stat().st_size
    assert sel_bytes < size < sel_bytes + 2048  # ≈ the selected experts' bytes (+ header, ids)
    assert json.loads((tmp_path / "a" / "expert_cfg.json").read_text()) == CFG.to_dict()

    fresh = tiny_moe("deepseek_v2", seed=0)
    assert load_adapter(fresh, tmp_path / "a") == CFG
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, tuned)


def test_non_expert_modules_adapter_roundtrip(tmp_path):
    cfg = ExpertConfig({1: [1]}, shared_experts=True, non_expert_modules=True)
    m, fp = _tuned(cfg)
    with torch.no_grad():
        tuned = m(IDS).logits
    save_adapter(m, cfg, tmp_path / "a", fp)
    names = set(load_file(tmp_path / "a" / "adapter.safetensors"))
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" not in names  # fused tensors never saved
    fresh = tiny_moe("deepseek_v2", seed=0)
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, tuned)


def test_refuses_a_different_base(tmp_path):
    m, fp = _tuned()
    save_adapter(m, CFG, tmp_path / "a", fp)
    other = tiny_moe("deepseek_v2", seed=1)
    with pytest.raises(EsftError, match="made for a different base model .*differs in digest"):
        load_adapter(other, tmp_path / "a")
    assert not any(p.requires_grad is False for p in other.parameters())  # untouched
    # the same weights in bfloat16 are the same base
    same = tiny_moe("deepseek_v2", seed=0).to(torch.bfloat16)
    assert base_fingerprint(same)["digest"] == fp["digest"]


def _cli(capsys, *args):
    from esft_core.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_merge_writes_a_plain_checkpoint_with_equal_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny(tmp_path / "base")
    m, fp = _tuned()
    with torch.no_grad():
        tuned = m(IDS).logits
    assert fp["digest"] == base_fingerprint(AutoModelForCausalLM.from_pretrained(base_dir))["digest"]
    save_adapter(m, CFG, tmp_path / "a", fp)
    code, err = _cli(capsys, "merge", "--model", base_dir, "--adapter", tmp_path / "a", "--out", tmp_path / "merged")
    assert code == 0, err
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("esft" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.equal(merged(IDS).logits, tuned)
    # refusing to overwrite
    code, err = _cli(capsys, "merge", "--model", base_dir, "--adapter", tmp_path / "a", "--out", tmp_path / "merged")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def _official(tmp_path, cfg: dict, prefix="model.", drop=None):
    """An adapter in the authors' naming (one Linear per expert and projection) with random weights."""
    d = tmp_path / "official"
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer, ids in cfg["experts"].items():
        for e in ids:
            for proj, shape in (("gate_proj", (16, 32)), ("up_proj", (16, 32)), ("down_proj", (32, 16))):
                tensors[f"{prefix}layers.{layer}.mlp.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g)
    if drop:
        del tensors[drop]
    save_file(tensors, str(d / "model.safetensors"))
    (d / "expert_cfg.json").write_text(json.dumps(cfg))
    return d, tensors


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_import_official_adapter_into_fused_layout(tmp_path, prefix):
    cfg = {"experts": {"1": [4, 1], "2": [7]}, "shared_experts": False, "non_expert_modules": False}
    src, tensors = _official(tmp_path, cfg, prefix)
    model = tiny_moe("deepseek_v2", seed=0)
    import_official_adapter(src, model, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter.safetensors")
    assert ours["model.layers.1.mlp.experts.esft.expert_ids"].tolist() == [4, 1]  # the config's (score) order
    t = lambda k: tensors[f"{prefix}layers.{k}.weight"]
    assert torch.equal(ours["model.layers.1.mlp.experts.esft.gate_up_proj"][0],  # slot 0 = expert 4
                       torch.cat([t("1.mlp.experts.4.gate_proj"), t("1.mlp.experts.4.up_proj")]))
    assert torch.equal(ours["model.layers.2.mlp.experts.esft.down_proj"][0], t("2.mlp.experts.7.down_proj"))

    # loaded onto the base and merged, expert 4 of layer 1 computes the authors' per-expert MLP
    fresh = tiny_moe("deepseek_v2", seed=0)
    load_adapter(fresh, tmp_path / "ours")
    from esft_core.experts.esft import merge_selected

    merge_selected(fresh)
    exp = moe_layout(fresh).experts[1]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    gate, up, down = t("1.mlp.experts.4.gate_proj"), t("1.mlp.experts.4.up_proj"), t("1.mlp.experts.4.down_proj")
    want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    got = exp(x, torch.full((5, 1), 4), torch.ones(5, 1))
    torch.testing.assert_close(got, want)


def test_import_errors(tmp_path):
    cfg = {"experts": {"1": [4], "2": [7]}, "shared_experts": False, "non_expert_modules": False}
    src, _ = _official(tmp_path, cfg, drop="model.layers.2.mlp.experts.7.up_proj.weight")
    with pytest.raises(EsftError, match="layer 2 expert 7 lacks up_proj"):
        import_official_adapter(src, tiny_moe("deepseek_v2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "expert_cfg.json").write_text(json.dumps({**cfg, "experts": {"1": [4]}}))
    with pytest.raises(EsftError, match="tensors for unlisted layer 2 expert 7"):
        import_official_adapter(src, tiny_moe("deepseek_v2"), tmp_path / "out")
    (src / "expert_cfg.json").write_text(json.dumps({**cfg, "experts": {"1": [4], "2": [7], "0": [1]}}))
    with pytest.raises(EsftError, match="not MoE layers"):
        import_official_adapter(src, tiny_moe("deepseek_v2"), tmp_path / "out")
