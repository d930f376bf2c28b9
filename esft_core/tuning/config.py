"""TrainConfig: the hyper-parameters of one run, each an `esft train` flag (the CLI's flags are generated from these
fields and their help), validated on construction. Torch-free: the explorer builds one for its Train form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from esft_core.errors import EsftError
from esft_core.models.devices import DTYPE_CHOICES
from esft_core.tuning.registry import get_method, methods

SCHEDULES = ("constant", "cosine")  # = TrainConfig.schedule's choices
LOAD_CHOICES = ("auto", "sharded", "whole")  # = TrainConfig.load's choices
IDENTITY_FIELDS = ("method", "model", "data", "experts_cfg", "lr", "batch_size", "grad_accum", "seq_len",
                   "weight_decay", "beta1", "beta2", "clip", "schedule", "warmup", "seed", "lora_r", "lora_alpha",
                   "train_shared", "train_non_expert")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (each is an `esft train` flag). Defaults are documented in docs/training.md."""

    data: str = field(metadata={"help": "chat JSONL (or Parquet) training data", "metavar": "FILE"})
    out: str = field(metadata={"help": "run directory (must be new, or --resume)", "metavar": "DIR"})
    model: str = field(default="demo", metadata={"help": "base model: 'demo', a directory or a hub id"})
    method: str = field(default="esft", metadata={"help": "training method (esft_core/tuning/registry.py)"})
    experts: str | None = field(default=None, metadata={
        "help": "expert config JSON (required for the methods that train a selection: esft, random)", "metavar": "CFG"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=4, metadata={"help": "packed sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=512, metadata={"help": "packed sequence length (tokens)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0 = no clipping)"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule (cosine: to 10% of lr)",
                                                        "choices": ("constant", "cosine")})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    seed: int = field(default=0, metadata={"help": "seed for data order, LoRA init and random experts"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    eval_data: list[str] = field(default_factory=list, metadata={
        "help": "evaluate after training on these files (task eval sets, general held-out corpus)", "metavar": "FILE"})
    eval_limit: int = field(default=32, metadata={"help": "examples per eval file"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha/r)"})
    experts_impl: str | None = field(default=None, metadata={
        "help": "experts implementation of transformers (default: the model's)",
        "choices": ("eager", "grouped_mm", "batched_mm")})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (auto: CUDA when present)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: the checkpoint's dtype (float32 for the CPU demo)", "choices": DTYPE_CHOICES})
    fp32_master: bool = field(default=True, metadata={
        "help": "keep float32 master weights (and optimizer state) for the trained experts of a low-precision model"})
    grad_checkpointing: bool | None = field(default=None, metadata={
        "help": "activation checkpointing per decoder layer (default: on unless the model is the demo)"})
    adapter_dtype: str = field(default="auto", metadata={
        "help": "dtype of the written adapter / checkpoint (auto: the model's dtype)", "choices": DTYPE_CHOICES})
    global_batch: int | None = field(default=None, metadata={
        "help": "sequences per optimizer step over all ranks; sets --batch-size to it / (world size x grad-accum)"})
    train_shared: bool = field(default=False, metadata={
        "help": "esft / random: also train the shared experts of every MoE layer (paper Table 3)"})
    train_non_expert: bool = field(default=False, metadata={
        "help": "esft / random / shared: also train every non-expert module: attention, norms, routers, dense "
                "MLPs, embeddings, head (paper Table 3; the authors' non_expert_modules)"})
    router_aux: bool | None = field(default=None, metadata={
        "help": "add the router's auxiliary balance loss (DeepSeek-V2's seq_aux, alpha 0.001, or the family's own "
                "router_aux_loss_coef) to the LM loss; default: on exactly when a router trains (--train-non-expert, "
                "fft)"})
    load: str = field(default="auto", metadata={
        "help": "how ranks get the weights: sharded (build on meta, each rank reads only its slices of the "
                "safetensors files), whole (every rank loads the whole checkpoint, then shards it); auto: sharded "
                "under torchrun except for lora", "choices": LOAD_CHOICES})
    expert_parallel: bool = field(default=False, metadata={
        "help": "torchrun, esft / random: place whole routed experts on ranks (E/N each) and send tokens to them by "
                "all-to-all instead of all-gathering every frozen expert; FSDP2 shards the rest"})
    experts_cfg: dict | None = field(default=None, metadata={"help": "filled in: the expert config used",
                                                             "flag": False})

    def __post_init__(self):
        m = get_method(self.method)
        if m.needs_experts and not self.experts and not self.experts_cfg:
            raise EsftError(f"--method {self.method} needs --experts CFG (an expert config from `esft select`)")
        check_table3_flags(self)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "lora_r", "eval_limit"):
            if getattr(self, name) <= 0:
                raise EsftError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip", "warmup", "save_every", "lora_alpha"):
            if getattr(self, name) < 0 or (name == "lr" and self.lr == 0):
                raise EsftError(f"--{name.replace('_', '-')} must be {'> 0' if name == 'lr' else '>= 0'}")
        if self.schedule not in SCHEDULES:
            raise EsftError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPE_CHOICES:
                raise EsftError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_CHOICES)}, "
                                f"got '{getattr(self, name)}'")
        if self.load not in LOAD_CHOICES:
            raise EsftError(f"--load must be one of {', '.join(LOAD_CHOICES)}, got '{self.load}'")
        if self.load == "sharded" and get_method(self.method).adapter == "peft":
            raise EsftError(f"--load sharded does not serve --method {self.method}: peft renames the modules it wraps, "
                            "so the checkpoint's names no longer fit; use --load whole")
        if self.expert_parallel and self.save_every:
            raise EsftError("--expert-parallel: sharded checkpoints (--save-every) are not supported with expert "
                            "parallelism yet (the selected copies differ per rank); drop --save-every")
        if self.expert_parallel and self.load == "whole":
            raise EsftError("--expert-parallel loads sharded (each rank reads its own experts); drop --load whole")
        if self.global_batch is not None and self.global_batch <= 0:
            raise EsftError(f"--global-batch must be positive, got {self.global_batch}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then constant or cosine to 10%."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_table3_flags(cfg) -> None:
    """TrainConfig validation of the method and the Table 3 flags (one EsftError line)."""
    m = get_method(cfg.method)
    if m.shared_experts and (cfg.experts or cfg.experts_cfg):
        raise EsftError(f"--method {m.name} trains only the shared experts; drop --experts (or use --method esft "
                        "--train-shared to train selected experts and shared experts)")
    if not m.esft_adapter and (cfg.train_shared or cfg.train_non_expert):
        flag = "--train-shared" if cfg.train_shared else "--train-non-expert"
        names = [n for n, x in methods().items() if x.esft_adapter]
        which = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
        raise EsftError(f"{flag} applies to --method {which}, not {cfg.method} ({m.label} trains {m.help})")
