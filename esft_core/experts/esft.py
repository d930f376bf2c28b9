"""Expert-Specialized Fine-Tuning on fused experts: only the selected routed experts of each MoE layer train.

transformers v5 stores the routed experts of a layer as fused 3D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]). `requires_grad` cannot select rows of those, and masking gradients is not enough (AdamW's weight decay and
momentum would still move frozen rows, and optimizer state would be allocated for every expert). So here the selected
experts of a layer are copied into their own small parameters (a `SelectedExperts` module: `gate_up_proj`
[n_sel, 2I, H], `down_proj` [n_sel, H, I], attached as `experts.esft`), the fused parameters are frozen, and the
experts module's forward is replaced by one that uses the small rows for the selected experts:

- `eager` experts: the per-expert loop of transformers, taking the weight of a selected expert from the small tensor
  (no copy of the fused weights);
- `grouped_mm`: transformers' grouped forward in one pass with two weight sources (`_grouped_split`): slots sorted
  frozen-first, one grouped_mm per projection on the frozen fused tensor and one on the small tensor;
- `batched_mm` (and any other registered implementation): the implementation itself, called twice:
  once on the frozen fused tensors for the (token, k) slots routed to frozen experts, once on the small tensors for
  the slots routed to selected experts (`_split_forward`). Nothing copies a fused tensor, the fused tensors get no
  gradient, and the expert work is the base model's (each slot is computed once).
- unusual layouts (`models.expert_tensors`: flat 2D [E*I, H] weights, parameters nested in a submodule such as
  DBRX's `mlp.w1`, experts forwards with another signature such as Llama4's dense one): the implementation on an
  overlay whose fused weight is `index_put(frozen, selected_ids, small)`. Correct for every family, but it makes a
  full-size copy of those tensors per forward; the lean paths above cover the usual [E, ...] layouts.

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
from torch.optim.optimizer import register_optimizer_step_post_hook

from esft_core.errors import EsftError, brief
from esft_core.experts.expert_config import ExpertConfig  # noqa: F401  (re-exported: the type lived here)
from esft_core.models.loading import MoeLayout, decoder_layers, expert_tensors, moe_layout

SHARED_EXPERT_ATTRS = ("shared_experts", "shared_expert", "shared_expert_gate", "shared_mlp")


def check_config(cfg: ExpertConfig, model: nn.Module, layout: MoeLayout | None = None) -> MoeLayout:
    """Raise one EsftError naming every layer key / expert id of `cfg` that does not fit `model`."""
    layout = layout or moe_layout(model)
    n_layers = len(decoder_layers(model))
    problems = []
    missing = [k for k in cfg.experts if not 0 <= k < n_layers]
    if missing:
        problems.append(f"layer(s) {brief(missing)} do not exist (model has {n_layers} decoder layers)")
    dense = [k for k in cfg.experts if 0 <= k < n_layers and k not in layout.routers]
    if dense:
        problems.append(f"layer(s) {brief(dense)} are not MoE layers (MoE layers: {brief(layout.layers)})")
    for k, ids in cfg.experts.items():
        bad = [i for i in ids if not 0 <= i < layout.num_experts]
        if bad and k in layout.routers:
            ids_s = brief(bad)
            problems.append(f"layer {k}: expert id(s) {ids_s} out of range 0..{layout.num_experts - 1}")
    if problems:
        raise EsftError("expert config does not fit the model: " + "; ".join(problems[:4])
                        + (f"; and {len(problems) - 4} more problems" if len(problems) > 4 else ""))
    return layout


def random_config(like: ExpertConfig, num_experts: int, seed: int) -> ExpertConfig:
    """As many experts per layer as `like`, chosen uniformly at random (the paper's ablation), seeded."""
    rng = random.Random(seed)
    experts = {k: sorted(rng.sample(range(num_experts), len(v))) for k, v in like.experts.items()}
    return ExpertConfig(experts, like.shared_experts, like.non_expert_modules)


def fused_expert_params(experts: nn.Module) -> dict[str, int]:
    """The fused parameters of an experts module and their expert axis: every parameter with a leading dimension of
    `num_experts` (gate_up_proj [E, 2I, H], down_proj [E, H, I], biases [E, ...]).

    This is the one place that knows attribute names; layouts with another expert axis pass their own mapping to
    `SelectedExperts(..., params={name: axis})`.
    """
    n = experts.num_experts
    return {name: 0 for name, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == n}


class SelectedExperts(nn.Module):
    """Trainable copies of the selected experts of one layer's fused expert parameters.

    `params` maps each fused parameter name to its expert axis (default `fused_expert_params`); the copy of parameter
    `name` has `n_sel` entries along that axis, e.g. `gate_up_proj` (n_sel, 2I, H), `down_proj` (n_sel, H, I).
    `tensors` (models.expert_tensors of the layer) instead describes any layout the structure discovery found:
    dotted names of nested parameters ('mlp.w1', stored here as 'mlp__w1') and flat 2D weights with `rows` rows per
    expert along axis 0 (copied as (n_sel, rows, ...)). `master_dtype` (e.g. float32 on a bfloat16 model) keeps the
    copies — and so the optimizer state — in higher precision; the forward casts them to the fused tensors' dtype
    (a copy of n_sel rows only).
    """

    def __init__(self, experts: nn.Module, ids: list[int], params: dict[str, int] | None = None,
                 master_dtype: torch.dtype | None = None, tensors=None):
        super().__init__()
        if tensors is not None:  # name -> expert axis 0 of its (E, ...) view; `views` turns the fused tensor into it
            self.num_experts = int(tensors[0].num_experts)
            self.axes = {t.name: 0 for t in tensors}
            self.views = {t.name: t.expert_view for t in tensors if t.rows != 1}
        else:
            self.num_experts = int(experts.num_experts)
            self.axes = dict(params if params is not None else fused_expert_params(experts))
            self.views = {}
        self.ids = list(ids)
        self.slot = {e: s for s, e in enumerate(self.ids)}  # expert id -> row of the small tensors
        self.names = list(self.axes)  # relative to the experts module ('gate_up_proj', 'mlp.w1', ...)
        self.attr = {n: n.replace(".", "__") for n in self.names}
        device = next(iter(experts.parameters())).device
        if device.type == "meta":  # a model built without weights (sharded loading): real index buffers, on the CPU
            device = torch.device("cpu")
        self.register_buffer("expert_ids", torch.tensor(self.ids, dtype=torch.long, device=device), persistent=False)
        slot_of = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=device)  # last: EP sentinel
        slot_of[self.expert_ids] = torch.arange(len(self.ids), device=device)
        self.register_buffer("slot_of", slot_of, persistent=False)  # (E+1,) expert id -> slot, -1 if frozen
        for n, axis in self.axes.items():
            fused = self._expert_view(experts, n).detach()  # (E, ...) along `axis`
            small = fused.index_select(axis, self.expert_ids)  # a new (n_sel, ...) tensor along `axis`
            setattr(self, self.attr[n], nn.Parameter(small.to(master_dtype or small.dtype)))
        # the lean paths need plain [E, ...] parameters of the experts module and the (hidden, index, weights) forward
        self.lean = (not self.views and all("." not in n for n in self.names)
                     and getattr(experts, "num_experts", None) == self.num_experts)
        # Our zero-copy eager loop covers the standard layout; anything else goes through the split path.
        self.simple_layout = (
            self.lean
            and set(self.names) == {"gate_up_proj", "down_proj"}
            and all(a == 0 for a in self.axes.values())
            and getattr(experts, "has_gate", True)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "is_transposed", False)
            and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "has_post_expert_norm", False)
            and hasattr(experts, "act_fn") and getattr(experts, "num_experts", None) == self.num_experts
        )

    def _expert_view(self, experts: nn.Module, name: str, t: torch.Tensor | None = None) -> torch.Tensor:
        """The fused parameter `name` (or a same-shaped tensor `t`) with its expert axis exposed (a view)."""
        fused = experts.get_parameter(name) if t is None else t
        return self.views[name](fused) if name in self.views else fused

    def small(self, name: str) -> nn.Parameter:
        """The trainable copy of fused parameter `name`."""
        return getattr(self, self.attr[name])

    def effective(self, experts: nn.Module, name: str) -> torch.Tensor:
        """The full fused tensor with the selected rows taken from the trainable copy (differentiable in the copy
        only). The fallback for unusual layouts: it costs a full-size copy per call."""
        fused = experts.get_parameter(name).detach()
        view = self._expert_view(experts, name, fused)  # (E, ...) along axis 0
        return torch.index_put(view, (self.expert_ids,), self.compute_weight(experts, name)).view(fused.shape)

    def compute_weight(self, experts: nn.Module, name: str) -> torch.Tensor:
        """The trainable copy in the fused tensor's (compute) dtype; differentiable, n_sel rows only.

        With fp32 masters the low-precision copy is cached and re-made only when the master changed, so forwards
        between steps (gradient accumulation, activation recomputation, evaluation) do not re-cast; gradients flow to
        the master through `_CastGrad`. "Changed" = its in-place version counter moved (copy_, load_state_dict, the
        foreach/for-loop optimizers) or any optimizer stepped: the fused AdamW kernel writes the master without
        bumping the version counter, so the version alone left training in bf16 on a stale copy that never learned."""
        p = self.small(name)
        dtype = experts.get_parameter(name).dtype
        if p.dtype == dtype:
            return p
        key = (p._version, _OPTIMIZER_STEPS[0], p.data_ptr(), dtype)
        cached = self.__dict__.setdefault("_cast_cache", {}).get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, p.detach().to(dtype))
            self._cast_cache[name] = cached
        return _CastGrad.apply(p, cached[1]) if torch.is_grad_enabled() and p.requires_grad else cached[1]


