"""Launchers: the background jobs the explorer starts — record, import, train (new or resumed), evaluate a run,
routing shift, attribution — each built as `esft ...` argv on the generic job runner (esft_core/workspace/jobs.py),
with the run-directory bookkeeping of esft_core/workspace/runs.py. `progress` reads a job's progress the way its
kind reports it (training: metrics.jsonl steps; others: tqdm in the log). No streamlit here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from esft_core.errors import EsftError
from esft_core.files import read_metrics, write_json
from esft_core.workspace import jobs, runs
from esft_core.workspace.jobs import Job

# `esft ...` commands run in the runner's process (torch imported once for a chain, e.g. six demo recordings)
IN_PROCESS_ENTRIES = {"esft": "esft_core.cli:main"}
# what a warm standby imports before a job arrives (ESFT_STANDBY_PRELOAD overrides it)
STANDBY_PRELOAD = ("torch", "transformers", "esft_core.cli", "esft_core.tuning.train", "esft_core.traces.record",
                   "esft_core.evaluation.evaluate")


def start_esft_job(workdir: str | Path, kind: str, commands: list[list[str]], **kw) -> Job:
    """jobs.start_job with `esft ...` commands run in-process (the other commands as subprocesses)."""
    return jobs.start_job(workdir, kind, commands, entries=IN_PROCESS_ENTRIES, **kw)


def ensure_standby(workdir: str | Path) -> int | None:
    """One warm runner for `workdir` that has imported the torch stack (Train → first loss point seconds sooner)."""
    return jobs.ensure_standby(workdir, STANDBY_PRELOAD)


def progress(job: Job) -> tuple[float | None, str]:
    """(fraction done or None, one-line description). Training: steps from metrics.jsonl; recording: tqdm in log."""
    n_cmd = max(len(job.commands), 1)
    step = int(job.status.get("step", 0) or 0)
    if job.state == "complete":
        return 1.0, "done"
    if job.state == "queued" and job.status.get("waiting_for"):
        return 0.0, f"queued behind job {job.status['waiting_for']}"
    if job.kind == "train" and job.meta.get("out"):
        rows = read_metrics(job.meta["out"])
        total = int(job.meta.get("steps") or 0)
        if rows and total:
            s = int(rows[-1].get("step", len(rows)))
            label = f"step {s}/{total} · loss {rows[-1].get('loss', float('nan')):.4f}"
            elapsed = rows[-1].get("elapsed")
            if elapsed and 0 < s < total:  # ETA from the mean step time so far (evaluation afterwards not included)
                label += f" · ETA {elapsed / s * (total - s):.0f} s"
            return min(s / total, 1.0), label
        if step > 0:
            return None, f"evaluating ({step}/{n_cmd - 1})"
        return 0.0, "starting"
    return jobs.log_progress(job)


@dataclass
class RecordRequest:
    """One `esft record` of a job (the fields of its CLI flags)."""

    model: str = field(metadata={"help": "base model: 'demo', a directory or a hub id"})
    data: str = field(metadata={"help": "JSONL/Parquet records to route"})
    task: str = field(metadata={"help": "task name the run is stored under"})
    db: str = field(metadata={"help": "trace database"})
    max_tokens: int = field(default=8192, metadata={"help": "token budget"})
    seq_len: int = field(default=512, metadata={"help": "sequence length"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})

    def argv(self) -> list[str]:
        return ["esft", "record", "--model", self.model, "--data", str(self.data), "--task", self.task,
                "--db", str(self.db), "--max-tokens", str(int(self.max_tokens)), "--seq-len", str(int(self.seq_len)),
                "--batch-size", str(int(self.batch_size))]


def start_record(workdir: str | Path, requests: list[RecordRequest], title: str = "", meta: dict | None = None) -> Job:
    """A job recording one or more tasks, in order (one runner, torch imported once)."""
    if not requests:
        raise ValueError("nothing to record")
    dbs = {str(r.db) for r in requests}
    meta = {"db": next(iter(dbs)), "tasks": [r.task for r in requests], "task": requests[0].task, **(meta or {})}
    return start_esft_job(workdir, "record", [r.argv() for r in requests],
                     title=title or f"Recording '{requests[0].task}' on {requests[0].model}", meta=meta)


def start_import(workdir: str | Path, log_dir: str | Path, task: str, db: str | Path) -> Job:
    """A job importing the authors' routing logs (`esft import-official`)."""
    argv = ["esft", "import-official", str(log_dir), "--task", task, "--db", str(db)]
    return start_esft_job(workdir, "import", [argv],
                     title=f"Importing authors' logs as '{task}'", meta={"db": str(db), "task": task})


