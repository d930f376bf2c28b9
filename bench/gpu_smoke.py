"""The device check: ESFT vs FFT vs LoRA side by side on one device, and the whole CLI chain on the demo.

On a GPU (the default `--device cuda`; one 80 GB card, <= 8 minutes):

1. **CLI chain on the demo**: `esft record` (law) → `esft select` (token, p 0.2) → `esft train` → `esft eval` →
   `esft merge`, real subprocesses on the device in bfloat16; each must exit 0, the adapter must be bf16 and the
   merged checkpoint must load.
2. **Methods side by side** on a seeded random DeepSeek-V2 with V2-Lite's expert widths (hidden 2048, 64 experts of
   1408, top-6; `--layers` decoder layers, the first dense: 10 layers = 5.6 B parameters, 11 GB in bf16), built on the
   device and saved once: `esft train` for esft (6 experts per MoE layer), fft and lora, each in its own process,
   bf16, fp32 masters for the trained experts (esft), activation checkpointing, `--steps` steps of 1 x `--seq-len`:
   peak device memory of training (torch.cuda.max_memory_allocated, logged as `gpu_mem_peak`), step time,
   tokens/s, final loss.
3. **Forward vs base**: the same batch through the plain model and through the ESFT-wrapped one (no step taken: the
   logits must be equal), median of 5 timed forwards each; the ratio is the wrapper's cost.

`--device cpu` runs the same three parts on the tiny model of `esft_core.models.loading.save_tiny` and the demo in a few
seconds (the suite runs it, so this script cannot rot while no session has a GPU); memory is then the peak RSS of each
training process (ru_maxrss), not device memory.

    python bench/gpu_smoke.py [--device cuda|cpu] [--layers 10] [--steps 10] [--seq-len 1024] [--out DIR]

Last stdout line (JSON; also OUT/result.json and, on a GPU, bench/results/gpu_smoke.json): device name, model size, per
method its memory peak, step time, tokens/s and final loss, the ratios esft/fft and esft/lora of peak memory and step
time, forward ratio and max logit difference, and the CLI chain's seconds per stage."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAW = ROOT / "data" / "tasks" / "law"
SELECTED = [0, 5, 11, 23, 42, 63]  # the ESFT pick per MoE layer on the V2-Lite-width model (6 of 64)


def cli(*args: str) -> tuple[float, int]:
    """Run `esft ARGS` in a fresh process: (seconds, that process's peak RSS in bytes, from wait4's rusage)."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "esft_core.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"esft {args[0]} failed: {err.read().strip().splitlines()[-1:]}")
    return round(time.time() - t, 2), usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


def chain(device: str, out: Path) -> dict:
    """record → select → train → eval → merge on the demo, on `device` in bfloat16."""
    import torch
    from safetensors.torch import load_file

    from esft_core.models.loading import load_model

    out.mkdir(parents=True, exist_ok=True)
    db, cfg, run = out / "traces.duckdb", out / "cfg.json", out / "run"
    dev = ["--device", device, "--dtype", "bfloat16"]
    steps = [
        ("record", ["record", "--model", "demo", "--data", str(LAW / "train.jsonl"), "--task", "law", "--db", str(db),
                    "--max-tokens", "4096", *dev, "--quiet"]),
        ("select", ["select", "--db", str(db), "--task", "law", "--metric", "token", "--top-p", "0.2", "--out",
                    str(cfg)]),
        ("train", ["train", "--model", "demo", "--data", str(LAW / "train.jsonl"), "--experts", str(cfg), "--out",
                   str(run), "--steps", "4", "--seq-len", "256", "--batch-size", "2", "--lr", "1e-4", *dev,
                   "--no-progress"]),
        ("eval", ["eval", "--model", "demo", "--adapter", str(run), "--data", str(LAW / "eval.jsonl"), "--limit", "4",
                  *dev, "--out", str(out / "eval.json")]),
        ("merge", ["merge", "--model", "demo", "--adapter", str(run), "--out", str(out / "merged"), *dev]),
    ]
    seconds = {name: cli(*args)[0] for name, args in steps}
    adapter = load_file(run / "adapter" / "adapter.safetensors")
    bf16 = all(t.dtype == torch.bfloat16 for k, t in adapter.items() if t.is_floating_point())
    merged, _ = load_model(str(out / "merged"), dtype="auto")
    return {"seconds": seconds, "adapter_bf16": bf16, "merged_params": sum(p.numel() for p in merged.parameters()),
            "eval_keys": sorted(json.loads((out / "eval.json").read_text()))}


