"""Training methods by name (`METHODS`): prepare(model, cfg, expert_cfg, master_dtype) -> the model to train.

`esft` / `random` attach the selected experts (esft_core.esft), `shared` trains only the shared experts (an expert
config with no routed experts and `shared_experts`, the paper's Table 3 row), `fft` makes every parameter trainable,
`lora` wraps the model with peft LoRA (`lora_targets`). `cfg` is the run's TrainConfig (esft_core.train); for the
esft-family methods `expert_cfg` already carries `--train-shared` / `--train-non-expert`.
"""

from __future__ import annotations

import torch

# Registry by name.
# peft 0.21 rewrites target_modules named gate_proj / up_proj / down_proj (and w1/w2/w3, gate) into fused-expert
# target_parameters for MoE models (its transformers v4 -> v5 conversion), so the dense MLP and shared experts, whose
# Linear modules carry those names, cannot be targeted by name; we leave them out rather than let peft remap them.
PEFT_REMAPPED = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"}


def lora_targets(model) -> tuple[list[str], list[str]]:
    """LoRA targets (attention-side Linears, fused routed experts): see esft_core.models.lora_targets."""
    from esft_core.models import lora_targets as targets

    return targets(model, PEFT_REMAPPED)


def _prepare_esft(model, cfg, expert_cfg, master_dtype=None):
    from esft_core.distributed import world_size
    from esft_core.esft import apply_esft

    # fp32 masters of shared / non-expert tensors: a cast parametrization in one process; under FSDP the recipe makes
    # every trainable tensor fp32 and FSDP's mixed-precision policy casts it for the forward
    apply_esft(model, expert_cfg, master_dtype=master_dtype, extra_masters=world_size() == 1)
    return model


def _prepare_fft(model, cfg, expert_cfg, master_dtype=None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _prepare_lora(model, cfg, expert_cfg, master_dtype=None):
    import warnings

    from peft import LoraConfig, get_peft_model

    modules, params = lora_targets(model)
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=modules,
                      target_parameters=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, lcfg)


METHODS = {"esft": _prepare_esft, "random": _prepare_esft, "shared": _prepare_esft, "fft": _prepare_fft,
           "lora": _prepare_lora}
ESFT_FAMILY = ("esft", "random", "shared")  # methods that write an ESFT adapter (expert_cfg.json + tensors)
