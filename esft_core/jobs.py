"""Background jobs for the explorer: run `esft record` / `esft import-official` / `esft train` / `esft eval` as a
detached process with a status file, a log and progress, so a Streamlit page can start one, poll it and stop it.

A job is a folder `WORKDIR/jobs/<id>/` holding
  job.json     what to run: kind, title, commands (argv lists; `esft ...` runs in-process in the runner), meta
  status.json  state (queued|running|complete|failed|stopped), pid, step (index of the running command),
               returncode, error (the command's one-line error), started/finished timestamps
  log.txt      stdout+stderr of every command (tqdm progress included)
The runner (`python -m esft_core.jobs run DIR`) executes the commands in order in a new session (process group), so
`stop_job` can signal the whole group. Importing torch once for a chain of `esft` commands (e.g. recording six demo
tasks) saves seconds per command. A runner that died without writing a final state (kill -9, OOM) is reported as
failed by `job_status`. Jobs never touch earlier data themselves: a failed recording leaves the DB as the recorder's
crash safety leaves it (earlier runs intact), a failed training leaves other run directories alone.
No streamlit here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from esft_core import settings
from esft_core.procs import pid_alive

STATES = ("queued", "running", "complete", "failed", "stopped")
FINAL = ("complete", "failed", "stopped")
STOP_FILE = "stop-requested"  # written by stop_job before it signals the runner
_TQDM = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "12/40 [00:03<..." progress fragment


@dataclass
class Job:
    """A background job as read from its folder."""

    dir: Path
    kind: str
    title: str
    commands: list[list[str]]
    meta: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def state(self) -> str:
        return self.status.get("state", "queued")

    @property
    def error(self) -> str | None:
        return self.status.get("error")

    @property
    def done(self) -> bool:
        return self.state in FINAL


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # atomic: readers never see half a file


def _read_json(path: Path) -> dict:
    for _ in range(3):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            time.sleep(0.01)
    return {}


def jobs_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "jobs"


def start_job(workdir: str | Path, kind: str, commands: list[list[str]], title: str = "", meta: dict | None = None,
              env: dict | None = None) -> Job:
    """Create the job folder and launch the detached runner; returns at once."""
    if not commands or not all(isinstance(c, list) and c for c in commands):
        raise ValueError("a job needs at least one non-empty command")
    jid = time.strftime("%Y%m%d-%H%M%S") + f"-{kind}-{secrets.token_hex(3)}"
    d = jobs_dir(workdir) / jid
    d.mkdir(parents=True)
    _write_json(d / "job.json", {"kind": kind, "title": title or kind, "commands": commands, "meta": meta or {},
                                 "created": time.time()})
    _write_json(d / "status.json", {"state": "queued", "created": time.time()})
    (d / "log.txt").touch()
    pid = _hand_to_standby(workdir, d) if env is None else None
    if pid is None:
        with open(d / "log.txt", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "esft_core.jobs", "run", str(d)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=_env(env), cwd=str(Path(__file__).resolve().parent.parent))
            _reap(proc)
            pid = proc.pid
    st = _read_json(d / "status.json")
    if st.get("state") == "queued":
        st["pid"] = pid
        _write_json(d / "status.json", st)
    return load_job(d)


def _wait_for_queue(d: Path, spec: dict) -> None:
    """A job with meta['queue'] stays `queued` while an earlier job of the same queue (same workdir) is unfinished,
    so heavy jobs (training, routing shift) run one after another instead of fighting for the CPU/GPU."""
    queue = (spec.get("meta") or {}).get("queue")
    if not queue:
        return
    mine = (spec.get("created") or 0, d.name)
    while True:
        ahead = [j for j in list_jobs(d.parent.parent) if j.dir != d and j.meta.get("queue") == queue
                 and (_read_json(j.dir / "job.json").get("created") or 0, j.dir.name) < mine and not j.done]
        if not ahead:
            return
        st = _read_json(d / "status.json")
        if st.get("waiting_for") != ahead[0].id:
            st["waiting_for"] = ahead[0].id
            _write_json(d / "status.json", st)
        time.sleep(0.5)


def _env(extra: dict | None = None) -> dict:
    e = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Torch threads of job processes (ESFT_JOB_THREADS, default 1): on a small CPU shared with the UI, one thread
    # records the demo ~2x faster than two (measured: 1.6 s vs 3.0 s for 2k tokens); raise it on a big machine.
    e["OMP_NUM_THREADS"] = settings.get("ESFT_JOB_THREADS")
    return e


# ------------------------------------------------------------------------------------------------- warm standby
# Importing torch + transformers takes 5-15 s on a small shared CPU, most of the wait between pressing Train and the
# first loss point. A page can keep one *standby* runner warm: it imports the heavy modules, then waits for a job.
# `start_job` hands the job to a ready standby (an atomic rename claims it) or spawns a cold runner otherwise.
# A standby exits when its parent (the Streamlit server) goes away or after ESFT_STANDBY_IDLE_S (default 900 s).
# ESFT_STANDBY=0 disables it; ESFT_STANDBY_PRELOAD (comma-separated modules) overrides what it imports.
STANDBY_PRELOAD = ("torch", "transformers", "esft_core.cli", "esft_core.train", "esft_core.record",
                   "esft_core.evaluate")


def _standby_dir(workdir: str | Path) -> Path:
    return jobs_dir(workdir) / ".standby"


def standby_enabled() -> bool:
    return settings.flag("ESFT_STANDBY")


def ensure_standby(workdir: str | Path) -> int | None:
    """Make sure one warm standby runner exists for `workdir` (spawn one if not); returns its pid. While a job runs,
    no new standby is spawned (its imports would steal CPU from the job)."""
    if not standby_enabled():
        return None
    sd = _standby_dir(workdir)
    sd.mkdir(parents=True, exist_ok=True)
    for f in [*sd.glob("ready-*"), *sd.glob("starting-*")]:
        pid = int(f.name.split("-", 1)[1])
        if pid_alive(pid):
            return pid
        f.unlink(missing_ok=True)
    if active_jobs(workdir):
        return None
    proc = subprocess.Popen([sys.executable, "-m", "esft_core.jobs", "standby", str(workdir), str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=_env(), cwd=str(Path(__file__).resolve().parent.parent))
    _reap(proc)
    (sd / f"starting-{proc.pid}").touch()
    return proc.pid


def _reap(proc: subprocess.Popen) -> None:
    """Wait for a detached child in a daemon thread, so a long-lived parent (the Streamlit server) keeps no defunct
    (zombie) entry once the runner exits."""
    import threading

    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def _hand_to_standby(workdir: str | Path, d: Path) -> int | None:
    if not standby_enabled():
        return None
    sd = _standby_dir(workdir)
    for f in sorted(sd.glob("ready-*")) if sd.is_dir() else []:
        pid = int(f.name.split("-", 1)[1])
        if not pid_alive(pid):
            f.unlink(missing_ok=True)
            continue
        try:
            os.rename(f, sd / f"claimed-{pid}")  # atomic: only one caller wins this standby
        except FileNotFoundError:
            continue
        tmp = sd / f".job-{pid}.tmp"
        tmp.write_text(str(d))
        os.replace(tmp, sd / f"job-{pid}")
        return pid
    return None


def _standby(workdir: Path, parent: int) -> int:
    import importlib

    sd, me = _standby_dir(workdir), os.getpid()
    preload = settings.items("ESFT_STANDBY_PRELOAD") if settings.is_set("ESFT_STANDBY_PRELOAD") else STANDBY_PRELOAD
    for mod in preload:
        if mod:
            importlib.import_module(mod)
    if (sd / f"starting-{me}").exists():
        os.replace(sd / f"starting-{me}", sd / f"ready-{me}")
    else:
        (sd / f"ready-{me}").touch()
    idle = settings.number("ESFT_STANDBY_IDLE_S")
    t0 = time.monotonic()
    while True:
        jf = sd / f"job-{me}"
        if jf.exists():
            d = Path(jf.read_text().strip())
            jf.unlink(missing_ok=True)
            (sd / f"claimed-{me}").unlink(missing_ok=True)
            log = open(d / "log.txt", "ab")  # noqa: SIM115 - becomes this process's stdout/stderr until exit
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            return _run(d)
        if os.getppid() != parent or time.monotonic() - t0 > idle:
            if not (sd / f"claimed-{me}").exists():
                (sd / f"ready-{me}").unlink(missing_ok=True)
                return 0
        time.sleep(0.05)


def load_job(d: str | Path) -> Job:
    d = Path(d)
    spec = _read_json(d / "job.json")
    return Job(dir=d, kind=spec.get("kind", "?"), title=spec.get("title", ""), commands=spec.get("commands", []),
               meta=spec.get("meta", {}), status=job_status(d))


def job_status(d: str | Path) -> dict:
    """The status dict; a runner that vanished without a final state is reported as failed."""
    d = Path(d)
    st = _read_json(d / "status.json")
    if st.get("state") in ("queued", "running") and st.get("pid") and not pid_alive(st["pid"]):
        time.sleep(0.05)  # the runner may be writing its final state right now
        st = _read_json(d / "status.json")
        if st.get("state") in ("queued", "running"):
            if (d / STOP_FILE).exists():  # stopped, and the runner was killed before it wrote that down
                st.update(state="stopped", error="stopped by the user", finished=st.get("finished") or time.time())
            else:
                st.update(state="failed", error=st.get("error") or last_error(d) or "the job process died unexpectedly",
                          finished=st.get("finished") or time.time())
    return st


def list_jobs(workdir: str | Path, kind: str | None = None) -> list[Job]:
    """Jobs newest first (optionally of one kind)."""
    root = jobs_dir(workdir)
    if not root.exists():
        return []
    out = [load_job(d) for d in sorted(root.iterdir(), reverse=True) if (d / "job.json").exists()]
    return [j for j in out if kind is None or j.kind == kind]


def active_jobs(workdir: str | Path) -> list[Job]:
    return [j for j in list_jobs(workdir) if not j.done]


def stop_job(job: Job | str | Path, grace_s: float = 5.0) -> dict:
    """SIGTERM the job's process group (the `esft` commands exit cleanly on it), SIGKILL after `grace_s`."""
    d = job.dir if isinstance(job, Job) else Path(job)
    st = job_status(d)
    pid = st.get("pid")
    if st.get("state") in FINAL or not pid:
        return st
    # the marker, not the signal handler, makes the final state `stopped`: the running command (e.g. training) may
    # install its own SIGTERM handler and end through its failure path
    (d / STOP_FILE).write_text(str(time.time()))
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    st = _read_json(d / "status.json")
    if st.get("state") not in FINAL:
        st.update(state="stopped", finished=time.time(), error="stopped by the user")
        _write_json(d / "status.json", st)
    return st


