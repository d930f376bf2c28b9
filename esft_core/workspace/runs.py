"""Training runs as the explorer launches them: one directory per run with everything about it, and one reader.

    WORKDIR/runs/<name>/
      launch.json       the TrainConfig (as given), task, job id, baseline reference, created time
      expert_cfg.json   the expert config trained (esft/random), the authors' format
      train/            the `esft train --out` directory: run.json (status), metrics.jsonl, checkpoints/, adapter/,
                        eval.json (esft_core/tuning/train.py owns this layout)
      notes.json        the user's label, tags and notes (`annotate`); never touched by training
      routing_shift.json  written by the routing-shift job (`python -m esft_core.workspace.runs routing-shift
      RUN_DIR N`)
      evals/eval-<N>.json standalone evaluations of the finished adapter on N examples per file (`start_eval`)

`read_run` reconciles the recorded status with the job that runs it: a run whose job was stopped reads `stopped`,
and a run whose runner died (kill -9, OOM) does not stay `running` (it reads the job's failed state).
Torch-free except the routing-shift computation, which imports the model stack when it runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from esft_core.errors import EsftError
from esft_core.experts.expert_config import ExpertConfig
from esft_core.files import read_json, read_metrics, write_json
from esft_core.workspace import jobs

LAUNCH = "launch.json"
EXPERT_CFG = "expert_cfg.json"
TRAIN = "train"
SHIFT = "routing_shift.json"
NOTES = "notes.json"
EVALS = "evals"


def runs_root(workdir: str | Path) -> Path:
    return Path(workdir) / "runs"






def baseline_path(workdir: str | Path, model: str, files: list[str], limit: int, seq_len: int) -> Path:
    """Where the untuned model's evaluation on these files/settings is cached (shared by runs that match)."""
    key = hashlib.sha1(json.dumps([model, [str(f) for f in files], limit, seq_len]).encode()).hexdigest()[:12]
    return Path(workdir) / "baselines" / f"eval-{key}.json"


