"""Expert parallelism (EP) for ESFT under torchrun (`esft train --expert-parallel`): whole experts live on ranks and
tokens travel to them, instead of every frozen expert being all-gathered by FSDP2 in every forward.

Layout: the routed experts of each MoE layer are split over all ranks in contiguous blocks (rank r holds experts
[r * E/N, (r + 1) * E/N), whole, as plain local tensors); everything else (attention, norms, routers, shared experts,
dense layers, embeddings) is sharded by FSDP2 as without EP. The mesh is 2-D, ("ep", "tp") = (N, 1): the "ep"
dimension places the experts, the trivial "tp" one is what transformers' dispatcher expects for ranks that hold
disjoint batches. The selected experts' trainable copies (`SelectedExperts`, built with this rank's local ids only)
live where their experts live: their gradients and AdamW state exist on that rank only (FSDP2 ignores them).

Tokens: each experts module's forward becomes transformers' `AllToAllEP` (transformers/distributed/expert_parallel.py):
every (token, k) slot goes to its expert's rank with one `all_to_all_single` (autograd-aware), the rank runs its
experts — the ESFT forward with frozen and trainable rows, on local expert ids, unit weights — and a second all-to-all
brings the outputs back, where the routing weights are applied. gloo serves all_to_all_single on the CPU (uneven
splits, backward included), so this is tested on CPU ranks.

Loading is sharded as without EP (esft_core.models.sharded): while the weights are read, the local expert blocks are
DTensors `Shard(0)` over the "ep" dimension with the global shape, so transformers' loader reads each rank's experts
only (per-expert checkpoints: the other experts are never read); afterwards they become plain local tensors.

Gradient scale: a selected expert's gradient sums the contributions of the tokens every rank sent it, each rank's
loss being the mean over its own batch, so it is divided by N to equal the data-parallel mean that FSDP2 applies to
its own gradients. The global gradient norm (clipping) adds the FSDP part and the all-reduced EP part.

Not supported with EP (one line each): methods other than esft / random, experts layouts other than one fused
[E, ...] tensor per projection with the (hidden, top_k_index, top_k_weights) forward, a world size that does not
divide every layer's expert count, and sharded checkpoints (`--save-every` / `--resume`: the selected copies differ
per rank and are not DTensors, so DCP cannot save them yet).
"""

from __future__ import annotations

import torch
from torch import nn

from esft_core.errors import EsftError, brief


def check(layout, world: int, method) -> None:
    """Raise one EsftError when this model / world size / method cannot run expert-parallel."""
    if not method.esft_adapter or not method.needs_experts:
        raise EsftError(f"--expert-parallel trains selected experts (--method esft or random), not --method "
                        f"{method.name}")
    if world < 2:
        raise EsftError("--expert-parallel needs torchrun with at least 2 ranks (it places experts on ranks)")
    bad = sorted(lay for lay in layout.layers if layout.layer_experts[lay] % world)
    if bad:
        counts = sorted({layout.layer_experts[lay] for lay in bad})
        raise EsftError(f"--expert-parallel: {'/'.join(map(str, counts))} experts per layer do not divide over "
                        f"{world} ranks (layer(s) {brief(bad)}); use a world size that divides the expert count")
    for lay in layout.layers:
        ex, n = layout.experts[lay], layout.layer_experts[lay]
        fused = [p for p in ex.parameters(recurse=False) if p.dim() >= 2]
        nested = [q for c in ex.children() for q in c.parameters() if q.dim() >= 2]
        if (layout.routing[lay] != "experts_input" or getattr(ex, "num_experts", None) != n or not fused
                or any(p.shape[0] != n for p in fused) or nested):
            raise EsftError(f"--expert-parallel: layer {lay}'s experts ({type(ex).__name__}) are not one fused "
                            f"[E, ...] tensor per projection with a (hidden, top_k_index, top_k_weights) forward")


def localize(layout, rank: int, world: int) -> dict[int, tuple[int, int, int]]:
    """On the meta model: each MoE layer's experts module keeps only this rank's block of experts ([E/N, ...] meta
    parameters, `num_experts` = E/N). Returns {layer: (first expert id, local count, E)}."""
    spans = {}
    for lay in layout.layers:
        ex, n_e = layout.experts[lay], layout.layer_experts[lay]
        n = n_e // world
        for name, p in list(ex.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == n_e:
                setattr(ex, name, nn.Parameter(torch.empty((n, *p.shape[1:]), dtype=p.dtype, device="meta"),
                                               requires_grad=False))
        ex.num_experts = n
        ex._esft_ep = (rank * n, n, n_e)  # noqa: SLF001 - read by the swaps and the gather below
        spans[lay] = ex._esft_ep
    return spans


def local_config(ecfg, spans: dict[int, tuple[int, int, int]]):
    """The expert config in this rank's local expert ids (the selected experts it holds), same flags."""
    from esft_core.experts.expert_config import ExpertConfig

    experts = {lay: [i - spans[lay][0] for i in ids if spans[lay][0] <= i < spans[lay][0] + spans[lay][1]]
               for lay, ids in ecfg.experts.items()}
    return ExpertConfig(experts, ecfg.shared_experts, ecfg.non_expert_modules)


def ep_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "_esft_ep")]