# optimizer steps taken in this process, by any optimizer (a global post-step hook): part of the cast-cache key
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class _CastGrad(torch.autograd.Function):
    """Forward: the cached low-precision copy of `master`; backward: the gradient cast to the master's dtype."""

    @staticmethod
    def forward(ctx, master, cast):
        ctx.master_dtype = master.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.master_dtype), None


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


def _wraps_dispatch(cls) -> bool:
    """True when the class's own forward is undecorated but calls a decorated parent's (Ergo, transformers 5.25:
    `ErgoExperts.forward` repeats each token per route, calls the dispatched projections, then applies a per-expert
    RMSNorm). Replacing such a forward by the registered implementation would skip the class's own work, so it is
    called whole, on the overlaid weights."""
    return not hasattr(cls.forward, "__wrapped__") and any(
        hasattr(getattr(b, "forward", None), "__wrapped__") for b in cls.__mro__[1:])


def _eager_selected(self, sel: SelectedExperts, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop, reading selected experts' weights from `sel` (same ops, same order)."""
    final = torch.zeros_like(hidden_states)  # (T, H)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, K, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in hit.tolist():  # one device sync for the whole loop
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert_idx])
        slot = sel.slot.get(expert_idx)
        if slot is None:
            gate_up, down = self.gate_up_proj[expert_idx], self.down_proj[expert_idx]  # frozen views (2I, H), (H, I)
        else:  # trainable (2I, H), (H, I), in the compute dtype
            gate_up = sel.compute_weight(self, "gate_up_proj")[slot]
            down = sel.compute_weight(self, "down_proj")[slot]
        gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)  # (t, I) each
        h = F.linear(self.act_fn(gate) * up, down)  # (t, H)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def _split_forward(self, sel: SelectedExperts, fn, hidden_states, top_k_index, top_k_weights):
    """Any experts implementation, called twice: frozen experts on the fused tensors (no weight gradient), selected
    experts on the small trainable tensors (weight gradient of n_sel rows only). No full-size copy or gradient.

    Each (token, k) slot is passed as its own token with top-1 routing and weight 1, so both calls return the
    unweighted per-slot expert outputs exactly as the single base call computes them; the slots are then weighted and
    summed over k as grouped_mm / batched_mm do (reshape + sum), so logits equal the base model's bit for bit.
    """
    T, K = top_k_index.shape
    H = hidden_states.size(-1)
    flat = top_k_index.reshape(-1)  # (S,) S = T*K
    slot = sel.slot_of[flat.clamp(0, sel.num_experts)]  # (S,) slot of a selected expert, -1 for a frozen one
    is_sel = slot >= 0
    pos_s = is_sel.nonzero().squeeze(1)  # (S_s,) slots routed to selected experts
    pos_f = (~is_sel).nonzero().squeeze(1)  # (S_f,) slots routed to frozen experts
    ones = torch.ones((T * K, 1), dtype=top_k_weights.dtype, device=top_k_weights.device)
    parts, order = [], []
    if pos_f.numel():
        parts.append(fn(self, hidden_states[pos_f // K], flat[pos_f, None], ones[: pos_f.numel()]))  # (S_f, H)
        order.append(pos_f)
    if pos_s.numel():
        small = _Overlay(self, {**{n: sel.compute_weight(self, n) for n in sel.names},
                                "num_experts": len(sel.ids)})
        parts.append(fn(small, hidden_states[pos_s // K], slot[pos_s, None], ones[: pos_s.numel()]))  # (S_s, H)
        order.append(pos_s)
    cat = torch.cat(parts) if len(parts) > 1 else parts[0]  # (S, H) in [frozen; selected] order
    pos = torch.cat(order) if len(order) > 1 else order[0]
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(pos.numel(), device=pos.device)
    per_slot = cat[inv]  # (S, H) back in (token, k) order
    weighted = per_slot * top_k_weights.reshape(-1, 1)  # (S, H)
    return weighted.view(T, K, H).sum(dim=1).to(hidden_states.dtype)  # (T, H)


_GROUPED_NAMES = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}


def _grouped_split(self, sel: SelectedExperts, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward with two weight sources, in one pass: the (token, k) slots are sorted
    frozen experts first, then selected experts; one hidden-state gather, then per projection one grouped_mm on the
    frozen fused tensor and one on the small trainable tensor, one weighting, one un-permute, one sum over k — the
    base forward's work and memory, with weight gradients for the selected rows only. Same per-row arithmetic as the
    base call, so logits are bit-identical before training."""
    from transformers.integrations.moe import _grouped_linear

    T, K = top_k_index.shape
    H = hidden_states.size(-1)
    E, n_sel = self.num_experts, len(sel.ids)
    ids = top_k_index.reshape(-1)  # (S,)
    slot = sel.slot_of[ids]  # (S,) -1: frozen expert
    key = torch.where(slot >= 0, E + slot, ids)  # frozen experts 0..E-1, then selected E..E+n_sel-1
    key_g, perm = torch.sort(key)
    x = hidden_states[perm // K]  # (S, H) grouped
    w_g = top_k_weights.reshape(-1)[perm]  # (S,)
    hist = key_g.float() if key_g.device.type in ("cpu", "mps") else key_g.int()
    counts = torch.histc(hist, bins=E + n_sel, min=0, max=E + n_sel - 1)  # (E + n_sel,)
    n_f = int(counts[:E].sum())  # one host sync, like grouped_mm's own fallback
    gated = getattr(self, "has_gate", True)
    up_name = "gate_up_proj" if gated else "up_proj"

    def mlp(rows, offs, weight, expert_ids):
        bias = lambda n: weight(n + "_bias")[expert_ids] if getattr(self, "has_bias", False) else None  # noqa: E731
        h = _grouped_linear(rows, weight(up_name), offs, bias=bias(up_name), is_transposed=self.is_transposed)
        h = self._apply_gate(h) if gated else self.act_fn(h)
        h = _grouped_linear(h, weight("down_proj"), offs, bias=bias("down_proj"), is_transposed=self.is_transposed)
        return self.post_expert_norm(h) if getattr(self, "has_post_expert_norm", False) else h

    parts = []
    if n_f:
        offs = torch.cumsum(counts[:E], dim=0, dtype=torch.int32)
        parts.append(mlp(x[:n_f], offs, lambda n: getattr(self, n), key_g[:n_f]))  # frozen: no weight grad
    if n_f < x.size(0):
        offs = torch.cumsum(counts[E:], dim=0, dtype=torch.int32)
        parts.append(mlp(x[n_f:], offs, lambda n: sel.compute_weight(self, n), key_g[n_f:] - E))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # (S, H) grouped order
    weighted = out * w_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inv].view(T, K, H).sum(dim=1).to(hidden_states.dtype)  # (T, H)


def _overlay_forward(self, sel: SelectedExperts, fn, *args, in_place: bool = False, **kwargs):
    """Unusual layouts: the implementation on the fused tensors with the selected rows overlaid (full-size copy).
    `in_place`: swap the tensors into the module itself (a forward that calls `super()` needs the real module)."""
    if all("." not in n for n in sel.names) and not in_place:
        return fn(_Overlay(self, {n: sel.effective(self, n) for n in sel.names}), *args, **kwargs)
    # nested expert parameters (DBRX's mlp.w1): swap them in for the call (no copy of the module)
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(self, {n: sel.effective(self, n) for n in sel.names}):
        return fn(self, *args, **kwargs)


def _esft_experts_forward(self, *args, **kwargs):
    sel: SelectedExperts = self.esft
    impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
    if _wraps_dispatch(type(self)):  # the class's forward does work around the dispatch: keep all of it
        return _overlay_forward(self, sel, type(self).forward, *args, in_place=True, **kwargs)
    if not sel.lean or len(args) != 3 or kwargs:  # flat/nested weights, other forward signatures (Llama4's dense)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, _original_forward(type(self)))
        return _overlay_forward(self, sel, fn, *args, **kwargs)
    hidden_states, top_k_index, top_k_weights = args  # (T, H), (T, K), (T, K)
    if impl == "eager" and sel.simple_layout:
        out = _eager_selected(self, sel, hidden_states, top_k_index, top_k_weights)
    elif (impl == "grouped_mm" and set(sel.names) <= _GROUPED_NAMES and not any(sel.axes.values())
          and getattr(self, "num_experts", None) == sel.num_experts
          and not getattr(self, "_is_expert_parallel", False)):
        out = _grouped_split(self, sel, hidden_states, top_k_index, top_k_weights)
    else:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, _original_forward(type(self)))
        out = _split_forward(self, sel, fn, hidden_states, top_k_index, top_k_weights)
    if (torch.is_grad_enabled() and any(p.requires_grad for p in sel.parameters())
            and not bool((sel.slot_of[top_k_index.clamp(0, sel.num_experts)] >= 0).any())):
        # No token of this batch reached a selected expert: give them a zero gradient anyway, so every data-parallel
        # rank reduces the same tensors (FSDP2 skips params without .grad) and AdamW treats them alike on any world
        # size. (Only then: a second, zero gradient would briefly double the gradient memory.)
        out = out + sum(p.reshape(-1)[:1].sum() for p in sel.parameters()) * 0  # + 0.0: values unchanged
    return out


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, "_esft_applied", False) or any(isinstance(m, SelectedExperts) for m in model.modules())


def shared_expert_modules(block: nn.Module) -> list[nn.Module]:
    return [m for a in SHARED_EXPERT_ATTRS if isinstance(m := getattr(block, a, None), nn.Module)]


def apply_esft(model: nn.Module, cfg: ExpertConfig, master_dtype: torch.dtype | None = None,
               expert_params=None, extra_masters: bool = True) -> dict[int, SelectedExperts]:
    """Freeze `model` per `cfg` and give each selected layer its trainable `SelectedExperts`. Returns them by layer.

    `master_dtype`: dtype of the trainable copies (None = the model's; float32 on a bfloat16 model keeps fp32 master
    weights and optimizer state for the trained tensors only). `expert_params(layer, experts) -> {name: axis}`
    overrides which fused parameters are copied (default `fused_expert_params`). `extra_masters`: give the other
    trained tensors (shared experts, non-expert modules) `master_dtype` masters too, through a cast parametrization
    (`_cast_masters`); False under FSDP, whose mixed-precision policy does the cast itself.

    Trainable afterwards: the selected routed experts; plus shared experts if `cfg.shared_experts`; plus every
    parameter outside the experts (attention, norms, routers, dense MLPs, embeddings, head) if
    `cfg.non_expert_modules` — the authors' meaning: their `to_esft` makes every parameter trainable, then freezes
    the routed experts not selected and, unless `shared_experts`, the shared experts; routers are not re-frozen.
    The fused routed-expert parameters are always frozen.
    """
    if is_wrapped(model):
        raise EsftError("model already has selected experts attached; load a fresh base model")
    layout = check_config(cfg, model)
    if cfg.shared_experts and not any(shared_expert_modules(b) for b in layout.blocks.values()):
        raise EsftError(f"{type(model).__name__} has no shared experts (no MoE layer has a "
                        f"{' / '.join(SHARED_EXPERT_ATTRS)} module) to train; drop the shared-experts option")
    model._esft_applied = True  # noqa: SLF001 - marks the model (also when no routed expert is selected)
    for p in model.parameters():
        p.requires_grad_(cfg.non_expert_modules)
    selected = {}
    for layer in layout.layers:
        experts = layout.experts[layer]
        for p in experts.parameters():  # nested expert weights (DBRX's mlp.w1) too
            p.requires_grad_(False)
        for m in shared_expert_modules(layout.blocks[layer]):
            m.requires_grad_(cfg.shared_experts)
        ids = cfg.experts.get(layer, [])
        if ids:
            if expert_params:
                experts.esft = SelectedExperts(experts, ids, params=expert_params(layer, experts),
                                               master_dtype=master_dtype)
            else:
                experts.esft = SelectedExperts(experts, ids, master_dtype=master_dtype,
                                               tensors=expert_tensors(layout, layer))
            experts.forward = types.MethodType(_esft_experts_forward, experts)
            selected[layer] = experts.esft
    if master_dtype is not None and extra_masters:
        _cast_masters(model, master_dtype)
    return selected


class _CastTo(nn.Module):
    """Parametrization: the master tensor (e.g. float32) seen by the module in its compute dtype (e.g. bfloat16)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        return master.to(self.dtype)  # differentiable: the gradient reaches the master in its own dtype


def _cast_masters(model: nn.Module, master_dtype: torch.dtype) -> None:
    """Trained tensors outside `SelectedExperts` (shared experts, non-expert modules) of another dtype get a
    `master_dtype` master: the parameter itself becomes the master (`<module>.parametrizations.<name>.original`),
    and the module reads it cast to the model dtype, so AdamW state is `master_dtype` for them as for the selected
    experts. A tensor tied between modules (embeddings = head) keeps one master shared by all its owners."""
    from torch.nn.utils import parametrize

    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, SelectedExperts) or parametrize.is_parametrized(m):
            continue
        for n, p in m._parameters.items():  # noqa: SLF001 - direct parameters only (owners of tied tensors)
            if p is not None and p.requires_grad and p.is_floating_point() and p.dtype != master_dtype:
                owners.setdefault(id(p), []).append((m, n))
                params[id(p)] = p
    for key, p in params.items():
        dtype = p.dtype
        p.data = p.data.to(master_dtype)
        for m, n in owners[key]:
            parametrize.register_parametrization(m, n, _CastTo(dtype), unsafe=True)


def plain_name(name: str) -> str:
    """The ordinary parameter name of a cast master ('a.parametrizations.weight.original' -> 'a.weight')."""
    if ".parametrizations." in name and name.endswith(".original"):
        head, _, rest = name.partition(".parametrizations.")
        return f"{head}.{rest[: -len('.original')]}"
    return name


def merge_selected(model: nn.Module) -> nn.Module:
    """Write the trained rows back into the fused tensors and remove the wrappers: a plain transformers model."""
    for m in list(model.modules()):
        sel = getattr(m, "esft", None)
        if isinstance(sel, SelectedExperts):
            with torch.no_grad():
                for n, axis in sel.axes.items():
                    fused = sel._expert_view(m, n)  # (E, ...) view of the fused parameter
                    fused.index_copy_(axis, sel.expert_ids, sel.small(n).detach().to(fused.dtype))
            del m.esft
            m.__dict__.pop("forward", None)
    from torch.nn.utils import parametrize

    for m in list(model.modules()):  # cast masters: keep the model-dtype value as an ordinary parameter
        if parametrize.is_parametrized(m) and all(isinstance(f[0], _CastTo) for f in m.parametrizations.values()):
            for n in list(m.parametrizations):
                value = getattr(m, n).detach()  # the master cast to the model dtype
                parametrize.remove_parametrizations(m, n, leave_parametrized=False)  # the master (tie kept)
                getattr(m, n).data = value  # (set_ cannot change a dtype, so leave_parametrized=True cannot)
    model.__dict__.pop("_esft_applied", None)
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
