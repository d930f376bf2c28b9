"""Checks run before anything heavy happens: the model's limits (read from config.json only, no weights), a memory
estimate for a forward/backward pass, a model directory's completeness.

Every failure is an EsftError naming the flag, the value and what would be accepted (one line in the CLI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from esft_core.errors import EsftError


def model_config(model: str):
    """The transformers config of 'demo', a directory or a hub id, without loading weights.

    A directory must hold config.json, weights and a tokenizer; a hub id that is not in the local cache fails at
    once when HF_HUB_OFFLINE is set (instead of a minute of network retries)."""
    from esft_core.models.loading import resolve_model_path

    path = resolve_model_path(model)
    p = Path(path)
    if p.is_dir():
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise EsftError(f"model directory {p} has config.json but no weights (*.safetensors or *.bin)")
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise EsftError(f"model directory {p} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    elif os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise EsftError(f"model '{model}' is neither a local directory nor in the hub cache (HF_HUB_OFFLINE is "
                            "set); give a model directory or 'demo'")
    if p.is_dir():  # plain JSON: no transformers import for a check (fast, and safe in a pre-warmed job runner)
        try:
            return _JsonConfig(json.loads((p / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise EsftError(f"{p / 'config.json'} is not a readable JSON config ({e})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EsftError(f"cannot read the config of model '{model}': {str(e).splitlines()[0]}") from None


class _JsonConfig:
    """The attributes of a config.json (and its text_config, for multimodal checkpoints)."""

    def __init__(self, d: dict):
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        self.__dict__.update(d)

    def get_text_config(self):
        sub = self.__dict__.get("text_config")
        return _JsonConfig(sub) if isinstance(sub, dict) else self


def max_positions(config) -> int | None:
    """The longest sequence the model supports (max_position_embeddings or its family's name for it)."""
    text = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(text, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def seq_len(value, flag: str, config, extra: int = 0, what: str = "") -> int:
    """`value` (+ `extra` generated tokens) must be an integer >= 2 within the model's positions."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise EsftError(f"{flag} must be an integer >= 2, got {value}")
    limit = max_positions(config)
    if limit is not None and value + extra > limit:
        more = f" + {extra} {what}" if extra else ""
        raise EsftError(f"{flag} {value}{more} exceeds the model's {limit} positions (max_position_embeddings); "
                        f"use {flag} <= {limit - extra}")
    return value


def available_memory() -> tuple[int, str]:
    """(bytes free, where) on the accelerator when there is one, else MemAvailable of the host."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), "GPU"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM"
    except OSError:
        pass
    return 1 << 62, "RAM"  # unknown: do not block


def activation_bytes(config, batch: int, seq: int, training: bool, bytes_per_value: int = 4) -> int:
    """A lower bound of the activation memory of one forward (+ backward) pass, to refuse hopeless requests early.

    Hidden states and MLP/expert intermediates (batch, seq, ~8 * hidden) per layer — every layer is kept for the
    backward pass when training, about two at a time in inference; one layer's attention scores (batch, heads,
    seq, seq) twice (eager/math attention materialises them; flash kernels do not, hence only one layer counted);
    logits (batch, seq, vocab)."""
    text = getattr(config, "get_text_config", lambda: config)()
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    hidden = int(getattr(text, "hidden_size", 1) or 1)
    vocab = int(getattr(text, "vocab_size", 1) or 1)
    kept = layers if training else 2
    values = (kept * batch * seq * 8 * hidden + 2 * batch * heads * seq * seq
              + batch * seq * vocab * (3 if training else 1))
    return int(values * bytes_per_value)


def memory(config, batch: int, seq: int, training: bool, flags: str) -> None:
    """Refuse a batch/sequence whose activations alone exceed the free memory."""
    need = activation_bytes(config, batch, seq, training)
    free, where = available_memory()
    if need > free:
        raise EsftError(f"{flags} need at least {need / 2**30:.1f} GiB of activations but only {free / 2**30:.1f} "
                        f"GiB of {where} is free; lower --seq-len or --batch-size")