def local_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP2 must leave alone: the local expert blocks and the selected copies of them."""
    out = set()
    for _, ex in ep_modules(model):
        out |= set(ex.parameters())
    return out


def to_global(model: nn.Module, mesh) -> None:
    """Local expert blocks → DTensor `Shard(0)` parameters of the global shape (for the loader and the fingerprint)."""
    from torch.distributed.tensor import DTensor, Shard

    for _, ex in ep_modules(model):
        _, n, n_e = ex._esft_ep  # noqa: SLF001
        for name, p in list(ex.named_parameters(recurse=False)):
            if p.shape[0] == n:
                shape = (n_e, *p.shape[1:])
                stride = torch.empty(shape, device="meta").stride()
                dt = DTensor.from_local(p.detach(), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
                setattr(ex, name, nn.Parameter(dt, requires_grad=False))


def to_local(model: nn.Module) -> None:
    """DTensor expert blocks → plain local parameters (what the experts' forward computes with)."""
    for _, ex in ep_modules(model):
        for name, p in list(ex.named_parameters(recurse=False)):
            if hasattr(p, "to_local"):
                setattr(ex, name, nn.Parameter(p.to_local(), requires_grad=False))


def fill_local(model: nn.Module) -> None:
    """The selected copies from this rank's own expert rows (local ids; no communication)."""
    for _, ex in ep_modules(model):
        sel = getattr(ex, "esft", None)
        if sel is None:
            continue
        for name in sel.names:
            with torch.no_grad():
                sel.small(name).copy_(ex.get_parameter(name).detach().index_select(0, sel.expert_ids))


class _CountingAllToAll:
    """transformers' AllToAllEP, counting the bytes this rank sends (dispatch + combine) per forward."""

    def __init__(self, experts: nn.Module, ep_mesh, tp_mesh, counter: list[int]):
        from transformers.distributed.expert_parallel import AllToAllEP

        self.inner, self.counter = AllToAllEP(experts, ep_mesh, tp_mesh), counter
        dispatch = self.inner._dispatch_tokens  # noqa: SLF001

        def counted(hidden, idx, weights):
            out = dispatch(hidden, idx, weights)
            sent = sum(out[3].send_sizes) - out[3].send_sizes[ep_mesh.get_local_rank()]  # rows that leave the rank
            self.counter[0] += 2 * sent * hidden.shape[-1] * hidden.element_size()  # tokens out, results back
            return out

        self.inner._dispatch_tokens = counted  # noqa: SLF001

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        return self.inner(hidden_states, top_k_index, top_k_weights)


def make_mesh(device: torch.device, world: int):
    """The 2-D ("ep", "tp") = (N, 1) mesh: experts over "ep"; "tp" = 1 tells the dispatcher the batches differ."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world, 1), mesh_dim_names=("ep", "tp"))


def install(model: nn.Module, mesh) -> list[int]:
    """Each local experts module's forward → the all-to-all dispatcher. Returns the byte counter: bytes this rank
    sent to other ranks in forwards so far (a backward moves as many again)."""
    counter = [0]
    # The hidden states must carry autograd on every rank: a rank whose own experts are all frozen (none selected
    # there) still sends tokens to trainable experts elsewhere, and their gradients come back through its backward
    # all-to-all. With frozen layers below, its loss would have no grad_fn (seen at 4 ranks without activation
    # checkpointing: "element 0 of tensors does not require grad"), skipping the collectives the others wait in.
    model.enable_input_require_grads()
    for _, ex in ep_modules(model):
        ex.forward = _CountingAllToAll(ex, mesh["ep"], mesh["tp"], counter)
    return counter


def scale_and_clip(fsdp_params: list, ep_params: list, world: int, max_norm: float) -> torch.Tensor:
    """Divide the EP gradients by N (data-parallel mean), then clip all gradients by their global norm; returns it."""
    import torch.distributed as dist

    for p in ep_params:
        if p.grad is not None:
            p.grad.div_(world)
    fsdp_norm = torch.nn.utils.clip_grad_norm_(fsdp_params, float("inf")) if fsdp_params else torch.zeros(())
    if hasattr(fsdp_norm, "full_tensor"):
        fsdp_norm = fsdp_norm.full_tensor()
    grads = [p.grad for p in ep_params if p.grad is not None]
    dev = grads[0].device if grads else fsdp_norm.device
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=dev)
    dist.all_reduce(sq)  # every rank holds other experts: their squared norms add up
    total = (fsdp_norm.float().to(dev).pow(2) + sq).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in [*fsdp_params, *ep_params]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return total


def gather_selected(model: nn.Module, ecfg, rank: int) -> dict[str, torch.Tensor]:
    """The selected copies of every rank assembled on rank 0 in the global config's order (collective; one layer at
    a time), with each layer's global `expert_ids`: {`<experts>.esft.<name>`: (n_sel, ...)} — the adapter's names."""
    import torch.distributed as dist

    out = {}
    for prefix, ex in ep_modules(model):
        lay = int(next(x for x in prefix.split(".") if x.isdigit()))
        ids = list(ecfg.experts.get(lay, []))
        if not ids:
            continue
        sel = getattr(ex, "esft", None)
        mine = None if sel is None else {
            "ids": [i + ex._esft_ep[0] for i in sel.ids],  # noqa: SLF001
            "attrs": {n: sel.attr[n] for n in sel.names},
            "tensors": {n: sel.small(n).detach().cpu() for n in sel.names}}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        if rank != 0:
            continue
        where = {}
        for part in parts:
            if part is not None:
                for k, g in enumerate(part["ids"]):
                    where[g] = (part, k)
        first = next(p for p in parts if p is not None)
        for n, attr in first["attrs"].items():
            out[f"{prefix}.esft.{attr}"] = torch.stack([where[g][0]["tensors"][n][where[g][1]] for g in ids])
        out[f"{prefix}.esft.expert_ids"] = torch.tensor(ids, dtype=torch.long)
    return out
