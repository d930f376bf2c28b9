"""Distributed training on FSDP2 (`torch.distributed.fsdp.fully_shard`) and sharded checkpoints (DCP).

Under `torchrun --nproc-per-node N` the model is built on meta, the method applied and `shard_model` shards each
decoder layer and then the root (parameters, gradients and AdamW state live 1/N per rank; frozen experts are sharded
too and never get a gradient) before each rank reads its own slices (esft_core.models.sharded; `--load whole` loads
everything on every rank first), with a MixedPrecisionPolicy: parameters all-gathered in the compute dtype (bfloat16
on a bf16 model), gradients reduce-scattered in float32; modules of another dtype (fp32 routers, ESFT's fp32
masters) are groups of their own. NCCL on CUDA, gloo on the CPU; nothing else differs.

Checkpoints go through `torch.distributed.checkpoint` (DCP): each rank writes its own shards of the trainable
parameters and of the optimizer state (no full optimizer file on rank 0), and `--resume` reads them back into the
sharded model, on any number of ranks (DCP reshards). The final adapter is gathered once (`gather_trainable`: one
parameter at a time, CPU copies on rank 0) and written by rank 0. Expert parallelism: esft_core.tuning.expert_parallel.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from esft_core.errors import EsftError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, this rank's device); initialises NCCL (CUDA) or gloo (CPU) when launched by torchrun."""
    world = world_size()
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def is_sharded() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def collective_errors(what: str):
    """A collective that fails because another rank is gone (killed, out of memory, its own error) becomes one line:
    gloo says 'Connection closed by peer', NCCL a DistBackendError; nothing has been written at this point."""
    try:
        yield
    except EsftError:
        raise
    except RuntimeError as e:  # DistBackendError is a RuntimeError
        if not is_sharded():
            raise
        import torch.distributed as dist

        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EsftError(f"rank {dist.get_rank()} of {dist.get_world_size()}: another rank stopped while {what} "
                        f"({msg}); nothing was written") from None


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, also under a peft wrapper (`base_model.model.model.layers`)."""
    found = [m for n, m in model.named_modules() if n.endswith("model.layers") and isinstance(m, nn.ModuleList)]
    if not found:
        raise EsftError(f"{type(model).__name__}: no decoder layers (…model.layers) to shard")
    return found[0]


def shard_model(model: nn.Module, device: torch.device, compute_dtype: torch.dtype,
                ignored: set | None = None) -> nn.Module:
    """fully_shard every decoder layer, then the root, with bf16/fp32 mixed precision as described above.
    `ignored`: parameters FSDP2 leaves alone (expert parallelism's local experts)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    ignored = ignored or set()
    for layer in decoder_layer_list(model):
        _shard_other_dtypes(layer, mesh, mp, ignored)
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    _shard_other_dtypes(model, mesh, mp, ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    return model


def _shard_other_dtypes(scope: nn.Module, mesh, mp, ignored: set) -> None:
    """FSDP2 wants one dtype per parameter group: modules of `scope` whose own parameters differ from the dominant
    dtype become groups of their own, sharded before `scope`.

    - a router transformers keeps in float32 in a bf16 model (`_keep_in_fp32_modules_strict`): all-gathered in
      float32 (no cast), so it computes as in one process;
    - ESFT's float32 masters of the selected experts (`experts.esft`, a SelectedExperts) among bf16 frozen weights:
      all-gathered in the compute dtype; the experts' forward reads them through `compute_weight`, registered as an
      FSDP forward method, and they stay unsharded until the backward is done (n_sel rows of one layer)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from esft_core.experts.esft import SelectedExperts

    counts: dict[torch.dtype, int] = {}
    for p in scope.parameters():
        if not hasattr(p, "device_mesh") and p not in ignored:  # not in a group yet
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) < 2:
        return
    main = max(counts, key=counts.get)
    for m in list(scope.modules()):
        own = [p for p in m.parameters(recurse=isinstance(m, SelectedExperts))
               if not hasattr(p, "device_mesh") and p not in ignored]
        if m is scope or not own or all(p.dtype == main for p in own):
            continue
        if isinstance(m, SelectedExperts):
            fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
            register_fsdp_forward_method(m, "compute_weight")
        else:
            fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))


def fill_selected(model: nn.Module) -> None:
    """Fill every ESFT copy (`experts.esft`, built on meta) from the sharded fused tensors it copies (collective).

    Per layer and projection: each rank writes the rows of the selected experts it holds into an (n_sel * rows, ...)
    float32 buffer of zeros (rows = 1 for [E, ...] tensors, I for flat [E*I, H] ones), one all_reduce sums them (every
    row comes from exactly one rank, so the sum is exact), and each rank keeps its own rows of the copy. Memory: the
    selected rows of one tensor, never a whole fused tensor."""
    import torch.distributed as dist

    from esft_core.experts.esft import SelectedExperts
    from esft_core.models.sharded import row_range

    for experts in model.modules():
        sel = getattr(experts, "esft", None)
        if not isinstance(sel, SelectedExperts) or hasattr(experts, "_esft_ep"):  # EP copies: filled locally
            continue
        for name in sel.names:
            fused, small = experts.get_parameter(name), sel.small(name)
            rows = fused.shape[0] // sel.num_experts if name in sel.views else 1
            lo, hi = row_range(fused)
            held = local(fused.detach())  # (hi - lo, ...) this rank's rows of the fused tensor
            buf = torch.zeros((len(sel.ids) * rows, *fused.shape[1:]), dtype=torch.float32, device=held.device)
            for s, e in enumerate(sel.ids):
                a, b = max(e * rows, lo), min((e + 1) * rows, hi)
                if a < b:
                    buf[s * rows + a - e * rows: s * rows + b - e * rows] = held[a - lo: b - lo]
            if is_sharded():
                dist.all_reduce(buf)
            buf = buf.view(small.shape)  # (n_sel, ...) or (n_sel, rows, ...)
            slo, shi = row_range(small)
            with torch.no_grad():
                local(small.detach()).copy_(buf[slo:shi])


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter only on the last micro-batch of a step (gradient accumulation without extra traffic)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter."""
    return t.to_local() if hasattr(t, "to_local") else t


def gather_trainable(named: dict[str, torch.Tensor], rank: int,
                     dtype_of: Callable[[str], torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable tensors on rank 0 (every rank must call; one parameter in flight at a time).

    `dtype_of(name)` gives each floating tensor's saved dtype: the cast happens as each one arrives, so rank 0
    holds the gathered tensors in the save dtype only (an FFT of a bf16 model trained with fp32 masters: 2 bytes a
    parameter, not 4 plus 2)."""
    out = {}
    for name, p in named.items():
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if rank == 0:
            t = full.cpu()
            if dtype_of is not None and t.is_floating_point():
                t = t.to(dtype_of(name))
            shared = t is full and not hasattr(p, "full_tensor")  # still the live parameter: copy it
            out[name] = t.clone() if shared else t.contiguous()
        del full
    return out


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes the intent is to save in a single process' without a process group: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, names: set[str], path) -> None:
    """DCP save of the trainable parameters and the optimizer state, sharded by rank (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_sd = {n: p for n, p in model.named_parameters() if n in names}
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path))


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, names: set[str], path) -> None:
    """DCP load into the (sharded) model and optimizer, in place (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model_sd = {n: p.detach() for n, p in model.named_parameters() if n in names}
    state = {"model": model_sd, "optim": get_optimizer_state_dict(model, opt)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in state["model"].items():
            if t.data_ptr() != params[n].data_ptr():
                params[n].copy_(t)
    set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(strict=False))


def frozen_checksum(model: nn.Module) -> torch.Tensor:
    """(2 * n_frozen,) float64 on the CPU: sum and sum of squares of every frozen parameter's local shard.

    Computed on the device without copying weights; any change to a frozen element changes it (used to assert at the
    end of a run that frozen experts and other frozen weights are untouched, `run.json: frozen_unchanged`)."""
    sums = []
    for p in model.parameters():
        if p.requires_grad:
            continue
        acc = torch.zeros(2, dtype=torch.float64, device=p.device)
        for chunk in local(p.detach()).reshape(-1).split(1 << 22):  # fp64 temporaries of 32 MiB at most
            c = chunk.double()
            acc += torch.stack([c.sum(), (c * c).sum()])
        sums.append(acc)
    return torch.cat(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)
