"""Device and dtype resolution for every command (`--device auto|cpu|cuda[:N]`, `--dtype auto|bfloat16|...`).

`auto` device: CUDA when torch sees a GPU, else the CPU. `auto` dtype: the checkpoint's own dtype (config.json
`dtype` / `torch_dtype`; real MoEs ship bfloat16), except the shipped CPU demo, which runs in float32 (exact
comparisons, tiny). Bad combinations fail before anything is loaded or written, with one line naming the flag:
`--device cuda` without CUDA, an index past the last GPU, `--dtype float16` on the CPU (no fp16 training kernels),
`--dtype bfloat16` on a GPU without bf16 support.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from esft_core.errors import EsftError

if TYPE_CHECKING:  # torch is imported where a device or dtype is resolved: the CLI parser and configs stay light
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def dtype_of(name: str) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' → the torch dtype."""
    import torch

    return getattr(torch, name)


def resolve_device(spec: str | None = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' → a torch.device that exists on this machine."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise EsftError(f"--device {spec}: CUDA is not available ({why}); use --device cpu or auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise EsftError(f"--device {spec}: no such GPU (this machine has {torch.cuda.device_count()}: "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    raise EsftError(f"--device {spec}: unknown device; use {DEVICE_CHOICES}")


def checkpoint_dtype(model_path: str) -> torch.dtype | None:
    """The dtype a checkpoint declares in its config.json (None when it declares none or is not a local dir)."""
    import torch

    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        try:  # a hub id: transformers reads (and caches) config.json
            from transformers import AutoConfig

            name = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
        except (OSError, ValueError):
            return None
    else:
        d = json.loads(cfg.read_text())
        name = d.get("dtype") or d.get("torch_dtype")
    if isinstance(name, torch.dtype):
        return name
    name = str(name).replace("torch.", "") if name else None
    return dtype_of(name) if name in DTYPE_NAMES else None


def resolve_dtype(spec: str | None, device: torch.device, model: str | None = None) -> torch.dtype:
    """'auto' | 'bfloat16' | 'float16' | 'float32' → a dtype `device` can train in.

    auto: float32 for the demo on the CPU, else the checkpoint's dtype (float32 when it declares none)."""
    import torch

    from esft_core.models.loading import DEMO_MODEL, resolve_model_path

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        path = resolve_model_path(model)
        if device.type == "cpu" and Path(path).resolve() == DEMO_MODEL.resolve():
            return torch.float32
        dtype = checkpoint_dtype(path) or torch.float32
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.bfloat16  # same width, trainable on the CPU
        return dtype
    if spec not in DTYPE_NAMES:
        raise EsftError(f"--dtype {spec}: unknown dtype; use {', '.join(DTYPE_CHOICES)}")
    dtype = dtype_of(spec)
    if device.type == "cpu" and dtype == torch.float16:
        raise EsftError("--dtype float16 is not supported on the CPU (no float16 training kernels); "
                        "use bfloat16 or float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EsftError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                        "use float16 or float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def add_device_flags(parser, dtype_help: str = "auto: the checkpoint's dtype (float32 for the CPU demo)") -> None:
    """--device / --dtype, identical on record, train, eval, merge and import-adapter."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA when present)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=dtype_help)