def train_argv(cfg, resume: bool = False) -> list[str]:
    """`esft train` argv from a TrainConfig (or its asdict): every set field as its CLI flag (lists as nargs)."""
    import dataclasses

    config = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    argv = ["esft", "train"]
    for k, v in config.items():
        if k == "experts_cfg" or v is None or v == []:  # experts_cfg: filled in by the trainer from --experts
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):  # --[no-]flag (argparse.BooleanOptionalAction)
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return argv + (["--resume"] if resume else []) + ["--no-progress"]


def start_training(workdir: str | Path, cfg, task: str, expert_cfg=None,
                   eval_baseline: bool = True, selection: dict | None = None) -> tuple[Job, Path]:
    """Launch `esft train` for `cfg` (a TrainConfig) in a new run directory (esft_core/workspace/runs.py layout);
    with eval data
    and `eval_baseline`, the untuned model is evaluated on the same files first unless cached. Returns (job, run
    dir). `cfg.out` and (with an expert config) `cfg.experts` are set to paths inside the run directory."""
    run_dir = runs.new_run_dir(workdir, task, cfg.method)
    cfg.out = str(run_dir / runs.TRAIN)
    if expert_cfg is not None:
        cfg.experts = str(run_dir / runs.EXPERT_CFG)
    base = None
    cmds = [train_argv(cfg)]
    if cfg.eval_data and eval_baseline:
        base = runs.baseline_path(workdir, cfg.model, cfg.eval_data, cfg.eval_limit, cfg.seq_len)
        if not base.exists():
            base.parent.mkdir(parents=True, exist_ok=True)
            cmds.append(["esft", "eval", "--model", cfg.model, "--data", *map(str, cfg.eval_data), "--limit",
                         str(cfg.eval_limit), "--seq-len", str(cfg.seq_len), "--out", str(base)])
    import dataclasses

    runs.write_launch(run_dir, dataclasses.asdict(cfg), task, expert_cfg, base, selection=selection)
    meta = {"out": cfg.out, "run": str(run_dir), "steps": cfg.steps, "task": task, "method": cfg.method,
            "model": cfg.model, "baseline": str(base) if base else None, "queue": "compute"}
    job = start_esft_job(workdir, "train", cmds, title=f"{cfg.method} on {task} ({cfg.steps} steps)", meta=meta)
    runs.set_job(run_dir, job)
    return job, run_dir


def resume_training(workdir: str | Path, run_dir: str | Path, steps: int | None = None) -> Job:
    """Continue a stopped or failed run from its last checkpoint (`esft train --resume`), as a new job; `steps`
    changes the run's total step count (not part of a run's identity)."""
    info = runs.read_run(run_dir)
    if info.status in ("running", "queued", "complete"):
        raise EsftError(f"run {info.name} is {info.status}; only stopped or failed runs can be resumed")
    config = {**info.config, **({"steps": int(steps)} if steps else {})}
    if steps:
        runs.write_launch(info.dir, config, info.task, None, Path(info.launch["baseline"])
                          if info.launch.get("baseline") else None, info.job)
    argv = train_argv(config, resume=True)
    job = start_esft_job(workdir, "train", [argv], title=f"resume {info.name}",
                    meta={"out": str(info.train_dir), "run": str(info.dir), "steps": config.get("steps"),
                          "task": info.task, "method": config.get("method"), "model": config.get("model"),
                          "baseline": info.launch.get("baseline"), "queue": "compute"})
    runs.set_job(Path(run_dir), job)
    return job


