"""Expert-Specialized Fine-Tuning on fused experts: only the selected routed experts of each MoE layer train.

transformers v5 stores the routed experts of a layer as fused 3D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]). `requires_grad` cannot select rows of those, and masking gradients is not enough (AdamW's weight decay and
momentum would still move frozen rows, and optimizer state would be allocated for every expert). So here the selected
experts of a layer are copied into their own small parameters (a `SelectedExperts` module: `gate_up_proj`
[n_sel, 2I, H], `down_proj` [n_sel, H, I], attached as `experts.esft`), the fused parameters are frozen, and the
experts module's forward is replaced by one that uses the small rows for the selected experts:

- `eager` experts: the per-expert loop of transformers, taking the weight of a selected expert from the small tensor
  (no copy of the fused weights);
- `grouped_mm` / `batched_mm` (and any other registered implementation): the implementation itself, called on an
  overlay whose fused weight is `index_put(frozen, selected_ids, small)`: gradients flow only to the small tensor.

Both compute exactly what the base model computes until the small tensors change, so before any step the wrapped
model's logits equal the base model's bit for bit. `merge_selected` writes the rows back and removes the wrapper.

Expert configs use the authors' format: {"experts": {"<layer>": [ids]}, "shared_experts": bool,
"non_expert_modules": bool}; layer keys are decoder-layer indices.
"""

from __future__ import annotations

import random
import types

import torch
import torch.nn.functional as F
from torch import nn

from esft_core.errors import EsftError
from esft_core.expert_config import ExpertConfig  # noqa: F401  (re-exported: the type lived here)
from esft_core.models import MoeLayout, decoder_layers, expert_tensors, moe_layout

SHARED_EXPERT_ATTRS = ("shared_experts", "shared_expert", "shared_expert_gate", "shared_mlp")


def check_config(cfg: ExpertConfig, model: nn.Module, layout: MoeLayout | None = None) -> MoeLayout:
    """Raise one EsftError naming every layer key / expert id of `cfg` that does not fit `model`."""
    layout = layout or moe_layout(model)
    n_layers = len(decoder_layers(model))
    problems = []
    missing = [k for k in cfg.experts if not 0 <= k < n_layers]
    if missing:
        problems.append(f"layer(s) {', '.join(map(str, missing))} do not exist (model has {n_layers} decoder layers)")
    dense = [k for k in cfg.experts if 0 <= k < n_layers and k not in layout.routers]
    if dense:
        moe = ", ".join(map(str, layout.layers))
        problems.append(f"layer(s) {', '.join(map(str, dense))} are not MoE layers (MoE layers: {moe})")
    for k, ids in cfg.experts.items():
        bad = [i for i in ids if not 0 <= i < layout.num_experts]
        if bad and k in layout.routers:
            ids_s = ", ".join(map(str, bad))
            problems.append(f"layer {k}: expert id(s) {ids_s} out of range 0..{layout.num_experts - 1}")
    if problems:
        raise EsftError("expert config does not fit the model: " + "; ".join(problems))
    return layout


def random_config(like: ExpertConfig, num_experts: int, seed: int) -> ExpertConfig:
    """As many experts per layer as `like`, chosen uniformly at random (the paper's ablation), seeded."""
    rng = random.Random(seed)
    experts = {k: sorted(rng.sample(range(num_experts), len(v))) for k, v in like.experts.items()}
    return ExpertConfig(experts, like.shared_experts, like.non_expert_modules)


class SelectedExperts(nn.Module):
    """Trainable copies of the selected rows of one layer's fused expert parameters.

    For the usual layout it holds `gate_up_proj` (n_sel, 2I, H) and `down_proj` (n_sel, H, I); any other fused
    parameter with a leading expert dimension (biases) is copied the same way.
    """

    def __init__(self, experts: nn.Module, ids: list[int], tensors=None):
        super().__init__()
        # tensors: models.expert_tensors of the layer (name, expert rows per tensor); default: every parameter with
        # a leading expert axis of size num_experts
        if tensors is None:
            num_experts = experts.num_experts
            tensors = [types.SimpleNamespace(name=n, rows=1, expert_view=lambda t=None, p=p: p if t is None else t)
                       for n, p in experts.named_parameters(recurse=False)
                       if p.dim() >= 2 and p.shape[0] == num_experts]
        self.ids = list(ids)
        self.slot = {e: s for s, e in enumerate(self.ids)}  # expert id -> row of the small tensors
        self.register_buffer("expert_ids", torch.tensor(self.ids, dtype=torch.long), persistent=False)
        self.names = [t.name for t in tensors]  # relative to the experts module ('gate_up_proj', 'mlp.w1', ...)
        self.views = {t.name: t.expert_view for t in tensors}  # fused tensor -> (E, ...) view
        self.attr = {t.name: t.name.replace(".", "__") for t in tensors}
        for t in tensors:
            fused = self.views[t.name]()
            setattr(self, self.attr[t.name], nn.Parameter(fused.detach()[self.expert_ids].clone()))  # (n_sel, ...)
        # Our zero-copy eager loop covers the standard layout; anything else goes through the overlay path.
        self.simple_layout = (
            set(self.names) == {"gate_up_proj", "down_proj"}
            and getattr(experts, "has_gate", True)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "is_transposed", False)
            and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "has_post_expert_norm", False)
            and hasattr(experts, "act_fn") and hasattr(experts, "num_experts")
        )

    def small(self, name: str) -> nn.Parameter:
        return getattr(self, self.attr[name])

    def effective(self, experts: nn.Module, name: str) -> torch.Tensor:
        """The fused tensor with the selected rows taken from the trainable copy (differentiable in the copy only)."""
        fused = experts.get_parameter(name).detach()
        view = self.views[name](fused)  # (E, ...)
        return torch.index_put(view, (self.expert_ids,), self.small(name)).view(fused.shape)


