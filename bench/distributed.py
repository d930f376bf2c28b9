"""FSDP2 on the CPU: 1 process vs 2 ranks (torchrun, gloo) on the demo model, same global batch.

Both runs are real `esft train` commands (fresh processes): the single process takes batch B x grad-accum 2, the two
ranks take batch B each (one global batch of 2B sequences per step, the same rows in the same order), so their loss
curves must agree up to float32 reduction order. Each method (fft, esft) runs both ways. Per-rank peak memory is the
resident set size of each rank sampled every 20 ms from /proc (the launcher's own memory excluded); tokens/s is the
global throughput from metrics.jsonl (steps 2..N).

    python bench/distributed.py [--steps 8] [--batch-size 2] [--seq-len 256]

Last stdout line (JSON): per_rank_peak_ratio (FFT: max rank peak over the single process's peak), max_loss_diff
(over both methods and all steps), tokens_per_s for each run, and the same figures for ESFT. On the 4.8 M-parameter
demo the runtime (interpreter + torch + transformers, measured alone) dominates a process's memory, so the ratio net
of it (`per_rank_peak_ratio_net`) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tasks" / "law" / "train.jsonl"
CFG = {"experts": {"1": [0, 1, 2], "2": [3, 4], "3": [5, 6], "4": [7, 8, 9]}, "shared_experts": False,
       "non_expert_modules": False}


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def run(cmd: list[str], ranks: int) -> tuple[list[int], float]:
    """Run `cmd`; peak RSS of each training process (the launcher's python children under torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            pids = _children(proc.pid) if ranks > 1 else [proc.pid]
            for p in pids:
                peaks[p] = max(peaks.get(p, 0), _rss(p))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
    return sorted(peaks.values(), reverse=True)[:ranks], time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    out: dict = {}
    # the runtime alone (interpreter, torch, transformers, peft, esft_core): subtracted for the *_net ratios
    (base,), _ = run([sys.executable, "-c", "import torch.distributed.fsdp, transformers, peft; "
                      "import esft_core.tuning.train; "
                      "from transformers import AutoModelForCausalLM; import time; time.sleep(1)"], 1)
    print(f"runtime baseline RSS {base / 2**20:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "cfg.json"
        cfg.write_text(json.dumps(CFG))
        for method in ("fft", "esft"):
            common = ["train", "--model", "demo", "--data", str(DATA), "--method", method, "--steps", str(a.steps),
                      "--seq-len", str(a.seq_len), "--lr", "1e-3", "--no-progress"]
            if method == "esft":
                common += ["--experts", str(cfg)]
            one = [sys.executable, "-m", "esft_core.cli", *common, "--out", f"{d}/{method}1",
                   "--batch-size", str(a.batch_size), "--grad-accum", "2"]
            two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "esft_core.cli", *common, "--out", f"{d}/{method}2", "--batch-size", str(a.batch_size)]
            res = {}
            for name, cmd, ranks in (("one", one, 1), ("two", two, 2)):
                peaks, wall = run(cmd, ranks)
                lines = [json.loads(x) for x in Path(f"{d}/{method}{ranks}/metrics.jsonl").read_text().splitlines()]
                res[name] = {"peaks": peaks, "wall_s": round(wall, 1), "losses": [m["loss"] for m in lines],
                             "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in lines[1:]), 1)}
                print(f"{method:4s} {name}: peak RSS per process {[round(p / 2**20) for p in peaks]} MiB, "
                      f"{res[name]['tokens_per_s']} tok/s, wall {wall:.1f} s, losses {res[name]['losses']}",
                      flush=True)
            diff = max(abs(x - y) for x, y in zip(res["one"]["losses"], res["two"]["losses"], strict=True))
            out[method] = {"per_rank_peak_ratio": round(max(res["two"]["peaks"]) / res["one"]["peaks"][0], 4),
                           "per_rank_peak_ratio_net": round((max(res["two"]["peaks"]) - base)
                                                            / (res["one"]["peaks"][0] - base), 4),
                           "max_loss_diff": diff, "tokens_per_s_1": res["one"]["tokens_per_s"],
                           "tokens_per_s_2": res["two"]["tokens_per_s"], "runs": res}
    final = {"per_rank_peak_ratio": out["fft"]["per_rank_peak_ratio"],
             "per_rank_peak_ratio_net": out["fft"]["per_rank_peak_ratio_net"], "runtime_rss": base,
             "max_loss_diff": max(out["fft"]["max_loss_diff"], out["esft"]["max_loss_diff"]),
             "tokens_per_s_1": out["fft"]["tokens_per_s_1"], "tokens_per_s_2": out["fft"]["tokens_per_s_2"],
             "esft_per_rank_peak_ratio": out["esft"]["per_rank_peak_ratio"],
             "esft_tokens_per_s_1": out["esft"]["tokens_per_s_1"], "esft_tokens_per_s_2": out["esft"]["tokens_per_s_2"],
             "detail": out}
    (ROOT / "bench" / "results" / "distributed.json").write_text(json.dumps(final, indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
