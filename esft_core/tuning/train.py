"""The training recipe behind `esft train`: setup / train / save / cleanup, for interchangeable methods by name.

Methods (esft_core/tuning/registry.py): `esft` trains only the experts of an expert config (esft_core.experts.esft),
`random` trains as many
experts per layer as a given config but chosen at random (seeded; the paper's ablation), `shared` trains only the
shared experts, `fft` every parameter, `lora` peft LoRA adapters (see `lora_targets`); `--train-shared` /
`--train-non-expert` (the paper's Table 3) add modules to esft / random. Data is chat JSONL with the authors'
template, loss on assistant tokens only, packed to `seq_len`. AdamW with the authors' betas / weight decay, real
gradient clipping, gradient accumulation, constant or cosine schedule.

A run directory (`--out DIR`) holds `run.json` (config, status running|complete|failed, error), `metrics.jsonl`
(one line per optimizer step), `checkpoints/step_N/` (every `save_every` steps, for `--resume`; a run killed with
kill -9 resumes from the last complete one), `adapter/` and, when eval data were given, `eval.json`.

Device and precision: `--device auto|cpu|cuda[:N]`, `--dtype auto|bfloat16|float16|float32` (esft_core.models.devices);
frozen weights stay in the model dtype, the selected experts' trainable copies keep float32 master weights
(`--fp32-master`, default on) so their optimizer state is float32; adapters are written in the base dtype
(`--adapter-dtype`). `--grad-checkpointing` (default on except for the demo) recomputes each decoder layer in
backward.

Under `torchrun --nproc-per-node N` the model is sharded with FSDP2 (esft_core.tuning.distributed): every rank takes
its own
slice of each global batch, gradients are reduce-scattered in float32, checkpoints are sharded DCP checkpoints, and
rank 0 alone writes the adapter and run files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from esft_core.errors import EsftError
from esft_core.files import read_metrics, write_json
from esft_core.locks import LOCK_NAME, RunDirLock
from esft_core.tuning.config import IDENTITY_FIELDS, TrainConfig, lr_at
from esft_core.tuning.registry import get_method, resolve
from esft_core.tuning.trainguard import check_finite_params, check_step, preflight


# ---------------------------------------------------------------------------------------------------------------
def quiet_transformers() -> None:
    """No transformers progress bars / info logs: stderr stays for our one-line errors and tqdm."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def is_demo(model: str | None) -> bool:
    from esft_core.models.loading import DEMO_MODEL, resolve_model_path

    return Path(resolve_model_path(model)).resolve() == DEMO_MODEL.resolve()




