"""bench/gpu_smoke.py --device cpu: the device check's three parts (methods side by side, forward vs base, the CLI
chain on the demo) on the tiny model, so the script keeps working while no session has a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_smoke_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu", "--steps", "2",
                        "--seq-len", "256", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "result.json").read_text()) and out["device"] == "cpu"
    m = out["methods"]
    assert set(m) == {"esft", "fft", "lora"}
    assert all(math.isfinite(x["final_loss"]) and x["mem_peak_gib"] > 0 and x["tokens_per_s"] > 0 for x in m.values())
    assert m["esft"]["trainable_params"] < m["lora"]["trainable_params"] < m["fft"]["trainable_params"]
    assert out["ratios"]["esft_over_fft"]["mem_peak"] == round(m["esft"]["mem_peak_gib"] / m["fft"]["mem_peak_gib"], 3)
    assert out["forward"]["max_logit_diff"] == 0.0  # the wrapped model computes the base model's logits
    chain = out["chain"]
    assert set(chain["seconds"]) == {"record", "select", "train", "eval", "merge"} and chain["adapter_bf16"] is True
    assert "tasks" in chain["eval_keys"] and chain["merged_params"] > 0
    assert not (ROOT / "bench" / "results" / "gpu_smoke_cpu.json").exists()  # the CPU run writes only under --out
