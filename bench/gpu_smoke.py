"""GPU smoke run: record + ESFT train + eval + merge on CUDA in bfloat16, on the demo and the V2-Lite-width model.

Not run in CI (no GPU there) and NOT YET RUN by us: no GPU was available when it was written. On a machine with a
CUDA GPU:

    python bench/gpu_smoke.py [--steps 20] [--out /tmp/gpu_smoke]

1. demo model: `esft record` (law, 8k tokens) → `esft select` (token, p 0.2) → `esft train --device cuda --dtype
   bfloat16` (grouped_mm, activation checkpointing, fp32 masters) → `esft eval` → `esft merge`, all real CLI
   subprocesses; checks each exits 0, the adapter is bf16 and the merged checkpoint loads.
2. the random V2-Lite-width model of bench/scale_memory.py (saved to disk in bf16 with the demo tokenizer): the same
   pipeline with 1 x 1024-token batches.

Last stdout line (JSON): per model, seconds per stage, steps/s, final loss, peak GPU memory of training
(torch.cuda.max_memory_allocated, logged by `esft train` as `gpu_mem_peak` in metrics.jsonl), the card's name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAW = ROOT / "data" / "tasks" / "law"


def cli(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "esft_core.cli", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"esft {args[0]} failed: {res.stderr.strip().splitlines()[-1:]}")
    return round(time.time() - t, 2)


def save_v2_lite_width(out: Path) -> Path:
    import torch

    from bench.scale_memory import build
    from esft_core.models.loading import load_model

    if not (out / "config.json").is_file():
        build(torch.bfloat16).save_pretrained(out)
        load_model("demo")[1].save_pretrained(out)
    return out


def pipeline(model: str, out: Path, steps: int, seq_len: int) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    db, cfg, run = out / "traces.duckdb", out / "cfg.json", out / "run"
    times = {
        "record": cli("record", "--model", model, "--data", str(LAW / "train.jsonl"), "--task", "law", "--db", str(db),
                      "--max-tokens", "8192", "--device", "cuda", "--dtype", "bfloat16", "--quiet"),
        "select": cli("select", "--db", str(db), "--task", "law", "--metric", "token", "--top-p", "0.2",
                      "--out", str(cfg)),
        "train": cli("train", "--model", model, "--data", str(LAW / "train.jsonl"), "--experts", str(cfg),
                     "--out", str(run), "--steps", str(steps), "--seq-len", str(seq_len), "--batch-size", "1",
                     "--lr", "1e-4", "--device", "cuda", "--dtype", "bfloat16", "--grad-checkpointing",
                     "--no-progress"),
        "eval": cli("eval", "--model", model, "--adapter", str(run), "--data", str(LAW / "eval.jsonl"),
                    "--limit", "8", "--device", "cuda", "--dtype", "bfloat16", "--out", str(out / "eval.json")),
        "merge": cli("merge", "--model", model, "--adapter", str(run), "--out", str(out / "merged"),
                     "--device", "cuda", "--dtype", "bfloat16"),
    }
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter.safetensors")
    assert all(t.dtype == torch.bfloat16 for k, t in adapter.items() if not k.endswith("expert_ids"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": times, "steps_per_s": round(len(metrics) / sum(m["step_time"] for m in metrics), 3),
            "final_loss": metrics[-1]["loss"],
            "gpu_mem_peak_gib": round(metrics[-1].get("gpu_mem_peak", 0) / 2**30, 3),
            "run": json.loads((run / "run.json").read_text()).get("status")}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="/tmp/esft_gpu_smoke")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_smoke.py needs a CUDA GPU")
    out = Path(a.out)
    result = {"card": torch.cuda.get_device_name(0), "demo": pipeline("demo", out / "demo", a.steps, 512)}
    big = save_v2_lite_width(out / "v2-lite-width")
    result["v2_lite_width"] = pipeline(str(big), out / "v2", a.steps, 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
