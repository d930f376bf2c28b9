"""The job runner: the process behind every background job (`python -m esft_core.workspace.job_runner run DIR`).

It runs a job's commands in order and writes the job's status.json as it goes (running, step, final state,
returncode, peak RSS); it knows nothing of what the commands do. A command whose first word is a key of the job's
`entries` (e.g. {"esft": "esft_core.cli:main"}, set by the launcher) runs in this process through that function,
so torch is imported once for a whole chain; any other command runs as a subprocess. SIGTERM (stop_job) unwinds
the running command (KeyboardInterrupt) and the job ends `stopped`.

`... job_runner standby WORKDIR PARENT_PID MODULE...` is a warm standby: it imports the modules, then waits for
start_job to hand it a job (see esft_core/workspace/jobs.py).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from esft_core import settings
from esft_core.files import read_json, write_json
from esft_core.workspace.jobs import STOP_FILE, last_error, list_jobs, standby_dir


def _resolve(entry: str) -> Callable[[list[str]], int]:
    """'package.module:function' → the function (a string, so this runner imports nothing above itself)."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _wait_for_queue(d: Path, spec: dict) -> None:
    """A job with meta['queue'] stays `queued` while an earlier job of the same queue (same workdir) is unfinished,
    so heavy jobs (training, routing shift) run one after another instead of fighting for the CPU/GPU."""
    queue = (spec.get("meta") or {}).get("queue")
    if not queue:
        return
    mine = (spec.get("created") or 0, d.name)
    while True:
        ahead = [j for j in list_jobs(d.parent.parent) if j.dir != d and j.meta.get("queue") == queue
                 and (read_json(j.dir / "job.json").get("created") or 0, j.dir.name) < mine and not j.done]
        if not ahead:
            return
        st = read_json(d / "status.json")
        if st.get("waiting_for") != ahead[0].id:
            st["waiting_for"] = ahead[0].id
            write_json(d / "status.json", st)
        time.sleep(0.5)


def _standby(workdir: Path, parent: int, preload: list[str]) -> int:
    """Import `preload` (ESFT_STANDBY_PRELOAD overrides it), then wait for a job handed over by start_job."""
    sd, me = standby_dir(workdir), os.getpid()
    if settings.is_set("ESFT_STANDBY_PRELOAD"):
        preload = settings.items("ESFT_STANDBY_PRELOAD")
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


def _run(d: Path) -> int:
    spec = read_json(d / "job.json")
    st = read_json(d / "status.json")
    entries = spec.get("entries") or {}

    def on_term(signum, frame):  # let the running command unwind (KeyboardInterrupt → the CLI returns 130)
        st.update(state="stopped", error="stopped by the user", finished=time.time())
        write_json(d / "status.json", st)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        _wait_for_queue(d, spec)
        st.update(state="running", pid=os.getpid(), started=time.time(), step=0)
        write_json(d / "status.json", st)
        for i, cmd in enumerate(spec.get("commands", [])):
            st["step"] = i
            write_json(d / "status.json", st)
            print(f"$ {' '.join(cmd)}", flush=True)
            entry = entries.get(cmd[0])
            if entry:  # in-process: the runner's imports (torch, once) serve every command of the chain
                rc = _resolve(entry)(cmd[1:])
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
    st = {**read_json(d / "status.json"), "returncode": rc, "finished": time.time(), "peak_rss": peak}
    if (d / STOP_FILE).exists():
        st.update(state="stopped", error="stopped by the user")
    if st.get("state") != "stopped":
        st["state"] = "complete" if rc == 0 else "failed"
        if rc != 0:
            st["error"] = last_error(d) or f"command exited with status {rc}"
    write_json(d / "status.json", st)
    return rc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(_run(Path(sys.argv[2])))
    if len(sys.argv) >= 4 and sys.argv[1] == "standby":
        sys.exit(_standby(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    print("usage: python -m esft_core.workspace.job_runner run JOB_DIR | standby WORKDIR PARENT_PID [MODULE ...]",
          file=sys.stderr)
    sys.exit(2)
