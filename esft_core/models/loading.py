"""Load models and tokenizers, and discover a transformers-v5 MoE's layout (MoE layers, routers, fused experts).

Discovery is structural, so a family transformers adds later is found without a code change:
- decoder layers: the nn.ModuleList of `config.num_hidden_layers` blocks (`model.layers`,
  `transformer.blocks`, ...), preferring one outside vision/audio towers;
- experts: in each decoder layer, the outermost module that is a fused experts module (class name ending in
  `Experts`, shared experts excluded, or a module holding 3D parameters with one expert axis); its parent is the MoE
  block, which may be the decoder layer itself (Gemma4);
- router: the block's child named like a router (`gate`, `router`, ...) or else holding a weight with E rows; its
  weight is its own `weight` or its last nested Linear with >= E outputs (`router.gate`, `gate.wg`, `classifier`);
- E and K per layer: from the experts/router attributes, else the config, else the fused row count.

Routing is read where the experts module receives it (see record.py): the `(hidden, top_k_index, top_k_weights)`
arguments of its forward, or for experts run densely on router-scaled inputs (Llama4) the router's (T, E) scores.
`FAMILY_EXCEPTIONS` is the short list of what structure cannot tell. Layer numbers are decoder-layer indices, as in
the authors' files (layer 0 of DeepSeek-V2-Lite is dense, so its MoE layers are 1..26).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from esft_core.errors import EsftError
from esft_core.models.paths import DEMO_MODEL, REPO_ROOT, resolve_model_path  # noqa: F401  (re-exported, torch-free)

ROUTER_NAME = re.compile(r"^(gate|router|gating|wg|classifier|moe_gate|router_gate)$")
NOT_ROUTER = re.compile(r"(gate_proj|gate_up|shared|norm|expert)")
EXPERT_COUNT_ATTRS = ("num_experts", "num_routed_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "router_top_k")
SHARED_NAME = re.compile(r"shared")
OTHER_TOWERS = re.compile(r"(vision|visual|audio|image|speech|encoder)", re.I)

# What structure cannot tell, per config.model_type. "refuse": the family's "experts" are not FFN experts (or not
# one fused module per layer), so ESFT does not apply; "masked_zero_slots": the router masks its extra 'skip' expert
# as (id 0, weight 0) before the experts see it, so weight-0 slots are not routes.
FAMILY_EXCEPTIONS: dict[str, dict] = {
    "doge": {"refuse": "Doge's 'experts' are product-key memory rows (nn.Embedding up/down vectors retrieved per "
                       "token), not FFN experts; routing traces and ESFT do not apply"},
    "jetmoe": {"refuse": "JetMoE splits its experts into input_linear/output_linear modules fed pre-sorted tokens "
                         "and also routes attention heads to experts; this layout is not supported"},
    "zaya": {"masked_zero_slots": True},
    # transformers >= 5.25 hands Longcat's zero-computation (identity) slots to the experts as (a real id, weight
    # 0); before, they arrived as ids >= E. Both are dropped and counted, so traces agree across versions.
    "longcat_flash": {"masked_zero_slots": True},
}


@dataclass
class MoeLayout:
    """Where the MoE parts of a model live. `layers` are decoder-layer indices of the MoE layers, ascending.

    `num_experts` / `top_k` are the largest per-layer values (what the trace store records per run); per-layer
    values are in `layer_experts` / `layer_top_k`. `routing[layer]` is 'experts_input' (read top-K ids/weights from
    the experts module's forward arguments) or 'router_dense' (experts run densely; the router returns (T, E) scores).
    """

    family: str
    layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    routers: dict[int, nn.Module] = field(repr=False)
    experts: dict[int, nn.Module] = field(repr=False)
    blocks: dict[int, nn.Module] = field(repr=False)  # the whole MoE block (router + experts + shared experts)
    layer_experts: dict[int, int] = field(default_factory=dict)
    layer_top_k: dict[int, int] = field(default_factory=dict)
    routing: dict[int, str] = field(default_factory=dict)
    router_weights: dict[int, nn.Parameter] = field(default_factory=dict, repr=False)
    masked_zero_slots: bool = False

    def expert_params(self, layer: int) -> dict[str, nn.Parameter]:
        """Fused expert parameters of `layer` by name relative to the experts module, e.g. {'gate_up_proj':
        [E, 2I, H], 'down_proj': [E, H, I]} (DBRX: {'mlp.w1': [E*I, H], ...})."""
        return {n: p for n, p in self.experts[layer].named_parameters() if p.dim() >= 2 and not n.startswith("esft.")}


@dataclass
class ExpertTensor:
    """One fused expert parameter of a layer and where its experts lie: rows [e * rows, (e + 1) * rows) of axis 0
    belong to expert e. rows == 1 for the usual [E, ...] tensors (gate_up_proj [E, 2I, H], biases [E, 2I]); rows == I
    for flat 2D layouts ([E*I, H], DBRX's w1/v1/w2). `transposed`: the experts module computes x @ W (W [E, H, 2I],
    GPT-OSS, Llama4) rather than x @ W.T; informational, rows are per expert either way."""

    name: str  # relative to the experts module, e.g. 'gate_up_proj' or 'mlp.w1'
    param: nn.Parameter
    num_experts: int
    rows: int
    transposed: bool

    def expert_view(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """The parameter (or a same-shaped tensor) viewed with one leading expert axis (E, ...) (a view, no copy)."""
        p = self.param if t is None else t
        return p if self.rows == 1 else p.view(self.num_experts, self.rows, *p.shape[1:])


def expert_tensors(layout: MoeLayout, layer: int) -> list[ExpertTensor]:
    """The fused expert parameters of MoE `layer` with their expert axis layout (rows of axis 0 per expert).

    Raises EsftError for experts modules whose parameters do not split into E equal blocks along axis 0.
    """
    exp, n_e = layout.experts[layer], layout.layer_experts[layer]
    out = []
    for name, p in exp.named_parameters():
        if "esft" in name.split("."):
            continue
        lead = p.shape[0]
        if lead == n_e or (p.dim() >= 3 and lead > n_e):  # [E, ...] (Longcat: extra never-routed rows)
            rows = 1
        elif p.dim() == 2 and lead % n_e == 0:  # flat [E*I, H]
            rows = lead // n_e
        else:
            raise EsftError(f"layer {layer}: expert parameter {name} {tuple(p.shape)} does not split into "
                            f"{n_e} experts along its first axis; this experts layout is not supported")
        out.append(ExpertTensor(name, p, n_e, rows, bool(getattr(exp, "is_transposed", False))))
    if not out:
        raise EsftError(f"layer {layer}: the experts module {type(exp).__name__} has no expert parameters")
    return out


def lora_targets(model: nn.Module, remapped: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """LoRA targets: (module names, parameter names) for peft's target_modules / target_parameters.

    Modules: the suffix names of plain nn.Linear layers (exact class: subclasses such as PhiMoE/Llama4 routers or
    DeepSeek-V4's grouped o_a_proj have other forwards), excluding lm_head, every router and its nested Linears, the
    experts modules, Mamba/SSM mixers' projections (out_proj of Nemotron-H/Jamba/Granite-hybrid mixers), and the
    names in `remapped` (names peft rewrites into expert parameters). A suffix is kept only when every Linear
    carrying it is eligible (peft matches by suffix). Parameters: every fused [E, ...] expert weight of every MoE
    layer (`<path in the layer>.<name>`, e.g. 'mlp.experts.gate_up_proj'). Flat 2D experts nested in a submodule
    (DBRX's `experts.mlp.w1` [E*I, H]) are left out: peft's parameter wrapper replaces that submodule, and the
    experts forward reads its sibling weights directly, so LoRA there trains the attention side only.
    """
    layout = moe_layout(model)
    excluded = set()
    for r in layout.routers.values():
        excluded |= {id(m) for m in r.modules()}
    for e in layout.experts.values():
        excluded |= {id(m) for m in e.modules()}
    for m in model.modules():
        if re.search(r"(mamba|ssm|mixer2|gateddeltanet|linearattention|kda|shortconv)", type(m).__name__.lower()):
            excluded |= {id(x) for x in m.modules()}
    ok, bad = set(), set()
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        leaf = n.rsplit(".", 1)[-1]
        if type(m) is nn.Linear and id(m) not in excluded and not n.endswith("lm_head") and leaf not in remapped:
            ok.add(leaf)
        else:
            bad.add(leaf)
    layers = decoder_layers(model)
    params = set()
    for layer in layout.layers:
        prefix = next(n for n, m in layers[layer].named_modules() if m is layout.experts[layer])
        params |= {f"{prefix}.{t.name}" for t in expert_tensors(layout, layer) if t.param.dim() >= 2
                   and not t.name.endswith("bias") and t.rows == 1 and "." not in t.name}
    return sorted(ok - bad), sorted(params)


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    try:
        return cfg.get_text_config()
    except (AttributeError, ValueError):
        return cfg


def family_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(text_config(model), "model_type", None) or getattr(cfg, "model_type", type(model).__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list: the ModuleList of `num_hidden_layers` same-class blocks (outside other towers)."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    cands = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and not isinstance(m[0], nn.ModuleList | nn.Linear):
            cands.append((len(m) != n, bool(OTHER_TOWERS.search(name)), len({type(x) for x in m}) > 2,
                          name.count("."), -len(m), name, m))
    if not cands:
        raise EsftError(f"{type(model).__name__} has no decoder layer list; not a supported causal LM")
    return min(cands, key=lambda c: c[:6])[-1]


def _is_experts(m: nn.Module) -> bool:
    name = type(m).__name__
    if name.endswith("Experts") and not SHARED_NAME.search(name.lower()):
        return any(p.dim() >= 2 for p in m.parameters())
    p3 = [p for p in m.parameters(recurse=False) if p.dim() == 3]
    return len(p3) >= 2 and len({p.shape[0] for p in p3}) <= 2


def _find_experts(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost fused-experts modules of a decoder layer, with their names relative to it (shared ones excluded)."""
    found = []
    for name, m in layer.named_modules():
        if any(name.startswith(f + ".") for f, _ in found) or any(SHARED_NAME.search(part) for part in name.split(".")):
            continue
        if name and _is_experts(m):
            found.append((name, m))
    return found


def _int_attr(objs, names, layer_idx: int) -> int | None:
    for o in objs:
        for a in names:
            v = getattr(o, a, None)
            if isinstance(v, list | tuple) and v and all(isinstance(x, int) for x in v):
                v = v[layer_idx] if layer_idx < len(v) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _num_experts(experts: nn.Module, cfg, layer_idx: int) -> int:
    e = _int_attr([experts], EXPERT_COUNT_ATTRS, layer_idx)
    if e is not None:
        return e
    lead = [p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3]
    if lead:
        return min(lead)  # Longcat's gate_up_proj carries unused rows for its zero-computation experts
    e = _int_attr([cfg, getattr(cfg, "ffn_config", None)], EXPERT_COUNT_ATTRS, layer_idx)
    if e is None:
        raise EsftError(f"cannot tell the number of experts of {type(experts).__name__}")
    return e


def _router_weight(router: nn.Module, num_experts: int) -> nn.Parameter | None:
    w = getattr(router, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] >= num_experts:
        return w
    lins = [m.weight for m in router.modules() if isinstance(m, nn.Linear) and m.out_features >= num_experts]
    return lins[-1] if lins else None


def _find_router(block: nn.Module, experts_name: str, num_experts: int) -> tuple[nn.Module, nn.Parameter] | None:
    named, other = [], []
    for name, child in block.named_children():
        if name == experts_name.split(".")[0] or NOT_ROUTER.search(name):
            continue
        w = _router_weight(child, num_experts)
        if w is None:
            continue
        (named if ROUTER_NAME.match(name) else other).append((child, w))
    if named:
        return named[0]
    exact = [(c, w) for c, w in other if w.shape[0] == num_experts]
    return exact[0] if exact else None


def _takes_routing(experts: nn.Module) -> bool:
    fwd = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    params = [p for p in inspect.signature(fwd).parameters.values() if p.kind in (p.POSITIONAL_ONLY,
                                                                                   p.POSITIONAL_OR_KEYWORD)]
    return len(params) >= 4  # self, hidden_states, top_k_index, top_k_weights


def moe_layout(model: nn.Module) -> MoeLayout:
    """Describe the MoE layers of `model`; raise EsftError (one line, naming the family) when it has none or is
    not supported."""
    family = family_of(model)
    exc = FAMILY_EXCEPTIONS.get(family, {})
    if "refuse" in exc:
        raise EsftError(f"model family '{family}' is not supported: {exc['refuse']}")
    cfg = text_config(model)
    routers, experts, blocks, n_exp, top_k, routing, rweights = {}, {}, {}, {}, {}, {}, {}
    for i, layer in enumerate(decoder_layers(model)):
        found = _find_experts(layer)
        if not found:
            continue
        if len(found) > 1:
            names = ", ".join(n for n, _ in found)
            raise EsftError(f"model family '{family}': decoder layer {i} holds several expert modules ({names}); "
                            "one fused experts module per layer is supported")
        name, exp = found[0]
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = layer.get_submodule(parent_name) if parent_name else layer
        e = _num_experts(exp, cfg, i)
        r = _find_router(block, name[len(parent_name) + 1 if parent_name else 0:], e)
        if r is None:
            raise EsftError(f"model family '{family}': layer {i} has experts ({name}) but no router next to them")
        router, w = r
        k = _int_attr([router, block, exp, cfg, getattr(cfg, "ffn_config", None)], TOP_K_ATTRS, i)
        if k is None:
            raise EsftError(f"model family '{family}': cannot tell the top-K of layer {i}'s router")
        routers[i], experts[i], blocks[i], n_exp[i], top_k[i], rweights[i] = router, exp, block, e, k, w
        routing[i] = "experts_input" if _takes_routing(exp) else "router_dense"
    if not routers:
        raise EsftError(f"model '{family}' has no MoE layers (no fused experts module next to a router found in any "
                        "decoder layer)")
    first = min(routers)
    return MoeLayout(
        family=family,
        layers=sorted(routers),
        num_experts=max(n_exp.values()),
        top_k=max(top_k.values()),
        hidden_size=int(getattr(cfg, "hidden_size", None) or rweights[first].shape[1]),
        routers=routers,
        experts=experts,
        blocks=blocks,
        layer_experts=n_exp,
        layer_top_k=top_k,
        routing=routing,
        router_weights=rweights,
        masked_zero_slots=bool(exc.get("masked_zero_slots")),
    )


def _causal_lm_class(path: str, auto_cls):
    """AutoModelForCausalLM when it knows the config; else the class named in `config.architectures`."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if type(cfg) in auto_cls._model_mapping:
        return auto_cls
    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise EsftError(f"cannot load model '{path}': no causal-LM class for model type '{cfg.model_type}' "
                    f"(config.architectures: {getattr(cfg, 'architectures', None)})")


def load_model(
    name_or_path: str | Path | None = "demo",
    dtype: torch.dtype | str | None = torch.float32,
    experts_implementation: str | None = None,
    device: torch.device | str | None = None,
    device_map: str | None = None,
):
    """Load (model, tokenizer) from a local directory, 'demo', or a hub id (works offline for local paths).

    `dtype`: a torch dtype, or 'auto' / None for the checkpoint's own dtype (the demo checkpoint is stored in bfloat16
    to stay small; the default float32 suits CPU training and exact comparisons). `device`: where the weights go;
    they are loaded straight onto it (no intermediate full-size copy in another dtype). `device_map`: an Accelerate
    placement strategy ('auto', ...) for a model larger than one GPU; it replaces `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": "auto" if dtype in (None, "auto") else dtype}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        cls = _causal_lm_class(path, AutoModelForCausalLM)  # a config problem is named before the tokenizer's
        tok = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, **kwargs)
    except EsftError:
        raise
    except Exception as e:  # noqa: BLE001 - every load failure is one clear line (exit 2), never a traceback
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EsftError(f"cannot load model '{name_or_path}': {type(e).__name__}: {msg}") from None
    model.eval()
    from esft_core.procs import release_freed_host_memory

    release_freed_host_memory()  # the load's freed staging blocks (GBs on a large checkpoint)
    return model, tok


# ---------------------------------------------------------------------------------------------------------------
# Tiny seeded random models of any MoE family (tests, benchmarks): the family's default config with every size
# shrunk (E = 8, K = 2, H = 32, 3 decoder layers, the first dense where the family allows it), plus the few
# per-family overrides its config validation needs. Shapes keep E >= 8 and K >= 2 so routing is non-trivial.
TINY_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
CONFIG_EXPERT_KEYS = re.compile(r"^(num_experts|n_routed_experts|num_local_experts|moe_num_experts)$")
CONFIG_TOP_K_KEYS = re.compile(r"^(num_experts_per_tok|num_experts_per_token|moe_k|moe_topk|top_k_experts|moe_top_k)$")
TINY_SIZES = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=256,
    shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, sliding_window=64,
    expert_ffn_hidden_size=16, ffn_hidden_size=64, moe_shared_expert_intermediate_size=32, global_head_dim=8,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, mamba_n_heads=4, mamba_d_head=16, mamba_head_dim=16,
    mamba_d_state=8, mamba_n_groups=1, ssm_state_size=8, n_groups=1, mamba_expand=2, time_step_rank=4,
    mamba_dt_rank=4, router_hidden_size=16, num_nextn_predict_layers=0, index_n_heads=2, index_head_dim=8,
    index_topk=8, o_lora_rank=16, o_groups=2, qk_head_dim=16, hc_mult=1, conv_L_cache=3, num_layers=3,
    num_expert_group=1, linear_head_dim=8, linear_num_heads=4, hc_lowrank=8, ple_embed_dim=32,
    swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_head_dim=8, unpadded_vocab_size=256, num_dense_layers=1,
)
# config overrides a family needs beyond the generic shrink (validation rules, MoE switched off by default, ...)
TINY_OVERRIDES: dict[str, dict] = {
    "qwen2_moe": dict(decoder_sparse_step=1, mlp_only_layers=[0]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[0]),
    "deepseek_v2": dict(topk_method="greedy", q_lora_rank=None, n_shared_experts=2),
    "zaya": dict(num_experts_per_tok=1),
    "longcat_flash": dict(zero_expert_num=2),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "gemma4_text": dict(enable_moe_block=True, per_layer_config={}),
    "dots3_note_text": dict(per_layer_config={}, head_dim=16),
    "mimo_v2_flash": dict(head_dim=24, v_head_dim=8, num_key_value_heads=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "full_attention"]),
    # its validation: NVFP4 key/value rounding needs head_dim % 16 == 0; indexer heads <= query heads per key head
    "kolibri1_1": dict(head_dim=16, index_num_heads=1, mlp_only_layers=[0]),
    "mistral4": dict(head_dim=16),  # = qk_nope + qk_rope head dims (partial rotary factor 0.5)
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                           indexer_compress_ratio=2),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=3, max_seq_len=256,
                 attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
}


def moe_families() -> list[str]:
    """The MoE causal-LM families of the installed transformers, found by scanning its model configs: every
    model type with a causal-LM class (AutoModelForCausalLM's, or `<Name>ForCausalLM` next to `<Name>Config`, as
    Mistral4) whose default config (or its text config) names an expert count. A multimodal wrapper whose text
    config is itself such a family is counted once, as the text family."""
    import warnings

    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    causal = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [
        mt for mt, c in CONFIG_MAPPING_NAMES.items()
        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and hasattr(transformers, c.replace("Config", "ForCausalLM"))]
    for mt in causal:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = AutoConfig.for_model(mt)
        except Exception:  # noqa: BLE001 - a config that cannot be built with defaults is not scanned
            continue
        subs = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
        hit = [c for c in subs if any(CONFIG_EXPERT_KEYS.match(k) for k in c.to_dict())]
        if not hit and not any(CONFIG_EXPERT_KEYS.match(k) for k in _flat_keys(cfg.to_dict())):
            continue
        text = [c.model_type for c in subs[1:] if c in hit and c.model_type in causal]
        found.append(text[0] if text else mt)
    return sorted(set(found))


def _flat_keys(d: dict):
    for k, v in d.items():
        yield str(k)
        if isinstance(v, dict):
            yield from _flat_keys(v)


def _shrink(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if CONFIG_EXPERT_KEYS.match(k):
            out[k] = 8
        elif CONFIG_TOP_K_KEYS.match(k):
            out[k] = 2
        elif k in TINY_SIZES and (isinstance(v, int) or v is None):
            out[k] = TINY_SIZES[k]
        elif isinstance(v, dict) and k.endswith("_config"):
            out[k] = {**v, **_shrink(v)}
        elif isinstance(v, list) and k.endswith(("layer_types", "layers_block_type")) and len(v) > 3:
            out[k] = v[-3:] if k != "mlp_layer_types" else v[:1] + v[-2:]
    return out


def tiny_config(family: str, vocab_size: int = 256, **overrides):
    """A tiny config of `family`: the default config with every size shrunk (3 decoder layers)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if family not in CONFIG_MAPPING_NAMES:
        raise EsftError(f"unknown model family '{family}'; choose one of {', '.join(moe_families())}")
    default = AutoConfig.for_model(family).to_dict()
    cfg = {**_shrink(default), "vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
           **TINY_OVERRIDES.get(family, {}), **overrides}
    if family == "deepseek_v2" and "q_lora_rank" not in overrides:
        cfg["q_lora_rank"] = None
    return AutoConfig.for_model(family, **cfg)


def tiny_moe(family: str = "deepseek_v2", seed: int = 0, **overrides):
    """A seeded random tiny MoE causal LM of `family` (float32, eval mode)."""
    import warnings

    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if type(cfg) in AutoModelForCausalLM._model_mapping:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        else:  # a causal LM without an auto-class entry (Mistral4)
            model = getattr(transformers, type(cfg).__name__.replace("Config", "ForCausalLM"))(cfg).float()
    # Routers of some families are zero-initialised (every expert ties); give them seeded random weights so
    # routing differs between tokens, as in a trained model.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in moe_layout(model).router_weights.values():
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
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