def build(device: str, layers: int, out: Path) -> Path:
    """The seeded random V2-Lite-width model (CPU: the tiny DeepSeek-V2 of save_tiny), saved in bfloat16."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.scale_memory import V2_LITE_WIDTHS
    from esft_core.models.loading import load_model, save_tiny

    if device == "cpu":
        return save_tiny(out, "deepseek_v2", n_routed_experts=64, num_experts_per_tok=6)
    cfg = AutoConfig.for_model("deepseek_v2", **{**V2_LITE_WIDTHS, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # seeded N(0, 0.02) weights, norms 1, a non-uniform router: filled on the device
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05 if name.endswith("mlp.gate.weight") else 0.02, generator=g)
    model.save_pretrained(out)
    load_model("demo")[1].save_pretrained(out)
    return out


def methods(device: str, model: Path, out: Path, steps: int, seq_len: int) -> dict:
    """esft / fft / lora, one `esft train` process each, on the same model and data."""
    import torch

    cfg = out / "v2_cfg.json"
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    cfg.write_text(json.dumps({"experts": {str(i): SELECTED for i in range(1, n_layers)}, "shared_experts": False,
                               "non_expert_modules": False}))
    res = {}
    for method in ("esft", "fft", "lora"):
        run = out / f"run_{method}"
        args = ["train", "--model", str(model), "--data", str(LAW / "train.jsonl"), "--method", method,
                "--out", str(run), "--steps", str(steps), "--seq-len", str(seq_len), "--batch-size", "1",
                "--lr", "1e-4", "--device", device, "--dtype", "bfloat16", "--grad-checkpointing", "--no-progress"]
        if method == "esft":
            args += ["--experts", str(cfg)]
        seconds, rss = cli(*args)
        m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        tail = m[1:] or m
        res[method] = {
            "seconds": seconds, "final_loss": m[-1]["loss"],
            "step_time": round(statistics.median(x["step_time"] for x in tail), 4),
            "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in tail), 1),
            "mem_peak_gib": round((m[-1].get("gpu_mem_peak") if device != "cpu" else rss) / 2**30, 3),
            "trainable_params": json.loads((run / "run.json").read_text())["trainable_params"]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


def forward_vs_base(device: str, model_dir: Path, seq_len: int) -> dict:
    """Median forward time of the plain model and of the ESFT-wrapped one on one batch, and their logit difference."""
    import torch

    from esft_core.experts.esft import apply_esft
    from esft_core.experts.expert_config import ExpertConfig
    from esft_core.models.loading import load_model

    model, _ = load_model(str(model_dir), dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def timed() -> tuple[float, torch.Tensor]:
        times = []
        with torch.no_grad():
            for _ in range(6):
                if device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                logits = model(input_ids=ids).logits
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        return statistics.median(times[1:]), logits.float()

    base_s, base = timed()
    n_layers = model.config.num_hidden_layers
    apply_esft(model, ExpertConfig({i: SELECTED for i in range(1, n_layers)}), master_dtype=torch.float32)
    esft_s, wrapped = timed()
    return {"base_s": round(base_s, 5), "esft_s": round(esft_s, 5), "ratio": round(esft_s / base_s, 3),
            "max_logit_diff": float((wrapped - base).abs().max())}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the device check) or cpu (the suite's few-second run)")
    ap.add_argument("--layers", type=int, default=10, help="decoder layers of the V2-Lite-width model (GPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", default=None, help="work directory (default: /tmp/esft_gpu_smoke_<device>)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_smoke.py --device cuda needs a CUDA GPU; --device cpu runs the tiny version")
    out = Path(a.out or f"/tmp/esft_gpu_smoke_{a.device.replace(':', '')}")
    t0 = time.time()
    model = build(a.device, a.layers, out / "model")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    result = {"device": torch.cuda.get_device_name(0) if a.device != "cpu" else "cpu",
              "model_gib": round(size / 2**30, 3), "build_s": round(time.time() - t0, 1)}
    result["methods"] = methods(a.device, model, out, a.steps, a.seq_len)
    r = result["methods"]
    result["ratios"] = {f"esft_over_{m}": {"mem_peak": round(r["esft"]["mem_peak_gib"] / r[m]["mem_peak_gib"], 3),
                                           "step_time": round(r["esft"]["step_time"] / r[m]["step_time"], 3)}
                        for m in ("fft", "lora")}
    result["forward"] = forward_vs_base(a.device, model, a.seq_len)
    result["chain"] = chain(a.device, out / "demo")
    result["total_s"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if a.device != "cpu":  # the device figures are kept in the repository; the CPU run is the suite's check
        (ROOT / "bench" / "results" / "gpu_smoke.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