def new_run_dir(workdir: str | Path, task: str, method: str) -> Path:
    root = runs_root(workdir)
    root.mkdir(parents=True, exist_ok=True)
    base = time.strftime("%Y%m%d-%H%M%S") + f"-{task}-{method}"
    for i in range(1000):
        d = root / (base if i == 0 else f"{base}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise EsftError(f"cannot create a run directory under {root}")


def write_launch(run_dir: Path, config: dict, task: str, expert_cfg: ExpertConfig | None, baseline: Path | None,
                 job_id: str | None = None, selection: dict | None = None) -> None:
    """`selection`: how the experts were chosen ({'metric', 'normalize', 'p', 'contrast': [tasks], 'edited'}), shown
    as hyperparameter columns on the Results page; kept when the launch is rewritten (resume with new steps)."""
    if expert_cfg is not None:
        expert_cfg.save(run_dir / EXPERT_CFG)
    old = read_json(run_dir / LAUNCH)
    write_json(run_dir / LAUNCH, {"config": config, "task": task, "baseline": str(baseline) if baseline else None,
                              "job": job_id, "created": old.get("created") or time.time(),
                              "selection": selection if selection is not None else old.get("selection")})


def annotate(run_dir: str | Path, label: str | None = None, tags: list[str] | None = None,
             notes: str | None = None) -> dict:
    """Set a run's display label, tags and notes (None leaves a field as it is); stored in the run's notes.json.
    A label must be one line of at most 80 characters."""
    d = Path(run_dir)
    if not (d / LAUNCH).is_file():
        raise EsftError(f"{d} is not a training run directory (no {LAUNCH})")
    cur = read_json(d / NOTES)
    if label is not None:
        label = label.strip()
        if "\n" in label or len(label) > 80:
            raise EsftError(f"run label {label[:40]!r}… must be one line of at most 80 characters")
        cur["label"] = label
    if tags is not None:
        cur["tags"] = sorted({t.strip() for t in tags if t.strip()})
    if notes is not None:
        cur["notes"] = notes
    write_json(d / NOTES, cur)
    return cur


def delete_run(run_dir: str | Path) -> None:
    """Remove a finished run's directory (checkpoints, adapter, notes). A running run is refused: stop it first."""
    import shutil

    info = read_run(run_dir)
    if not (info.dir / LAUNCH).is_file():
        raise EsftError(f"{info.dir} is not a training run directory (no {LAUNCH})")
    job_state = jobs.job_status(info.job).get("state") if info.job else None
    if job_state in ("running", "queued"):  # only a live job blocks; a launch without a job can go
        raise EsftError(f"run {info.name} is {job_state}; stop it before deleting it")
    shutil.rmtree(info.dir)


def set_job(run_dir: Path, job: jobs.Job) -> None:
    launch = read_json(run_dir / LAUNCH)
    launch["job"] = str(job.dir)
    write_json(run_dir / LAUNCH, launch)


@dataclass
class RunInfo:
    """Everything about one run, read from its directory (and reconciled with its job)."""

    dir: Path
    launch: dict
    run: dict  # train/run.json as train.py wrote it
    status: str  # queued | running | complete | failed | stopped
    error: str | None
    metrics: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    peak_rss: int | None = None
    job: str | None = None

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def train_dir(self) -> Path:
        return self.dir / TRAIN

    @property
    def adapter_dir(self) -> Path:
        return self.dir / TRAIN / "adapter"

    @property
    def task(self) -> str:
        return self.launch.get("task", "")

    @property
    def config(self) -> dict:
        return self.launch.get("config", {})

    @property
    def expert_config(self) -> ExpertConfig | None:
        p = self.dir / EXPERT_CFG
        return ExpertConfig.load(p) if p.is_file() else None

    @property
    def adapter_bytes(self) -> int:
        p = self.adapter_dir
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    @property
    def routing_shift(self) -> dict:
        return read_json(self.dir / SHIFT)

    @property
    def extra_evals(self) -> dict[int, dict]:
        """{examples per file: eval JSON} of the standalone evaluations (start_eval), fewest examples first."""
        d = self.dir / EVALS
        found = {int(p.stem.split("-", 1)[1]): read_json(p) for p in d.glob("eval-*.json")} if d.is_dir() else {}
        return {n: ev for n, ev in sorted(found.items()) if ev}

    @property
    def notes(self) -> dict:
        """{'label', 'tags', 'notes'} as the user set them (annotate)."""
        return read_json(self.dir / NOTES)

    @property
    def label(self) -> str:
        return self.notes.get("label") or self.name

    @property
    def selection(self) -> dict:
        return self.launch.get("selection") or {}

    @property
    def method_label(self) -> str:
        """The paper's method names: ESFT-Token / ESFT-Gate (by the selection score), FFT, LoRA, random experts."""
        from esft_core.tuning.registry import method_label

        return method_label(self.config.get("method") or self.run.get("method"), self.selection)


def read_run(run_dir: str | Path) -> RunInfo:
    """The one reader of a run directory. Status: the job's final state wins over a run.json left `running` (a
    stopped job reads `stopped`, a dead runner `failed`); a job still running reads `running`."""
    d = Path(run_dir)
    launch = read_json(d / LAUNCH)
    run = read_json(d / TRAIN / "run.json")
    job_dir = launch.get("job")
    jst = jobs.job_status(job_dir) if job_dir else {}
    status, error = run.get("status") or "queued", run.get("error")
    if jst.get("state") == "stopped":
        status, error = "stopped", jst.get("error") or "stopped by the user"
    elif jst.get("state") == "failed" and status != "complete":
        status, error = "failed", error or jst.get("error")
    elif jst.get("state") in ("queued", "running") and status != "complete":
        status = jst["state"]  # queued: waiting behind another job of its queue
    elif not jst and status == "running":  # no job to ask (launched elsewhere): trust run.json
        pass
    ev = read_json(d / TRAIN / "eval.json") or run.get("eval") or {}
    return RunInfo(d, launch, run, status, error, read_metrics(d / TRAIN), ev,
                   read_json(Path(launch["baseline"])) if launch.get("baseline") else {}, jst.get("peak_rss"), job_dir)


def list_runs(workdir: str | Path) -> list[RunInfo]:
    """Runs newest first."""
    root = runs_root(workdir)
    if not root.is_dir():
        return []
    return [read_run(d) for d in sorted(root.iterdir(), reverse=True) if (d / LAUNCH).is_file()]


# -- routing shift (a background job: it loads two models) -----------------------------------------------------
def compute_routing_shift(run_dir: str | Path, n_prompts: int = 8, max_len: int = 256) -> dict:
    """Route the first `n_prompts` examples of the run's task eval data (else its training data) through the
    untuned and the tuned model; write and return {"data", "n", "rows": [...], "trained": {layer: [ids]}|None}."""
    from esft_core.data import encode_record, read_records
    from esft_core.evaluation.attribution import routing_shift
    from esft_core.evaluation.evaluate import load_for_eval
    from esft_core.models.loading import load_model

    info = read_run(run_dir)
    if info.status != "complete" or not info.adapter_dir.is_dir():
        raise EsftError(f"run {info.name} has no finished adapter (status {info.status})")
    cfg = info.config
    files = [f for f in cfg.get("eval_data") or [] if Path(f).is_file() and "general" not in Path(f).parts]
    data = files[0] if files else cfg.get("data")
    model = cfg.get("model", "demo")
    base, tok = load_model(model)
    tuned, _, _ = load_for_eval(model, str(info.train_dir))
    ids = [encode_record(rec, tok)[0][:max_len] for rec in read_records(data, limit=n_prompts)]
    ec = info.expert_config
    trained = ec.experts if ec is not None else None
    out = {"data": data, "n": n_prompts, "rows": routing_shift(base, tuned, ids, trained),
           "trained": {str(k): v for k, v in trained.items()} if trained else None}
    write_json(Path(run_dir) / SHIFT, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "routing-shift":
        try:
            compute_routing_shift(sys.argv[2], int(sys.argv[3]))
        except EsftError as e:
            print(f"esft routing-shift: error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    print("usage: python -m esft_core.workspace.runs routing-shift RUN_DIR N_PROMPTS", file=sys.stderr)
    sys.exit(2)
