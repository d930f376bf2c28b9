"""The training-method registry: one entry per method, read by every user (CLI choices and help, TrainConfig
validation, the recipe's prepare / save branches, the run tables' labels, the explorer's Train form).

Torch-free on purpose: the explorer lists methods without importing torch; `prepare` is a 'module:function' string
resolved only when a run starts. A new method is one module that calls `register_method(Method(...))`; name it in
ESFT_METHOD_MODULES (comma-separated) and `esft train --method NAME` and the Train form offer it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from esft_core.errors import EsftError

ADAPTER_FORMATS = ("esft", "peft", "checkpoint")


@dataclass(frozen=True)
class Method:
    """A training method. `prepare(model, cfg, expert_cfg, master_dtype) -> model` makes the chosen parameters
    trainable (cfg: TrainConfig; expert_cfg: the ExpertConfig for esft-format methods, else None)."""

    name: str
    label: str  # name in run tables and charts (the paper's: FFT, LoRA, ...)
    help: str  # one line: what trains
    prepare: str  # 'package.module:function'
    adapter: str = "esft"  # what the run writes: esft (expert_cfg.json + the trained tensors), peft, checkpoint
    needs_experts: bool = False  # reads an expert config (--experts); the Train form passes the selection
    shared_experts: bool = False  # always trains the shared experts (an expert config with no routed experts)
    draw: str | None = None  # 'module:function' drawing the expert config (random): (cfg, ecfg, num_experts)
    score_label: bool = False  # label by the selection score (ESFT-Gate / ESFT-Token)

    def __post_init__(self):
        if self.adapter not in ADAPTER_FORMATS:
            raise ValueError(f"method {self.name}: adapter must be one of {ADAPTER_FORMATS}, got {self.adapter!r}")
        if ":" not in self.prepare:
            raise ValueError(f"method {self.name}: prepare must be 'module:function', got {self.prepare!r}")

    @property
    def esft_adapter(self) -> bool:
        """Trains through an expert config and writes an ESFT adapter (accepts --train-shared / --train-non-expert)."""
        return self.adapter == "esft"

    def run_label(self, selection: dict | None = None) -> str:
        if self.score_label:
            metric = (selection or {}).get("metric")
            return {"token": f"{self.label}-Token", "gate": f"{self.label}-Gate"}.get(metric, self.label)
        return self.label


METHODS: dict[str, Method] = {}
PLUGIN_MODULES: tuple[str, ...] = ()  # built-in methods are registered below; users' via ESFT_METHOD_MODULES
_loaded = False


def register_method(m: Method) -> Method:
    METHODS[m.name] = m
    return m


def load_plugins() -> None:
    """Import the users' method modules (ESFT_METHOD_MODULES) once."""
    global _loaded
    if _loaded:
        return
    from esft_core import settings

    _loaded = True
    for mod in (*PLUGIN_MODULES, *settings.items("ESFT_METHOD_MODULES")):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise EsftError(f"cannot import method module '{mod}' (ESFT_METHOD_MODULES): {e}") from None


def methods() -> dict[str, Method]:
    """Every registered method by name (built-in first, then the users')."""
    load_plugins()
    return METHODS


def get_method(name: str) -> Method:
    ms = methods()
    if name not in ms:
        raise EsftError(f"unknown method '{name}'; choose one of {', '.join(ms)}")
    return ms[name]


def resolve(entry: str):
    """'module:function' → the function."""
    module, _, fn = entry.partition(":")
    return getattr(importlib.import_module(module), fn)


def method_label(name: str | None, selection: dict | None = None) -> str:
    """The run-table label of a method name (an unknown name, e.g. of a plugin not loaded now, as is)."""
    m = methods().get(name or "")
    return m.run_label(selection) if m else (name or "?")


_PREP = "esft_core.tuning.methods"
register_method(Method("esft", "ESFT", "only the experts of an expert config (`esft select`)", f"{_PREP}:prepare_esft",
                       needs_experts=True, score_label=True))
register_method(Method("fft", "FFT", "every parameter (full fine-tuning)", f"{_PREP}:prepare_fft",
                       adapter="checkpoint"))
register_method(Method("lora", "LoRA", "peft LoRA adapters on attention and the routed experts",
                       f"{_PREP}:prepare_lora", adapter="peft"))
register_method(Method("random", "random experts", "as many experts per layer as an expert config, drawn at random "
                       "(seeded; the paper's ablation)", f"{_PREP}:prepare_esft", needs_experts=True,
                       draw=f"{_PREP}:draw_random"))
register_method(Method("shared", "shared experts", "only the shared experts (no --experts)", f"{_PREP}:prepare_esft",
                       shared_experts=True))
