"""The built-in training methods' code: prepare(model, cfg, expert_cfg, master_dtype) -> the model to train, and the
expert config an esft-format run trains. Which method uses what is registered in esft_core/tuning/registry.py.

`esft` / `random` attach the selected experts (esft_core.experts.esft), `shared` trains only the shared experts (an
expert
config with no routed experts and `shared_experts`, the paper's Table 3 row), `fft` makes every parameter trainable,
`lora` wraps the model with peft LoRA (`lora_targets`). `cfg` is the run's TrainConfig (esft_core.tuning.train); for the
esft-family methods `expert_cfg` already carries `--train-shared` / `--train-non-expert`.
"""

from __future__ import annotations

import torch

from esft_core.tuning.registry import get_method, resolve

# peft 0.21 rewrites target_modules named gate_proj / up_proj / down_proj (and w1/w2/w3, gate) into fused-expert
# target_parameters for MoE models (its transformers v4 -> v5 conversion), so the dense MLP and shared experts, whose
# Linear modules carry those names, cannot be targeted by name; we leave them out rather than let peft remap them.
PEFT_REMAPPED = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"}


def lora_targets(model) -> tuple[list[str], list[str]]:
    """LoRA targets (attention-side Linears, fused routed experts): see esft_core.models.loading.lora_targets."""
    from esft_core.models.loading import lora_targets as targets

    return targets(model, PEFT_REMAPPED)


def load_experts_cfg(cfg) -> None:
    """Fill `cfg.experts_cfg` from the `--experts` file (esft, random) once, before anything else reads it."""
    if get_method(cfg.method).needs_experts and cfg.experts_cfg is None:
        from esft_core.experts.expert_config import ExpertConfig

        cfg.experts_cfg = ExpertConfig.load(cfg.experts).to_dict()


def expert_config_for(cfg, model, prev_config: dict | None = None):
    """The expert config an esft-family run trains (None for fft / lora): the config file's (`--experts`; none for
    `shared`), for `random` the seeded random draw (or, on --resume, the draw stored in `prev_config`), with the
    Table 3 flags added to what the file says (an authors' config may already set them). Raises EsftError when the
    config does not fit the model or asks for shared experts the model lacks — before anything is written."""
    from esft_core.errors import EsftError
    from esft_core.experts.esft import SHARED_EXPERT_ATTRS, check_config, shared_expert_modules
    from esft_core.experts.expert_config import ExpertConfig

    m = get_method(cfg.method)
    if not m.esft_adapter:
        return None
    ecfg = ExpertConfig.from_dict(cfg.experts_cfg) if cfg.experts_cfg is not None else ExpertConfig({})
    layout = check_config(ecfg, model)
    if m.draw and (prev_config or {}).get("random_experts"):
        ecfg = ExpertConfig.from_dict(prev_config["random_experts"])
    elif m.draw:
        ecfg = resolve(m.draw)(cfg, ecfg, layout.num_experts)
    ecfg = ExpertConfig(ecfg.experts, ecfg.shared_experts or cfg.train_shared or m.shared_experts,
                        ecfg.non_expert_modules or cfg.train_non_expert)
    if ecfg.shared_experts and not any(shared_expert_modules(b) for b in layout.blocks.values()):
        why = (f"--method {m.name}" if m.shared_experts else "--train-shared" if cfg.train_shared
               else f"expert config {cfg.experts} (shared_experts: true)")
        raise EsftError(f"{why}: {type(model).__name__} has no shared experts (no MoE layer has a "
                        f"{' / '.join(SHARED_EXPERT_ATTRS)} module); drop it")
    return ecfg


def prepare_esft(model, cfg, expert_cfg, master_dtype=None):
    from esft_core.experts.esft import apply_esft
    from esft_core.tuning.distributed import world_size

    # fp32 masters of shared / non-expert tensors: a cast parametrization in one process; under FSDP the recipe makes
    # every trainable tensor fp32 and FSDP's mixed-precision policy casts it for the forward
    apply_esft(model, expert_cfg, master_dtype=master_dtype, extra_masters=world_size() == 1)
    return model


def prepare_fft(model, cfg, expert_cfg, master_dtype=None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def prepare_lora(model, cfg, expert_cfg, master_dtype=None):
    import warnings

    from peft import LoraConfig, get_peft_model

    modules, params = lora_targets(model)
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=modules,
                      target_parameters=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, lcfg)


def draw_random(cfg, ecfg, num_experts: int):
    """`random`: as many experts per layer as `ecfg`, drawn with the run's seed (the paper's ablation)."""
    from esft_core.experts.esft import random_config

    return random_config(ecfg, num_experts, cfg.seed)