def log_tail(job: Job | str | Path, n_chars: int = 4000) -> str:
    """The end of the job's log with tqdm carriage-return updates collapsed to their last state."""
    d = job.dir if isinstance(job, Job) else Path(job)
    try:
        with open(d / "log.txt", "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * n_chars))
            raw = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    lines = [ln.split("\r")[-1] for ln in raw.split("\n")]
    return "\n".join(lines)[-n_chars:]


def last_error(d: str | Path) -> str | None:
    """The last line of the log that looks like an error (the CLI prints `esft <cmd>: error: ...`)."""
    text = log_tail(d, 20000)
    for line in reversed(text.splitlines()):
        s = line.strip()
        if s.startswith("esft ") and ": error:" in s or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", s):
            return s
    return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of DIR/metrics.jsonl written so far (a half-written last line is skipped)."""
    rows = []
    try:
        with open(Path(run_dir) / "metrics.jsonl") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


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
    # transformers' "Loading weights: 100%" bar is not the job's work: only the bars after it count
    tail = "\n".join(ln for ln in log_tail(job, 600).replace("\r", "\n").splitlines() if "Loading weights" not in ln)
    found = list(_TQDM.finditer(tail))
    m = found[-1] if found else None
    frac_cmd = (int(m.group(1)) / max(int(m.group(2)), 1)) if m else 0.0
    cmd = job.commands[step] if step < len(job.commands) else []
    what = cmd[1] if len(cmd) > 1 and cmd[0] == "esft" else job.kind  # `esft record`, else e.g. "shift"
    label = f"command {step + 1}/{n_cmd} ({what})"
    if m:
        label += f" · {m.group(1)}/{m.group(2)}"
    return min((step + frac_cmd) / n_cmd, 1.0), label


def cli_options(command: str) -> set[str]:
    """The option strings (e.g. '--steps') the installed `esft <command>` accepts; empty when it does not exist."""
    from esft_core.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers in a private list; there is no public accessor
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and command in choices:
            return {s for a in choices[command]._actions for s in a.option_strings}
    return set()


# ---------------------------------------------------------------------------------------------------- launchers
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
    return start_job(workdir, "record", [r.argv() for r in requests],
                     title=title or f"Recording '{requests[0].task}' on {requests[0].model}", meta=meta)


def start_import(workdir: str | Path, log_dir: str | Path, task: str, db: str | Path) -> Job:
    """A job importing the authors' routing logs (`esft import-official`)."""
    return start_job(workdir, "import", [["esft", "import-official", str(log_dir), "--task", task, "--db", str(db)]],
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
    """Launch `esft train` for `cfg` (a TrainConfig) in a new run directory (esft_core/runs.py layout); with eval data
    and `eval_baseline`, the untuned model is evaluated on the same files first unless cached. Returns (job, run
    dir). `cfg.out` and (with an expert config) `cfg.experts` are set to paths inside the run directory."""
    from esft_core import runs

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
    job = start_job(workdir, "train", cmds, title=f"{cfg.method} on {task} ({cfg.steps} steps)", meta=meta)
    runs.set_job(run_dir, job)
    return job, run_dir


def resume_training(workdir: str | Path, run_dir: str | Path, steps: int | None = None) -> Job:
    """Continue a stopped or failed run from its last checkpoint (`esft train --resume`), as a new job; `steps`
    changes the run's total step count (not part of a run's identity)."""
    from esft_core import runs
    from esft_core.errors import EsftError

    info = runs.read_run(run_dir)
    if info.status in ("running", "queued", "complete"):
        raise EsftError(f"run {info.name} is {info.status}; only stopped or failed runs can be resumed")
    config = {**info.config, **({"steps": int(steps)} if steps else {})}
    if steps:
        runs.write_launch(info.dir, config, info.task, None, Path(info.launch["baseline"])
                          if info.launch.get("baseline") else None, info.job)
    argv = train_argv(config, resume=True)
    job = start_job(workdir, "train", [argv], title=f"resume {info.name}",
                    meta={"out": str(info.train_dir), "run": str(info.dir), "steps": config.get("steps"),
                          "task": info.task, "method": config.get("method"), "model": config.get("model"),
                          "baseline": info.launch.get("baseline"), "queue": "compute"})
    runs.set_job(Path(run_dir), job)
    return job


def start_routing_shift(workdir: str | Path, run_dir: str | Path, n_prompts: int = 8) -> Job:
    """Route the run's eval prompts through the untuned and tuned models in a background job; the result lands in
    the run directory (runs.RunInfo.routing_shift)."""
    return start_job(workdir, "shift", [[sys.executable, "-m", "esft_core.runs", "routing-shift", str(run_dir),
                                         str(int(n_prompts))]],
                     title=f"Routing shift of {Path(run_dir).name}",
                     meta={"run": str(run_dir), "n": int(n_prompts), "queue": "compute"})


@dataclass
class AttributionRequest:
    """One router-logit attribution (esft_core/attribution.py) to compute in a background job."""

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
    """Compute `req` in a background job (`python -m esft_core.attribution REQUEST.json OUT.json`); the result JSON
    (attribution.Attribution's fields) lands at `req.path(workdir)`, meta['out']."""
    import dataclasses

    out = req.path(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".request.json")
    _write_json(spec, dataclasses.asdict(req))
    return start_job(workdir, "attribution", [[sys.executable, "-m", "esft_core.attribution", str(spec), str(out)]],
                     title=f"Attribution of layer {req.layer} expert {req.expert} at position {req.target}",
                     meta={"out": str(out), "queue": "compute", **(meta or {})})


# ------------------------------------------------------------------------------------------------------- the runner
def _run(d: Path) -> int:
    spec = _read_json(d / "job.json")
    st = _read_json(d / "status.json")

    def on_term(signum, frame):  # let the running command unwind (KeyboardInterrupt → the CLI returns 130)
        st.update(state="stopped", error="stopped by the user", finished=time.time())
        _write_json(d / "status.json", st)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        _wait_for_queue(d, spec)
        st.update(state="running", pid=os.getpid(), started=time.time(), step=0)
        _write_json(d / "status.json", st)
        for i, cmd in enumerate(spec.get("commands", [])):
            st["step"] = i
            _write_json(d / "status.json", st)
            print(f"$ {' '.join(cmd)}", flush=True)
            if cmd[0] == "esft":
                from esft_core.cli import main as esft_main

                rc = esft_main(cmd[1:])
            else:
                rc = subprocess.call(cmd)
            sys.stdout.flush()
            sys.stderr.flush()
            if rc != 0:
                break
    except KeyboardInterrupt:
        rc = 130
    except BaseException as e:  # noqa: BLE001 - the runner must always leave a final state
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        rc = 1
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    st = {**_read_json(d / "status.json"), "returncode": rc, "finished": time.time(), "peak_rss": peak}
    if (d / STOP_FILE).exists():
        st.update(state="stopped", error="stopped by the user")
    if st.get("state") != "stopped":
        st["state"] = "complete" if rc == 0 else "failed"
        if rc != 0:
            st["error"] = last_error(d) or f"command exited with status {rc}"
    _write_json(d / "status.json", st)
    return rc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(_run(Path(sys.argv[2])))
    if len(sys.argv) == 4 and sys.argv[1] == "standby":
        sys.exit(_standby(Path(sys.argv[2]), int(sys.argv[3])))
    print("usage: python -m esft_core.jobs run JOB_DIR", file=sys.stderr)
    sys.exit(2)