def prepare_data(cfg: TrainConfig, tok) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read, encode (labels on assistant tokens) and pack; returns ids, labels (n_seq, seq_len) and stats."""
    from esft_core.data import IGNORE_INDEX, encode_record, pack, read_records

    records = read_records(cfg.data)
    if "messages" not in records[0]:
        raise EsftError(f"{cfg.data}: training data must be chat records ({{\"messages\": [...]}})")
    examples, shortest = [], None
    for rec in records:
        ids, labels = encode_record(rec, tok)
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
        if first is None:
            continue  # no assistant turn
        shortest = first + 2 if shortest is None else min(shortest, first + 2)
        if first + 1 < cfg.seq_len:  # at least one answer token is predicted inside the window
            examples.append((ids, labels))
    if not examples:
        need = f" (the shortest needs {shortest})" if shortest else ""
        raise EsftError(f"--seq-len {cfg.seq_len} is too small for any example of {cfg.data}{need}")
    packed = pack(examples, cfg.seq_len, pad_id=tok.pad_token_id or 0)
    ids = torch.tensor(packed.input_ids, dtype=torch.long)  # (n_seq, seq_len)
    labels = torch.tensor(packed.labels, dtype=torch.long)  # (n_seq, seq_len)
    stats = {"records": len(records), "examples": len(examples), "dropped": len(records) - len(examples),
             "sequences": len(ids), "answer_tokens": int((labels != IGNORE_INDEX).sum())}
    return ids, labels, stats


def check_out_dir(cfg: TrainConfig, resume: bool) -> dict | None:
    """The existing run.json when resuming; raise if DIR holds anything we must not overwrite."""
    out = Path(cfg.out)
    run_file = out / "run.json"
    if out.exists() and not out.is_dir():
        raise EsftError(f"--out {out} exists and is not a directory")
    if run_file.is_file():
        try:
            prev = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            raise EsftError(f"{run_file} is unreadable; choose another --out") from None
        if not resume:
            raise EsftError(f"{out} already holds a run ({prev.get('method')}, {prev.get('status')}); "
                            "pass --resume to continue it or choose another --out")
        mine, theirs = asdict(cfg), prev.get("config", {})
        # fields added later (the Table 3 flags) read as their default in an older run.json
        diff = [k for k in IDENTITY_FIELDS if theirs.get(k, False if k.startswith("train_") else None) != mine.get(k)]
        if diff:
            raise EsftError(f"{out} holds a different run (differs in {', '.join(diff)}); choose another --out")
        return prev
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise EsftError(f"{out} is not empty and holds no ESFT run; choose another --out")
    return None


class Recipe:
    """setup() → train() → save() → cleanup(). Use `run_training(cfg)` for the whole thing with run.json upkeep."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.out = Path(cfg.out)
        from esft_core.models.devices import resolve_device
        from esft_core.tuning.distributed import init_distributed, world_size

        device = resolve_device(cfg.device)  # bad --device fails before any process group or file exists
        if cfg.global_batch is not None:
            per = world_size() * cfg.grad_accum
            if cfg.global_batch % per:
                raise EsftError(f"--global-batch {cfg.global_batch} is not divisible by world size {world_size()} "
                                f"x --grad-accum {cfg.grad_accum}; choose a multiple of {per}")
            cfg.batch_size = cfg.global_batch // per
        self.rank, self.world, self.device = init_distributed(device)
        self.step = 0
        self.t0 = time.time()
        self.prev = None
        self._perms: dict[int, list[int]] = {}

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate everything that can be wrong before writing anything, then create the run directory.

        Under torchrun a rank that dies meanwhile (killed, out of memory) makes the others' next collective fail:
        that is one line naming it, and nothing has been written."""
        from esft_core.tuning.distributed import collective_errors

        with collective_errors("setting up (loading the model)"):
            self._setup()

    def _setup(self) -> None:
        from esft_core.experts.adapters import base_fingerprint
        from esft_core.models.devices import dtype_of, resolve_dtype
        from esft_core.models.loading import load_model, resolve_model_path
        from esft_core.tuning.methods import load_experts_cfg

        cfg = self.cfg
        load_experts_cfg(cfg)
        self.dtype = resolve_dtype(cfg.dtype, self.device, cfg.model)
        self.save_dtype = self.dtype if cfg.adapter_dtype == "auto" else dtype_of(cfg.adapter_dtype)
        self.prev = check_out_dir(cfg, self.resume)
        quiet_transformers()
        from transformers import AutoTokenizer

        try:  # the tokenizer alone first: bad data is reported before the (slower) model load
            tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        except OSError as e:
            raise EsftError(f"cannot load model '{cfg.model}': {str(e).splitlines()[0]}") from None
        self.ids, self.labels, self.data_stats = prepare_data(cfg, tok)
        self.ep = cfg.expert_parallel
        if self.ep and self.resume:
            raise EsftError("--expert-parallel: --resume is not supported with expert parallelism yet (no sharded "
                            "checkpoints of the per-rank selected copies)")
        self.sharded_load = self.ep or self.cfg.load == "sharded" or (
            self.cfg.load == "auto" and self.world > 1 and get_method(cfg.method).adapter != "peft")
        if self.sharded_load:  # parameters on meta; each rank reads its own slices once the model is sharded
            from esft_core.models.sharded import empty_model

            self.model, self.tok = empty_model(cfg.model, self.dtype, cfg.experts_impl)
        else:
            self.model, self.tok = load_model(cfg.model, dtype=self.dtype, experts_implementation=cfg.experts_impl,
                                              device=self.device)
        self.grad_checkpointing = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else not is_demo(
            cfg.model)
        if self.grad_checkpointing and not getattr(self.model, "supports_gradient_checkpointing", False):
            raise EsftError(f"--grad-checkpointing: {type(self.model).__name__} does not support activation "
                            "checkpointing; pass --no-grad-checkpointing")
        from esft_core.tuning.methods import expert_config_for

        self.expert_cfg = expert_config_for(cfg, self.model, (self.prev or {}).get("config"))
        self.fingerprint = None if self.sharded_load else base_fingerprint(self.model)  # sharded: once loaded
        # Nothing above wrote a file; from here on the run directory is ours.
        torch.manual_seed(cfg.seed)
        if self.grad_checkpointing:  # before peft wraps the model; non-reentrant: works with FSDP2 and frozen inputs
            self.model.config.use_cache = False
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.master_dtype = torch.float32 if cfg.fp32_master and self.dtype != torch.float32 else None
        # each tensor's dtype in the base model (routers stay fp32 in a bf16 model): what `save` writes by default
        self.base_dtypes = {n: p.dtype for n, p in self.model.named_parameters()}
        from esft_core.models.loading import moe_layout

        layout = moe_layout(self.model)  # of the plain model: routers keep their modules through every method
        prepare = resolve(get_method(cfg.method).prepare)
        method_cfg = self.expert_cfg
        if self.ep:  # each rank keeps its block of experts and selects among them in local ids
            from esft_core.tuning import expert_parallel as ep

            ep.check(layout, self.world, get_method(cfg.method))
            method_cfg = ep.local_config(self.expert_cfg, ep.localize(layout, self.rank, self.world))
            self.ep_mesh = ep.make_mesh(self.device, self.world)
        self.model = prepare(self.model, cfg, method_cfg, master_dtype=self.master_dtype)
        self.model.train()
        self._setup_router_aux(layout)
        if self.world > 1:
            from esft_core.tuning.distributed import shard_model

            if self.master_dtype is not None:  # FSDP2 wants one dtype for trainable params: fp32 masters for all
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(self.master_dtype)
            ignored = set()
            if self.ep:
                from esft_core.tuning.expert_parallel import local_parameters

                ignored = local_parameters(self.model)
            self.model = shard_model(self.model, self.device, self.dtype, ignored=ignored)
        if self.sharded_load:
            self._load_shards()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Deferring FSDP2's reduce-scatter to the last micro-batch keeps *unsharded* gradients of every trainable
        # tensor between micro-batches: cheap for ESFT's few experts, a whole fp32 model per rank for FFT. So defer
        # only while those full gradients weigh no more than this rank's share of the weights.
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.defer_sync = sum(p.numel() * 4 for p in self.params) <= total / max(1, self.world)
        self.named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.trainable_count = sum(p.numel() for p in self.params)  # DTensors count globally
        if self.ep:  # plus the other ranks' selected copies
            import torch.distributed as dist

            mine = torch.tensor(sum(p.numel() for p in self.ep_params_of(self.params)), dtype=torch.long)
            dist.all_reduce(mine)
            self.trainable_count += int(mine) - sum(p.numel() for p in self.ep_params_of(self.params))
        from esft_core.tuning.distributed import frozen_checksum

        self.frozen_at_start = frozen_checksum(self.model)
        # EP's local copies are plain tensors among FSDP2's DTensors: their own param groups (one fused kernel each)
        self.ep_params = self.ep_params_of(self.params) if self.ep else []
        self.fsdp_params = [p for p in self.params if hasattr(p, "device_mesh")] if self.ep else self.params
        groups = []
        for part in (self.fsdp_params, self.ep_params):
            for wd, sel in ((cfg.weight_decay, [p for p in part if p.dim() >= 2]), (0.0, [p for p in part
                                                                                       if p.dim() < 2])):
                if sel:
                    groups.append({"params": sel, "weight_decay": wd})
        # the fused AdamW kernel (CUDA and CPU): one pass per tensor, no full-size temporaries
        fused = True if self.device.type in ("cuda", "cpu") else None
        # None on an EP rank that holds no selected expert and nothing else trains (it still computes, all-to-alls
        # and reduces the norm with the others)
        self.opt = torch.optim.AdamW(groups, lr=lr_at(cfg, 1), betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     fused=fused) if groups else None
        if self.world > 1:  # every rank has checked the run directory before rank 0 writes to it
            import torch.distributed as dist

            dist.barrier()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_run("running")
        if self.prev is not None:
            self._load_checkpoint()
        elif self.rank == 0:
            (self.out / "metrics.jsonl").write_text("")
        from esft_core.procs import release_freed_host_memory

        release_freed_host_memory()  # what setup (method, masters, sharding, fills) freed, before training grows

    def _load_shards(self) -> None:
        """Sharded loading (esft_core.models.sharded): allocate and read this rank's shards, then fill the ESFT copies
        from the fused tensors and take the base fingerprint (both collective, no full tensor gathered)."""
        from esft_core.experts.adapters import base_fingerprint
        from esft_core.models.sharded import materialize
        from esft_core.tuning.distributed import fill_selected

        if self.ep:
            from esft_core.tuning import expert_parallel as ep

            ep.to_global(self.model, self.ep_mesh["ep"])  # the loader reads each rank's experts only
        missing = materialize(self.model, self.device)
        lacking = sorted(n for n in missing if ".esft." not in n)
        if lacking:
            raise EsftError(f"{self.model._esft_checkpoint}: the checkpoint lacks {len(lacking)} tensors of the "
                            f"model (first: {lacking[0]}); is a shard file missing or truncated?")
        fill_selected(self.model)
        self.fingerprint = base_fingerprint(self.model)
        if self.ep:
            ep.to_local(self.model)
            ep.fill_local(self.model)
            self.ep_bytes = ep.install(self.model, self.ep_mesh)

    @staticmethod
    def ep_params_of(params) -> list:
        """Plain (not DTensor) trainable tensors: expert parallelism's per-rank selected copies."""
        return [p for p in params if not hasattr(p, "device_mesh")]

    def _setup_router_aux(self, layout) -> None:
        """The router's balance loss, on by default exactly when a router trains (recorded in run.json)."""
        from esft_core.tuning.aux_loss import SEQ_AUX_ALPHA, RouterAux, aux_kind, router_trains

        trains = router_trains(self.model, layout)
        on = self.cfg.router_aux if self.cfg.router_aux is not None else trains
        self.aux = None
        self.router_aux = {"on": bool(on), "router_trains": trains}
        if on:
            kind = aux_kind(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)
            coef = getattr(self.model, "router_aux_loss_coef", None) if kind == "model" else SEQ_AUX_ALPHA
            self.router_aux.update(kind=kind, alpha=coef)
            if kind == "seq_aux":
                self.aux = RouterAux(layout)

    def _forward_loss(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss to back-propagate, LM loss (mean CE over answer tokens)) of one micro-batch; they differ by the
        router's auxiliary loss when it is on."""
        if not self.router_aux["on"]:
            out = self.model(input_ids=ids, labels=labels)
            return out.loss, out.loss
        if self.aux is None:  # the family's own: transformers adds router_aux_loss_coef * aux_loss to loss
            out = self.model(input_ids=ids, labels=labels, output_router_logits=True)
            return out.loss, out.loss - self.router_aux["alpha"] * out.aux_loss.to(out.loss.device)
        self.aux.captured.clear()  # activation recomputation in the last backward re-ran the routers
        out = self.model(input_ids=ids, labels=labels)
        aux = self.aux.loss(ids.shape[0])
        return (out.loss if aux is None else out.loss + aux), out.loss

    def _write_run(self, status: str, error: str | None = None, **extra) -> None:
        cfg = asdict(self.cfg)
        if get_method(self.cfg.method).draw:
            cfg["random_experts"] = self.expert_cfg.to_dict()
        run = {"method": self.cfg.method, "model": self.cfg.model, "data": self.cfg.data, "status": status,
               "error": error, "step": self.step, "steps": self.cfg.steps, "world_size": self.world,
               "started_at": (self.prev or {}).get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": cfg,
               "data_stats": getattr(self, "data_stats", None),
               "trainable_params": getattr(self, "trainable_count", None),
               "router_aux": getattr(self, "router_aux", None), **extra}
        write_json(self.out / "run.json", run)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        d = self.out / "checkpoints"
        return sorted(p for p in d.glob("step_*") if (p / "state.json").is_file()) if d.is_dir() else []

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _save_checkpoint(self) -> None:
        """Sharded DCP checkpoint of the trainable tensors + AdamW state (every rank writes its shards), atomically."""
        from esft_core.tuning.distributed import save_checkpoint

        # every rank checks its own shards (the loss check has stopped a non-finite step on all ranks before this)
        check_finite_params({n: p.to_local() if hasattr(p, "to_local") else p for n, p in self.named.items()})
        final = self.out / "checkpoints" / f"step_{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        save_checkpoint(self.model, self.opt, set(self.named), tmp)
        self._barrier()
        if self.rank == 0:
            write_json(tmp / "state.json", {"step": self.step, "world_size": self.world})
            os.replace(tmp, final)
            self._write_run("running")
            for old in self._checkpoints()[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _load_checkpoint(self) -> None:
        from esft_core.tuning.distributed import load_checkpoint

        ckpts = self._checkpoints()
        metrics = self.out / "metrics.jsonl"
        if ckpts:
            last = ckpts[-1]
            load_checkpoint(self.model, self.opt, set(self.named), last)
            self.step = json.loads((last / "state.json").read_text())["step"]
        if self.rank == 0 and metrics.is_file():  # drop lines logged after the checkpoint by the killed run

            keep = [m for m in read_metrics(metrics, strict=True) if m["step"] <= self.step]
            metrics.write_text("".join(json.dumps(m) + "\n" for m in keep))

    # -- train ---------------------------------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (global count) of this rank: a seeded permutation per epoch, sliced by rank."""
        n, b = len(self.ids), self.cfg.batch_size
        per = b * self.world
        rows = []
        for j in range(per * index + b * self.rank, per * index + b * (self.rank + 1)):
            epoch, pos = divmod(j, n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
                self._perms = {epoch: torch.randperm(n, generator=g).tolist()}
            rows.append(self._perms[epoch][pos])
        return self.ids[rows], self.labels[rows]

    def train(self) -> None:
        cfg = self.cfg
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"esft train ({cfg.method})", unit="step",
                       file=sys.stderr, mininterval=1.0)
        metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if self.rank == 0 else None
        try:
            from esft_core.tuning.distributed import set_gradient_sync

            while self.step < cfg.steps:
                t = time.time()
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # no host sync per micro-batch
                tokens = 0
                for k in range(cfg.grad_accum):
                    ids, labels = self._micro_batch(self.step * cfg.grad_accum + k)
                    ids, labels = ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                    if self.world > 1 and self.defer_sync:  # reduce-scatter on the last micro-batch only
                        set_gradient_sync(self.model, k == cfg.grad_accum - 1)
                    total, lm = self._forward_loss(ids, labels)
                    (total / cfg.grad_accum).backward()
                    loss_sum += lm.detach()  # the logged loss is the LM loss, comparable across methods
                    tokens += int(ids.numel())
                loss_t = loss_sum / cfg.grad_accum
                if self.world > 1:  # gradients are already averaged by FSDP; average the logged loss too
                    import torch.distributed as dist

                    dist.all_reduce(loss_t)
                    loss_t /= self.world
                    tokens *= self.world
                if self.ep:  # EP gradients to the data-parallel mean, then one global norm over both kinds
                    from esft_core.tuning.expert_parallel import scale_and_clip

                    norm = scale_and_clip(self.fsdp_params, self.ep_params, self.world, cfg.clip)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip if cfg.clip > 0 else float("inf"))
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                loss = float(loss_t)  # one host sync per step
                check_step(loss, norm, self.step + 1, lr_at(cfg, self.step + 1))  # before the weights change
                self.step += 1
                lr = lr_at(cfg, self.step)
                if self.opt is not None:
                    for g in self.opt.param_groups:
                        g["lr"] = lr
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                dt = time.time() - t
                if metrics is not None:
                    rec = {"step": self.step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens / dt, 1),
                           "elapsed": round(time.time() - self.t0, 3), "grad_norm": round(float(norm), 6),
                           "step_time": round(dt, 4)}
                    if self.ep:  # bytes rank 0 sent by all-to-all this step: forwards counted, backward as many
                        rec["ep_bytes"] = 2 * (self.ep_bytes[0] - getattr(self, "_ep_seen", 0))
                        self._ep_seen = self.ep_bytes[0]
                    if self.device.type == "cuda":
                        rec["gpu_mem_peak"] = torch.cuda.max_memory_allocated(self.device)  # bytes, this rank
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self._save_checkpoint()
        finally:
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()

    # -- save ----------------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the adapter once (rank 0) in `save_dtype`: esft/random → our adapter format; lora → peft; fft → a full
        checkpoint. Under FSDP the trainable tensors are gathered first (every rank takes part)."""
        from esft_core.experts.esft import plain_name
        from esft_core.tuning.distributed import gather_trainable

        if getattr(self, "opt", None) is not None:  # training is over: free the optimizer state (2x the shards)
            self.opt.state.clear()
        auto = self.cfg.adapter_dtype == "auto"  # each tensor in its base dtype (fp32 masters rounded to it)

        def saved_dtype(name: str) -> torch.dtype:
            return self.base_dtypes.get(plain_name(name), self.save_dtype) if auto else self.save_dtype

        local = {id(p) for p in getattr(self, "ep_params", [])}
        state = gather_trainable({n: p for n, p in self.named.items() if id(p) not in local}, self.rank,
                                 saved_dtype)
        if self.ep:  # every rank's selected copies, in the global config's order, with global expert ids
            from esft_core.tuning.expert_parallel import gather_selected

            state.update(gather_selected(self.model, self.expert_cfg, self.rank))
        if self.rank != 0:
            return None
        check_finite_params(state)
        state = {n: t.to(saved_dtype(n)) if t.is_floating_point() else t for n, t in state.items()}
        adapter = self.out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        if self.expert_cfg is not None:  # esft / random / shared: an ESFT adapter
            from esft_core.experts.adapters import save_adapter

            save_adapter(self.model, self.expert_cfg, adapter, self.fingerprint, state=state)
        else:
            self.model.save_pretrained(adapter, state_dict=state)
            if get_method(self.cfg.method).adapter == "checkpoint":
                self.tok.save_pretrained(adapter)
            else:
                write_json(adapter / "base_fingerprint.json", self.fingerprint)
        return adapter

    def evaluate(self) -> dict | None:
        """Rank 0 evaluates: the trained model itself, or under FSDP the base + the written adapter, loaded afresh."""
        if not self.cfg.eval_data:
            return None
        if self.rank != 0:
            self._barrier()
            return None
        from esft_core.evaluation.evaluate import evaluate_files, load_for_eval

        if self.world > 1:
            model, tok, _ = load_for_eval(self.cfg.model, str(self.out / "adapter"), device=self.device,
                                          dtype=self.dtype)
        else:
            model, tok = self.model, self.tok
        model.eval()
        model.config.use_cache = True  # generation wants the KV cache that activation checkpointing turned off
        result = evaluate_files(model, tok, self.cfg.eval_data, limit=self.cfg.eval_limit, seq_len=self.cfg.seq_len)
        write_json(self.out / "eval.json", result)
        if self.world > 1:
            self._barrier()
        return result

    def frozen_unchanged(self) -> bool:
        """Every rank's frozen weights (shards) are exactly as at setup (collective under FSDP)."""
        from esft_core.tuning.distributed import frozen_checksum

        same = torch.tensor(int(torch.equal(frozen_checksum(self.model), self.frozen_at_start)))
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(same, op=dist.ReduceOp.MIN)
        return bool(same)

    def rank_digests(self) -> list[str]:
        """Per rank: sha256 of evenly spaced samples of its (local shards of the) trainable weights, on CPU copies.

        Without FSDP there is one entry; under FSDP one per rank (the shards differ, so the digests do)."""
        import hashlib

        from esft_core.tuning.distributed import local

        h = hashlib.sha256()
        for n, p in self.named.items():
            flat = local(p.detach()).reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()  # small CPU copy
            h.update(n.encode())
            h.update(sample.numpy().tobytes())
        digest = h.hexdigest()[:16]
        if self.world == 1:
            return [digest]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, digest)
        return out

    def cleanup(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                with contextlib.suppress(RuntimeError):  # a rank that is gone must not hide this rank's own error
                    dist.barrier()
                dist.destroy_process_group()


def _on_sigterm():
    """SIGTERM (a job being cancelled) ends the run through the normal failure path, so run.json says so.

    Returns the previous handler (None when not on the main thread, where handlers cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise EsftError("terminated by SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """The whole recipe with run.json upkeep: status running → complete, or failed with the error message.

    Returns the final run.json content (rank 0). Errors before the run directory exists leave nothing behind.
    """
    from esft_core.tuning.methods import load_experts_cfg

    load_experts_cfg(cfg)
    preflight(cfg, resume)  # ranges, model positions, memory, eval files, resume state: before anything is written
    with RunDirLock(cfg.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        return _run_training(cfg, resume, progress)


def _run_training(cfg: TrainConfig, resume: bool, progress: bool) -> dict:
    recipe = Recipe(cfg, resume=resume, progress=progress)
    if resume and Path(cfg.out, "run.json").is_file():
        prev = json.loads(Path(cfg.out, "run.json").read_text())
        if prev.get("status") == "complete":
            check_out_dir(cfg, resume=True)
            return prev
    started = False
    previous = _on_sigterm()
    try:
        recipe.setup()
        started = True
        recipe.train()
        digests = recipe.rank_digests()
        frozen_ok = recipe.frozen_unchanged()
        adapter = recipe.save()
        evaluation = recipe.evaluate()
        if recipe.rank == 0:
            recipe._write_run("complete", adapter=str(adapter), eval=evaluation, rank_digests=digests,
                             frozen_unchanged=frozen_ok)
        return json.loads((recipe.out / "run.json").read_text()) if recipe.rank == 0 else {}
    except BaseException as e:
        if started and recipe.rank == 0:
            msg = str(e).splitlines()[0] if str(e) else ""
            if isinstance(e, KeyboardInterrupt):
                msg = "interrupted"
            elif not isinstance(e, EsftError):
                msg = f"{type(e).__name__}: {msg}".rstrip(": ")
            recipe._write_run("failed", error=msg, step_failed=recipe.step)
        raise
    finally:
        recipe.cleanup()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