def start_routing_shift(workdir: str | Path, run_dir: str | Path, n_prompts: int = 8) -> Job:
    """Route the run's eval prompts through the untuned and tuned models in a background job; the result lands in
    the run directory (runs.RunInfo.routing_shift)."""
    argv = [sys.executable, "-m", "esft_core.workspace.runs", "routing-shift", str(run_dir), str(int(n_prompts))]
    return jobs.start_job(workdir, "shift", [argv], title=f"Routing shift of {Path(run_dir).name}",
                          meta={"run": str(run_dir), "n": int(n_prompts), "queue": "compute"})


@dataclass
class AttributionRequest:
    """One router-logit attribution (esft_core/evaluation/attribution.py) to compute in a background job."""

    model: str = field(metadata={"help": "model whose router is explained: 'demo', a directory or a hub id"})
    input_ids: list[int] = field(metadata={"help": "token ids of the sample (at least up to the target position)"})
    layer: int = field(metadata={"help": "MoE layer of the router"})
    expert: int = field(metadata={"help": "expert whose router logit is explained"})
    target: int = field(metadata={"help": "position whose router logit is explained"})
    n_steps: int = field(default=64, metadata={"help": "integration steps (more: smaller completeness error)"})

    def path(self, workdir: str | Path) -> Path:
        """Where the result lands: WORKDIR/attribution/<hash of the request>.json (same request → same file)."""
        import dataclasses
        import hashlib

        key = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return Path(workdir) / "attribution" / f"{key}.json"


def start_attribution(workdir: str | Path, req: AttributionRequest, meta: dict | None = None) -> Job:
    """Compute `req` in a background job (`python -m esft_core.evaluation.attribution REQUEST.json OUT.json`); the
    result JSON
    (attribution.Attribution's fields) lands at `req.path(workdir)`, meta['out']."""
    import dataclasses

    out = req.path(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".request.json")
    write_json(spec, dataclasses.asdict(req))
    argv = [sys.executable, "-m", "esft_core.evaluation.attribution", str(spec), str(out)]
    return jobs.start_job(workdir, "attribution", [argv],
                          title=f"Attribution of layer {req.layer} expert {req.expert} at position {req.target}",
                          meta={"out": str(out), "queue": "compute", **(meta or {})})


# -- standalone evaluation of a finished run ----------------------------------------------------
def start_eval(workdir: str | Path, run_dir: str | Path, limit: int) -> Job:
    """Evaluate the run's finished adapter on its eval files (task eval set, general held-out) with `limit` examples
    per file, as an `esft eval` job; the result lands in RUN_DIR/evals/eval-<limit>.json (RunInfo.extra_evals)."""
    info = runs.read_run(run_dir)
    if info.status != "complete" or not info.adapter_dir.is_dir():
        raise EsftError(f"run {info.name} has no finished adapter (status {info.status})")
    files = [str(f) for f in info.config.get("eval_data") or []]
    if not files:
        raise EsftError(f"run {info.name} was trained without --eval-data; there is nothing to evaluate it on")
    if int(limit) <= 0:
        raise EsftError(f"examples per file must be a positive integer, got {limit}")
    (info.dir / runs.EVALS).mkdir(exist_ok=True)
    out = info.dir / runs.EVALS / f"eval-{int(limit)}.json"
    cmd = ["esft", "eval", "--model", info.config.get("model", "demo"), "--adapter", str(info.train_dir), "--data",
           *files, "--limit", str(int(limit)), "--out", str(out), "--force"]
    if info.config.get("seq_len"):
        cmd += ["--seq-len", str(info.config["seq_len"])]
    return start_esft_job(workdir, "eval", [cmd], title=f"Evaluate {info.label} on {int(limit)} examples per file",
                          meta={"run": str(info.dir), "limit": int(limit), "out": str(out), "queue": "compute"})
