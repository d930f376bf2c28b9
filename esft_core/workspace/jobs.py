"""Background jobs, generic: a command chain run as a detached process with a status file and a log, so a page can
start one, poll it and stop it. What the commands are is the launchers' business (esft_core/workspace/launchers.py).

A job is a folder `WORKDIR/jobs/<id>/` holding
  job.json     what to run: kind, title, commands (argv lists), entries (a command's first word → the
               'module:function' the runner calls in-process), meta
  status.json  state (queued|running|complete|failed|stopped), pid, step (index of the running command),
               returncode, error (the command's one-line error), started/finished timestamps
  log.txt      stdout+stderr of every command (tqdm progress included)
The runner (`python -m esft_core.workspace.job_runner run DIR`) executes the commands in order in a new session
(process group), so `stop_job` can signal the whole group. A runner that died without writing a final state
(kill -9, OOM) is reported as failed by `job_status`. Jobs never touch earlier data themselves. No streamlit here.
"""

from __future__ import annotations

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
from esft_core.files import read_json, write_json
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
    entries: dict = field(default_factory=dict)

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


def jobs_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "jobs"


def start_job(workdir: str | Path, kind: str, commands: list[list[str]], title: str = "", meta: dict | None = None,
              env: dict | None = None, entries: dict[str, str] | None = None) -> Job:
    """Create the job folder and launch the detached runner; returns at once. `entries` maps a command's first word
    to a 'module:function' the runner calls in-process with the rest of the argv (esft_core/workspace/job_runner.py);
    other commands run as subprocesses."""
    if not commands or not all(isinstance(c, list) and c for c in commands):
        raise ValueError("a job needs at least one non-empty command")
    jid = time.strftime("%Y%m%d-%H%M%S") + f"-{kind}-{secrets.token_hex(3)}"
    d = jobs_dir(workdir) / jid
    d.mkdir(parents=True)
    write_json(d / "job.json", {"kind": kind, "title": title or kind, "commands": commands, "meta": meta or {},
                                "entries": entries or {}, "created": time.time()})
    write_json(d / "status.json", {"state": "queued", "created": time.time()})
    (d / "log.txt").touch()
    pid = _hand_to_standby(workdir, d) if env is None else None
    if pid is None:
        with open(d / "log.txt", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", RUNNER, "run", str(d)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=_env(env), cwd=str(Path(__file__).resolve().parent.parent))
            _reap(proc)
            pid = proc.pid
    st = read_json(d / "status.json")
    if st.get("state") == "queued":
        st["pid"] = pid
        write_json(d / "status.json", st)
    return load_job(d)


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
# ESFT_STANDBY=0 disables it; the caller names the modules to import (`preload`), ESFT_STANDBY_PRELOAD (comma-separated
# modules) overrides them.
RUNNER = "esft_core.workspace.job_runner"  # run as `python -m`: the runner imports only what a job names


def standby_dir(workdir: str | Path) -> Path:
    return jobs_dir(workdir) / ".standby"


def standby_enabled() -> bool:
    return settings.flag("ESFT_STANDBY")


def ensure_standby(workdir: str | Path, preload: tuple[str, ...] = ()) -> int | None:
    """Make sure one warm standby runner exists for `workdir` (spawn one if not); returns its pid. While a job runs,
    no new standby is spawned (its imports would steal CPU from the job)."""
    if not standby_enabled():
        return None
    sd = standby_dir(workdir)
    sd.mkdir(parents=True, exist_ok=True)
    for f in [*sd.glob("ready-*"), *sd.glob("starting-*")]:
        pid = int(f.name.split("-", 1)[1])
        if pid_alive(pid):
            return pid
        f.unlink(missing_ok=True)
    if active_jobs(workdir):
        return None
    proc = subprocess.Popen([sys.executable, "-m", RUNNER, "standby", str(workdir), str(os.getpid()), *preload],
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
    sd = standby_dir(workdir)
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


def load_job(d: str | Path) -> Job:
    d = Path(d)
    spec = read_json(d / "job.json")
    return Job(dir=d, kind=spec.get("kind", "?"), title=spec.get("title", ""), commands=spec.get("commands", []),
               meta=spec.get("meta", {}), status=job_status(d), entries=spec.get("entries") or {})


def job_status(d: str | Path) -> dict:
    """The status dict; a runner that vanished without a final state is reported as failed."""
    d = Path(d)
    st = read_json(d / "status.json")
    if st.get("state") in ("queued", "running") and st.get("pid") and not pid_alive(st["pid"]):
        time.sleep(0.05)  # the runner may be writing its final state right now
        st = read_json(d / "status.json")
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
    st = read_json(d / "status.json")
    if st.get("state") not in FINAL:
        st.update(state="stopped", finished=time.time(), error="stopped by the user")
        write_json(d / "status.json", st)
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


def log_progress(job: Job) -> tuple[float, str]:
    """(fraction done, label) of a command chain: finished commands plus the last tqdm bar of the running one."""
    n_cmd = max(len(job.commands), 1)
    step = int(job.status.get("step", 0) or 0)
    # transformers' "Loading weights: 100%" bar is not the job's work: only the bars after it count
    tail = "\n".join(ln for ln in log_tail(job, 600).replace("\r", "\n").splitlines() if "Loading weights" not in ln)
    found = list(_TQDM.finditer(tail))
    m = found[-1] if found else None
    frac_cmd = (int(m.group(1)) / max(int(m.group(2)), 1)) if m else 0.0
    cmd = job.commands[step] if step < len(job.commands) else []
    what = cmd[1] if len(cmd) > 1 and cmd[0] in job.entries else job.kind  # `esft record`, else e.g. "shift"
    label = f"command {step + 1}/{n_cmd} ({what})"
    if m:
        label += f" · {m.group(1)}/{m.group(2)}"
    return min((step + frac_cmd) / n_cmd, 1.0), label