class _Overlay:
    """Looks like the experts module, except that some attributes (the fused weights) are replaced."""

    def __init__(self, module: nn.Module, overrides: dict):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)


def _original_forward(cls) -> callable:
    # @use_experts_implementation wraps the class's eager forward with functools.wraps, so it keeps __wrapped__.
    return getattr(cls.forward, "__wrapped__", cls.forward)


def _eager_selected(self, sel: SelectedExperts, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop, reading selected experts' weights from `sel` (same ops, same order)."""
    final = torch.zeros_like(hidden_states)  # (T, H)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, K, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert_idx])
        slot = sel.slot.get(int(expert_idx))
        if slot is None:
            gate_up, down = self.gate_up_proj[expert_idx], self.down_proj[expert_idx]  # frozen (2I, H), (H, I)
        else:
            gate_up, down = sel.small("gate_up_proj")[slot], sel.small("down_proj")[slot]  # trainable (2I, H), (H, I)
        gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)  # (t, I) each
        h = F.linear(self.act_fn(gate) * up, down)  # (t, H)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def _esft_experts_forward(self, *args, **kwargs):
    sel: SelectedExperts = self.esft
    impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
    if impl == "eager" and sel.simple_layout and len(args) == 3 and not kwargs:
        return _eager_selected(self, sel, *args)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, _original_forward(type(self)))
    if all("." not in n for n in sel.names):
        return fn(_Overlay(self, {n: sel.effective(self, n) for n in sel.names}), *args, **kwargs)
    # nested expert parameters (DBRX's mlp.w1): swap them in for the call (no copy of the module)
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(self, {n: sel.effective(self, n) for n in sel.names}):
        return fn(self, *args, **kwargs)


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, SelectedExperts) for m in model.modules())


def shared_expert_modules(block: nn.Module) -> list[nn.Module]:
    return [m for a in SHARED_EXPERT_ATTRS if isinstance(m := getattr(block, a, None), nn.Module)]


def apply_esft(model: nn.Module, cfg: ExpertConfig) -> dict[int, SelectedExperts]:
    """Freeze `model` per `cfg` and give each selected layer its trainable `SelectedExperts`. Returns them by layer.

    Trainable afterwards: the selected routed experts; plus shared experts if `cfg.shared_experts`; plus every
    parameter outside the experts (attention, norms, routers, embeddings, head) if `cfg.non_expert_modules` (the
    authors' meaning). The fused routed-expert parameters are always frozen.
    """
    if is_wrapped(model):
        raise EsftError("model already has selected experts attached; load a fresh base model")
    layout = check_config(cfg, model)
    for p in model.parameters():
        p.requires_grad_(cfg.non_expert_modules)
    selected = {}
    for layer in layout.layers:
        experts = layout.experts[layer]
        for p in experts.parameters():
            p.requires_grad_(False)
        for m in shared_expert_modules(layout.blocks[layer]):
            m.requires_grad_(cfg.shared_experts)
        ids = cfg.experts.get(layer, [])
        if ids:
            experts.esft = SelectedExperts(experts, ids, expert_tensors(layout, layer))
            experts.forward = types.MethodType(_esft_experts_forward, experts)
            selected[layer] = experts.esft
    return selected


def merge_selected(model: nn.Module) -> nn.Module:
    """Write the trained rows back into the fused tensors and remove the wrappers: a plain transformers model."""
    for m in list(model.modules()):
        sel = getattr(m, "esft", None)
        if isinstance(sel, SelectedExperts):
            with torch.no_grad():
                for n in sel.names:
                    fused = m.get_parameter(n)
                    sel.views[n](fused)[sel.expert_ids] = sel.small(n).detach().to(fused.dtype)
            del m.esft
            m.__dict__.pop("forward", None)
    return model


def selected_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The small per-layer expert tensors (what ESFT adds)."""
    return [p for m in model.modules() if isinstance(m, SelectedExperts) for p in m.parameters()]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tensor_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter optimizer state tensors (AdamW: exp_avg + exp_avg_sq; scalar `step`s excluded)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
