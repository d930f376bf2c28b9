"""Sharded loading: build a model without weights, shard it, then give each rank only its own slices of the checkpoint.

Under torchrun the whole-model load (`loading.load_model` on every rank, then `fully_shard`) makes every rank hold the
entire checkpoint for a moment, so the largest trainable model is one that fits whole on one device. Here instead:

1. `empty_model` builds the model from its config with every parameter on the meta device (no memory) and real
   buffers (rotary tables and other non-persistent buffers are computed at construction, not read from the
   checkpoint); parameters transformers keeps in float32 (`_keep_in_fp32_modules_strict`, e.g. DeepSeek-V2's router)
   are float32 as in `from_pretrained`.
2. The caller applies its training method (esft / fft ...) and `fully_shard`s the model, still on meta: every
   parameter becomes a DTensor placeholder `Shard(0)` over the ranks.
3. `materialize` allocates each rank's local shards (`to_empty`), puts the buffers back, and reads the checkpoint
   through transformers' own loader (`convert_and_load_state_dict_in_model`): it opens the safetensors files lazily
   (`get_slice`), applies the family's checkpoint conversion (per-expert `experts.{e}.gate_proj.weight` tensors of
   v4-era and transformers-saved checkpoints are merged into the fused `experts.gate_up_proj`; already-fused
   checkpoints pass through) and, because the targets are DTensors, reads only this rank's rows
   (`DtensorShardOperation`: a per-expert tensor of an expert another rank owns is never read). Peak memory per rank:
   its shards plus the tensors of one conversion group (one layer's experts of one projection at most).

Why not `set_model_state_dict(..., broadcast_from_rank0=True)`: rank 0 would have to read (and convert) every full
tensor and broadcast it, so rank 0 holds a full layer per step and every byte crosses the network once per rank;
per-rank slice reads hold less (only the own rows) and move nothing between ranks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from esft_core.errors import EsftError
from esft_core.models.paths import resolve_model_path


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of a checkpoint directory; raises EsftError when the index names a missing file."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise EsftError(f"{index} is not a safetensors index (no weight_map)") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise EsftError(f"checkpoint {d} is missing {len(missing)} of {len(names)} shard files "
                            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); copy them back")
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise EsftError(f"checkpoint {d} holds no .safetensors files; sharded loading reads safetensors only")
    return files


def local_checkpoint(name_or_path: str | None) -> str:
    """A local directory for `name_or_path` (a hub id is fetched into the hub cache first)."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one line
        raise EsftError(f"cannot load model '{name_or_path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None


def empty_model(name_or_path: str | None, dtype: torch.dtype, experts_implementation: str | None = None):
    """(model with meta parameters and real buffers, tokenizer) of a checkpoint directory or hub id."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from esft_core.models.loading import _causal_lm_class

    path = local_checkpoint(name_or_path)
    checkpoint_files(path)  # a missing shard is named before anything is built
    try:
        cls = _causal_lm_class(path, AutoModelForCausalLM)
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=dtype, **kwargs)
    except EsftError:
        raise
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build: one line
        raise EsftError(f"cannot load model '{name_or_path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    keep = model._get_dtype_plan(dtype)  # noqa: SLF001 - what from_pretrained keeps in float32
    if keep:
        pattern = re.compile("|".join(re.escape(k) for k in keep))
        for n, p in model.named_parameters():
            if pattern.search(n) and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
    model.config._name_or_path = resolve_model_path(name_or_path)  # as from_pretrained records it
    model._esft_checkpoint = path  # noqa: SLF001 - where `materialize` reads from
    model.eval()
    return model, tok


def materialize(model: nn.Module, device: torch.device) -> set[str]:
    """Allocate this rank's shards on `device` and read them from the checkpoint `empty_model` recorded.

    Returns the names of the model's parameters the checkpoint did not fill (the caller's own additions, e.g. the
    ESFT copies); raises EsftError when the checkpoint lacks a base tensor or does not fit the model."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    path = model._esft_checkpoint  # noqa: SLF001
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)  # (local shard shapes) uninitialised memory, filled below
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n].to(b.device))
    pointers, state = [], {}
    try:
        for f in checkpoint_files(path):
            fp = safe_open(str(f), framework="pt", device="cpu")
            pointers.append(fp)
            for k in fp.keys():
                state[k] = fp.get_slice(k)  # lazy: only the rows a rank owns are read
        cfg = LoadStateDictConfig(pretrained_model_name_or_path=path, dtype=base.dtype,
                                  dtype_plan=base._get_dtype_plan(base.dtype),  # noqa: SLF001
                                  weight_mapping=get_model_conversion_mapping(base))
        info, _ = convert_and_load_state_dict_in_model(model=base, state_dict=state, load_config=cfg)
    except EsftError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file, a shape that does not fit: one line
        raise EsftError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        del state
        pointers.clear()
    if getattr(info, "mismatched_keys", None):
        bad = sorted(k if isinstance(k, str) else k[0] for k in info.mismatched_keys)
        raise EsftError(f"{path}: {len(bad)} tensors do not fit the model's shapes (first: {bad[0]})")
    if getattr(info, "conversion_errors", None):
        first = next(iter(info.conversion_errors.items()))
        raise EsftError(f"{path}: cannot convert {first[0]}: {str(first[1]).splitlines()[0]}")
    base.tie_weights()
    from esft_core.procs import release_freed_host_memory

    release_freed_host_memory()  # the conversion's freed staging blocks
    missing = set(info.missing_keys)
    tied = {n for n, _ in base.named_parameters(remove_duplicate=False)} - {n for n, _ in base.named_parameters()}
    return missing - tied


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) of axis 0 this rank holds of a parameter (a DTensor `Shard(0)` or a plain tensor: all)."""
    if not hasattr(p, "device_mesh"):
        return 0, int(p.shape[0])
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])
