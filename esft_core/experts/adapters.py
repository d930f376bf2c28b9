"""ESFT adapters on disk: save / load / merge, base-model fingerprints, and import of the authors' adapters.

An adapter directory holds
- `adapter.safetensors`: only the trained tensors. Selected experts of layer l are stored as
  `model.layers.<l>.mlp.experts.esft.gate_up_proj` (n_sel, 2I, H) and `...esft.down_proj` (n_sel, H, I), with
  their ids in `...esft.expert_ids` (n_sel,) int64; shared-expert / non-expert tensors (when the config trains them:
  `esft train --train-shared / --train-non-expert / --method shared`) keep their ordinary parameter names
  (`model.layers.1.mlp.shared_experts.up_proj.weight`), also when they trained as fp32 masters.
- `expert_cfg.json`: the expert config in the authors' format.
- `base_fingerprint.json`: what base model the adapter belongs to (architecture + a digest of sampled weights), so
  loading onto a different base is refused.

The authors' adapters (DeepSeek-V2, per-expert modules) name tensors `[model.]layers.5.mlp.experts.12.gate_proj.weight`
(I, H), `up_proj.weight` (I, H) and `down_proj.weight` (H, I); `import_official_adapter` stacks them into the fused
layout: gate_up row = cat(gate, up) (2I, H), down row (H, I).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from esft_core.errors import EsftError
from esft_core.experts.esft import SelectedExperts, apply_esft, check_config, is_wrapped, merge_selected, plain_name
from esft_core.experts.expert_config import ExpertConfig

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "expert_cfg.json"
FINGERPRINT_FILE = "base_fingerprint.json"
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_parameters", "digest")
_SAMPLES_PER_TENSOR = 2048


def base_fingerprint(model: nn.Module) -> dict:
    """Architecture facts plus a digest of evenly spaced weight samples of every base parameter.

    Samples are rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or bfloat16 matches.
    Computed on the base weights (before any training step), it costs a few ms even for large models.
    """
    h = hashlib.sha256()
    n_params = 0
    for name, (shape, sample) in _weight_samples(model).items():
        n_params += math.prod(shape)
        h.update(f"{name}:{shape}:".encode())
        h.update(sample.numpy().tobytes())
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_parameters": n_params,
        "digest": h.hexdigest()[:32],
        "name_or_path": str(getattr(cfg, "_name_or_path", "")),
    }


def _weight_samples(model: nn.Module) -> dict[str, tuple[tuple, torch.Tensor]]:
    """name -> (shape, evenly spaced samples of the flattened tensor as float32 of bfloat16 values) per base
    parameter. A sharded (DTensor `Shard(0)`) parameter is sampled where its rows live: every rank reads the samples
    in its own rows and one all_gather_object assembles them (collective: every rank calls it), so the digest equals
    the unsharded model's without gathering any weight."""
    from esft_core.models.sharded import row_range

    out, pending = {}, {}
    for name, p in model.named_parameters():
        if ".esft." in name:
            continue
        numel = p.numel()
        step = max(1, numel // _SAMPLES_PER_TENSOR)
        if not hasattr(p, "to_local"):
            flat = p.detach().reshape(-1)
            out[name] = (tuple(p.shape), flat[::step][:_SAMPLES_PER_TENSOR].to(torch.bfloat16).float().cpu())
            continue
        count = min(_SAMPLES_PER_TENSOR, -(-numel // step))
        pos = torch.arange(count) * step  # (count,) flat positions in the full tensor
        lo, hi = row_range(p)
        row = numel // max(1, p.shape[0])
        mine = (pos >= lo * row) & (pos < hi * row)
        vals = p.to_local().detach().reshape(-1)[(pos[mine] - lo * row).to(p.to_local().device)]
        pending[name] = (tuple(p.shape), count, step, pos[mine] // step, vals.to(torch.bfloat16).float().cpu())
    if pending:
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {n: (idx, vals) for n, (*_, idx, vals) in pending.items()})
        for name, (shape, count, *_) in pending.items():
            sample = torch.empty(count)  # (count,) filled by the ranks that hold each position
            for part in parts:
                idx, vals = part[name]
                sample[idx] = vals
            out[name] = (shape, sample)
    return {n: out[n] for n, _ in model.named_parameters() if n in out}


def check_fingerprint(expected: dict, model: nn.Module, where: str) -> None:
    got = base_fingerprint(model)
    diff = [k for k in FINGERPRINT_KEYS if k in expected and expected[k] != got[k]]
    if diff:
        made_for = expected.get("name_or_path") or expected.get("model_type")
        raise EsftError(
            f"{where} was made for a different base model ({made_for}; differs in {', '.join(diff)}) "
            f"than {got['name_or_path'] or got['model_type']}"
        )


def adapter_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The trained tensors of an ESFT-wrapped model (contiguous CPU copies, in `dtype` if given) plus each layer's
    expert ids. `state`: the trained tensors already gathered (FSDP), used instead of the model's parameters."""
    if state is None:
        state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, t in state.items():  # fp32 masters of shared / non-expert tensors are stored under their plain names
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        out[plain_name(name)] = t.cpu().contiguous().clone()
    for name, m in model.named_modules():
        if isinstance(m, SelectedExperts) and f"{name}.expert_ids" not in out:  # EP: gathered global ids given
            out[f"{name}.expert_ids"] = m.expert_ids.cpu().clone()
    return out


def save_adapter(model: nn.Module, cfg: ExpertConfig, out_dir: str | Path, fingerprint: dict,
                 state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write adapter.safetensors (trained tensors only) + expert_cfg.json + base_fingerprint.json into `out_dir`.

    `dtype`: write the tensors in this dtype (callers pass the base model's; fp32 master copies are rounded to it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model, state, dtype), str(out / ADAPTER_FILE), metadata={"format": "esft-explorer/1"})
    cfg.save(out / CONFIG_FILE)
    (out / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[ExpertConfig, dict[str, torch.Tensor], dict | None]:
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if not d.is_dir():
        raise EsftError(f"adapter directory {d} does not exist")
    if not (d / ADAPTER_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        hint = " (an authors' adapter? use `esft import-adapter`)" if list(d.glob("*.safetensors")) else ""
        raise EsftError(f"{d} is not an ESFT adapter: needs {ADAPTER_FILE} and {CONFIG_FILE}{hint}")
    cfg = ExpertConfig.load(d / CONFIG_FILE)
    fp = json.loads((d / FINGERPRINT_FILE).read_text()) if (d / FINGERPRINT_FILE).is_file() else None
    return cfg, load_file(str(d / ADAPTER_FILE)), fp


def load_adapter(model: nn.Module, adapter_dir: str | Path, check_base: bool = True) -> ExpertConfig:
    """Attach the adapter's selected experts (and other trained tensors) to the base `model`, in place."""
    cfg, tensors, fp = read_adapter(adapter_dir)
    if is_wrapped(model):
        raise EsftError("model already has an adapter attached; load a fresh base model")
    if check_base:
        if fp is None:
            raise EsftError(f"adapter {adapter_dir} has no {FINGERPRINT_FILE}; cannot check its base model")
        check_fingerprint(fp, model, f"adapter {adapter_dir}")
    apply_esft(model, cfg)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name.endswith(".esft.expert_ids"):
            continue
        if name not in params:
            raise EsftError(f"adapter tensor {name} has no place in this model")
        if params[name].shape != t.shape:
            want = tuple(params[name].shape)
            raise EsftError(f"adapter tensor {name} has shape {tuple(t.shape)}, model expects {want}")
        with torch.no_grad():
            params[name].copy_(t.to(params[name].dtype))
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise EsftError(f"adapter {adapter_dir} lacks {len(missing)} trained tensor(s), e.g. {missing[0]}")
    return cfg


def merge_adapter(model: nn.Module, adapter_dir: str | Path, out_dir: str | Path, tokenizer=None) -> Path:
    """Base + adapter → a plain transformers checkpoint in `out_dir` (loads with from_pretrained, no custom code)."""
    load_adapter(model, adapter_dir)
    merge_selected(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The authors' per-expert adapters (DeepSeek-V2 remote code): one Linear per expert and projection.
_OFFICIAL_EXPERT = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_PROJS = {"gate_proj", "up_proj", "down_proj"}


def _read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files:
        raise EsftError(f"{src} holds no .safetensors files")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def import_official_adapter(src: str | Path, model: nn.Module, out_dir: str | Path) -> ExpertConfig:
    """Convert an authors' adapter (dir with *.safetensors + expert_cfg.json) for base `model` into our format."""
    src = Path(src)
    if not src.exists():
        raise EsftError(f"adapter {src} does not exist")
    tensors = _read_safetensors_dir(src)
    per_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _OFFICIAL_EXPERT.match(name)
        if m:
            per_expert.setdefault((int(m[1]), int(m[2])), {})[m[3]] = t
        else:
            other[name if name.startswith(("model.", "lm_head.")) else f"model.{name}"] = t
    cfg_path = (src if src.is_dir() else src.parent) / CONFIG_FILE
    if cfg_path.is_file():
        cfg = ExpertConfig.load(cfg_path)
    else:  # infer from the tensor names
        experts: dict[int, list[int]] = {}
        for layer, e in sorted(per_expert):
            experts.setdefault(layer, []).append(e)
        cfg = ExpertConfig(experts)
    layout = check_config(cfg, model)
    fingerprint = base_fingerprint(model)
    listed = {(k, e) for k, ids in cfg.experts.items() for e in ids}
    absent = sorted(listed - set(per_expert))
    extra = sorted(set(per_expert) - listed)
    if absent or extra:
        what = [f"missing tensors for {_pairs(absent)}"] if absent else []
        what += [f"tensors for unlisted {_pairs(extra)}"] if extra else []
        raise EsftError(f"adapter {src} does not match its expert config: {'; '.join(what)}")
    apply_esft(model, cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer, ids in cfg.experts.items():
            sel = layout.experts[layer].esft
            for slot, e in enumerate(ids):
                proj = per_expert[(layer, e)]
                if set(proj) != _PROJS:
                    lacks = ", ".join(sorted(_PROJS - set(proj)))
                    raise EsftError(f"adapter {src}: layer {layer} expert {e} lacks {lacks}")
                gate_up = torch.cat([proj["gate_proj"], proj["up_proj"]], dim=0)  # (2I, H)
                _copy_row(sel.gate_up_proj, slot, gate_up, f"layer {layer} expert {e} gate/up")
                _copy_row(sel.down_proj, slot, proj["down_proj"], f"layer {layer} expert {e} down_proj")  # (H, I)
        for name, t in other.items():
            if name not in params:
                raise EsftError(f"adapter tensor {name} has no place in this model")
            params[name].copy_(t.to(params[name].dtype))
            params[name].requires_grad_(True)
    save_adapter(model, cfg, out_dir, fingerprint)
    return cfg


def _copy_row(dst: torch.Tensor, slot: int, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape[1:]) != tuple(src.shape):
        raise EsftError(f"{what}: shape {tuple(src.shape)} does not fit the model ({tuple(dst.shape[1:])})")
    dst[slot] = src.to(dst.dtype)


def _pairs(pairs) -> str:
    shown = ", ".join(f"layer {k} expert {e}" for k, e in pairs[:5])
    return shown + (f" (+{len(pairs) - 5} more)" if len(pairs) > 5 else "")

