"""Load models and tokenizers, and describe a transformers-v5 MoE's layout (MoE layers, routers, fused experts).

Every MoE family in transformers v5 has the same shape: decoder layer `i` holds `mlp` with a router (`gate` or
`router`, whose forward returns `(router_logits (T, E), topk_weights (T, K), topk_indices (T, K))`) and fused experts
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]). Layer numbers are decoder-layer indices, as in
the authors' files (layer 0 of DeepSeek-V2-Lite is dense, so its MoE layers are 1..26).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from esft_core.errors import EsftError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "data" / "demo-moe"
ROUTER_ATTRS = ("gate", "router")


@dataclass
class MoeLayout:
    """Where the MoE parts of a model live. `layers` are decoder-layer indices of the MoE layers, ascending."""

    family: str
    layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    routers: dict[int, nn.Module] = field(repr=False)
    experts: dict[int, nn.Module] = field(repr=False)
    blocks: dict[int, nn.Module] = field(repr=False)  # the whole MoE block (router + experts + shared experts)

    def expert_params(self, layer: int) -> dict[str, nn.Parameter]:
        """Fused 3D expert parameters of `layer`, e.g. {'gate_up_proj': [E, 2I, H], 'down_proj': [E, H, I]}."""
        return {n: p for n, p in self.experts[layer].named_parameters(recurse=False) if p.dim() >= 2}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (`model.model.layers` for every supported family)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise EsftError(f"{type(model).__name__} has no decoder layers at .model.layers; not a supported causal LM")
    return layers


def find_router(mlp: nn.Module) -> nn.Module | None:
    for attr in ROUTER_ATTRS:
        mod = getattr(mlp, attr, None)
        if isinstance(mod, nn.Module) and hasattr(mod, "top_k") and hasattr(mod, "weight"):
            return mod
    return None


def moe_layout(model: nn.Module) -> MoeLayout:
    """Describe the MoE layers of `model`; raise EsftError when it has none."""
    routers, experts, blocks = {}, {}, {}
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if mlp is None:
            continue
        router = find_router(mlp)
        exp = getattr(mlp, "experts", None)
        if router is None or exp is None:
            continue
        routers[i], experts[i], blocks[i] = router, exp, mlp
    if not routers:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise EsftError(f"model '{name}' has no MoE layers (no router with top_k found in any decoder layer)")
    first = routers[min(routers)]
    return MoeLayout(
        family=getattr(model.config, "model_type", type(model).__name__),
        layers=sorted(routers),
        num_experts=int(getattr(first, "num_experts", first.weight.shape[0])),
        top_k=int(first.top_k),
        hidden_size=int(first.weight.shape[1]),
        routers=routers,
        experts=experts,
        blocks=blocks,
    )


def resolve_model_path(name_or_path: str | Path | None) -> str:
    """'demo' or None → the shipped demo model; an existing directory → itself; anything else → a hub id."""
    if name_or_path in (None, "", "demo"):
        return str(DEMO_MODEL)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise EsftError(f"model directory {p} has no config.json")
        return str(p)
    if str(name_or_path).startswith((".", "/", "~")):
        raise EsftError(f"model directory {name_or_path} does not exist")
    return str(name_or_path)


def load_model(
    name_or_path: str | Path | None = "demo",
    dtype: torch.dtype | str | None = torch.float32,
    experts_implementation: str | None = None,
    device: torch.device | str | None = None,
):
    """Load (model, tokenizer) from a local directory, 'demo', or a hub id (works offline for local paths).

    `dtype`: a torch dtype, or 'auto' / None for the checkpoint's own dtype (the demo checkpoint is stored in bfloat16
    to stay small; the default float32 suits CPU training and exact comparisons). `device`: where the weights go;
    they are loaded straight onto it (no intermediate full-size copy in another dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": "auto" if dtype in (None, "auto") else dtype}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise EsftError(f"cannot load model '{name_or_path}': {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------------------------------
# Tiny seeded random models of each supported family (tests, benchmarks). Shapes keep E >= 8 and K >= 2 so routing
# is non-trivial; everything else is as small as the configs allow.
TINY_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def tiny_config(family: str, vocab_size: int = 256, **overrides):
    """A tiny config of `family` with 3 decoder layers (the first dense where the family allows it)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    per_family = {
        "deepseek_v2": dict(
            n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=16, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, topk_method="greedy", n_group=1, topk_group=1,
        ),
        "deepseek_v3": dict(
            n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, n_group=1, topk_group=1,
        ),
        "qwen2_moe": dict(
            num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=32, decoder_sparse_step=1,
            mlp_only_layers=[0],
        ),
        "qwen3_moe": dict(
            num_experts=8, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[0], head_dim=8,
        ),
        "mixtral": dict(num_local_experts=8),
        "olmoe": dict(num_experts=8),
    }
    if family not in per_family:
        raise EsftError(f"unknown model family '{family}'; choose one of {', '.join(TINY_FAMILIES)}")
    cfg = {**common, **per_family[family], **overrides}
    return AutoConfig.for_model(family, **cfg)


def tiny_moe(family: str = "deepseek_v2", seed: int = 0, **overrides):
    """A seeded random tiny MoE causal LM of `family` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Routers of some families are zero-initialised (every expert ties); give them seeded random weights so
    # routing differs between tokens, as in a trained model.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for router in moe_layout(model).routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.5)
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models (ids: 0 pad, 1 bos, 2 eos, 3 unk, then printable ASCII)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(out_dir: str | Path, family: str = "deepseek_v2", seed: int = 0, **overrides) -> Path:
    """Write a tiny seeded model of `family` plus `tiny_tokenizer()` as a from_pretrained-able directory."""
    out = Path(out_dir)
    tiny_moe(family, seed, **overrides).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
