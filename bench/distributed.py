"""Sharded loading + FSDP2 on the CPU: 1, 2 and 4 gloo ranks on a model whose weights dominate the process.

The script builds (seeded) and saves a random DeepSeek-V2 model with V2-Lite's expert widths (hidden 2048, expert
intermediate 1408, `--experts` routed + 2 shared experts, top-6; `--layers` decoder layers, the first dense) in bfloat16
— 0.78 B parameters, 1.57 GB at the default 8 layers of 8 experts — with the demo tokenizer. V2-Lite has 27 layers of
64 experts; this keeps its widths and has as many layers as a 24 GB machine allows with FFT's AdamW state in one
process: a layer is ~1/8 of the model (1/27 in V2-Lite), so FSDP's per-layer buffers (a layer all-gathered, prefetched,
its gradients before the reduce-scatter) weigh more here than on a real model. Then, for FFT and ESFT (2 of 8 experts
per MoE layer), and ESFT with `--expert-parallel` on 2 and 4 ranks,
real `esft train` commands (fresh processes, `--dtype float32` so that one process and N ranks compute in the same
precision and FFT's AdamW state fits one process in 24 GB) with the same global batch of 4 sequences per step: one
process (`--grad-accum 4`), 2 ranks (`--grad-accum 2`) and 4 ranks (`--grad-accum 1`) under `torchrun --standalone`
(gloo), all with sharded loading (the default under torchrun), plus FFT on 2 ranks with `--load whole` (every rank loads
the whole checkpoint first: the old path). Every micro-batch is one sequence and the rows are the same in the same
order, so the loss curves must agree up to float reduction order.

Per-rank peak memory is the resident set size of each training process sampled every 20 ms from /proc (the launcher's
own excluded); `load_s` is the time from process start to the first step (imports, data, model load, sharding: `elapsed
- step_time` of step 1); tokens/s is the global throughput of steps 2..N from metrics.jsonl.

    python bench/distributed.py [--steps 4] [--layers 8] [--experts 8] [--seq-len 128] [--keep DIR]

Last stdout line (JSON; also bench/results/distributed.json): per_rank_peak_ratio (FFT, N = 2: the largest rank peak
over the single process's peak), per_rank_peak_ratio_n4, the same for ESFT (esft_per_rank_peak_ratio[_n4]),
per_rank_peak_ratio_whole_load (FFT, N = 2, --load whole), esft_ep_per_rank_peak_ratio[_n4] and ep_bytes_ratio[_n4]
(bytes a rank sends per step with EP — FSDP2 on the non-expert part, computed from the shard sizes, plus the all-to-all
bytes `esft train` counted — over FSDP-only's, computed the same way: each layer all-gathered in forward and again in
backward per micro-batch, (N-1)/N of it from other ranks, plus the fp32 reduce-scatter), max_loss_diff over every run
and step, load_s per run, goals (per-rank peak <= 1/N + 0.15 of one process; loss difference <= 1e-4) and whether they
hold, `above_runtime` (the same ratios less the runtime baseline — torch, transformers, the CLI imported — that
every process holds whatever its share: `runtime_rss_mib`, large against a 3 GB fp32 model, nothing on a real one), and
`previous_demo_ratio`: the 1.03 measured on 2026-12-05 by the earlier version of this script (demo model,
whole load, 2 ranks), kept for comparison."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "tasks" / "law" / "train.jsonl"
GLOBAL_BATCH = 4
SELECTED = [1, 5]  # the ESFT pick per MoE layer (2 of 8 experts)
PREVIOUS_DEMO_RATIO = 1.03  # bench/distributed.py of 2026-12-05: demo model, whole load on every rank, 2 ranks


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
            for p in _children(proc.pid) if ranks > 1 else [proc.pid]:
                peaks[p] = max(peaks.get(p, 0), _rss(p))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:  # the CLI's one-line error, else torchrun's summary of the failed rank (e.g. a SIGKILL)
        text = [x.strip() for x in err.splitlines() if x.strip() and not x.strip().startswith("=")]
        why = ([x for x in text if " error: " in x or x.startswith("error:")]  # the CLI's one line
               or [x for x in text if re.match(r"[\w.]+(Error|Exception): ", x)]  # a traceback's last line
               or [x for x in text if "exitcode" in x or "Signal" in x])
        raise RuntimeError(f"exit {proc.returncode}: {(why or text[-1:] or ['no output'])[0]}")
    return sorted(peaks.values(), reverse=True)[:ranks], time.time() - t


def build_model(out: Path, layers: int, experts: int) -> Path:
    """The seeded random V2-Lite-width model in bfloat16 with the demo tokenizer (skipped when already there)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.scale_memory import V2_LITE_WIDTHS
    from esft_core.models.loading import load_model

    cfg = AutoConfig.for_model("deepseek_v2", **{**V2_LITE_WIDTHS, "num_hidden_layers": layers,
                                                   "n_routed_experts": experts})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # seeded values, fast (no per-module init): N(0, 0.02), norms 1, routers not uniform
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(
                    0.05 if name.endswith("mlp.gate.weight") else 0.02))
    model.save_pretrained(out)
    load_model("demo")[1].save_pretrained(out)
    return out


def param_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes (float32, the runs' dtype) of the routed experts, of everything else, and the ESFT-trained rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    experts = sum(p.numel() * 4 for n, p in m.named_parameters() if ".mlp.experts." in n)
    other = sum(p.numel() * 4 for n, p in m.named_parameters() if ".mlp.experts." not in n)
    n_moe = m.config.num_hidden_layers - m.config.first_k_dense_replace
    per_expert = experts // (n_moe * m.config.n_routed_experts) // 4
    return {"experts": experts, "other": other, "esft_trainable": n_moe * len(SELECTED) * per_expert}


def state_bytes(model_dir: Path, method: str) -> int:
    """Bytes FSDP2 shards for a run: fp32 weights, plus gradient and two AdamW moments of what trains."""
    b = param_bytes(model_dir)
    trained = b["experts"] + b["other"] if method == "fft" else 4 * b["esft_trainable"]
    return b["experts"] + b["other"] + 3 * trained


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(x for x in f if x.startswith("MemTotal")).split()[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (the first dense)")
    ap.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer (8 layers x 8: 1.57 GB)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", help="build the model here and keep it (default: a temporary directory)")
    a = ap.parse_args()
    (base,), _ = run([sys.executable, "-c", "import torch.distributed.fsdp, transformers, peft; "
                      "import esft_core.tuning.train; from transformers import AutoModelForCausalLM; "
                      "import time; time.sleep(1)"], 1)
    print(f"runtime baseline RSS {base / 2**20:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as d:
        model = build_model(Path(a.keep or d) / f"v2-lite-width-{a.layers}x{a.experts}", a.layers, a.experts)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"model {model}: {size / 2**30:.2f} GiB of safetensors (bf16)", flush=True)
        cfg = Path(d) / "cfg.json"
        moe = range(1, a.layers)
        cfg.write_text(json.dumps({"experts": {str(i): SELECTED for i in moe},
                                   "shared_experts": False, "non_expert_modules": False}))
        runs: dict[str, dict] = {}
        plan = [("fft", 1, "auto"), ("fft", 2, "auto"), ("fft", 4, "auto"), ("fft", 2, "whole"),
                ("esft", 1, "auto"), ("esft", 2, "auto"), ("esft", 4, "auto"), ("esft", 2, "ep"),
                ("esft", 4, "ep")]
        for method, n, load in plan:
            name = f"{method}_n{n}" + {"whole": "_whole", "ep": "_ep"}.get(load, "")
            out = Path(d) / name
            common = ["train", "--model", str(model), "--data", str(DATA), "--method", method, "--steps",
                      str(a.steps), "--seq-len", str(a.seq_len), "--lr", "1e-4", "--dtype", "float32",
                      "--no-grad-checkpointing", "--global-batch", str(GLOBAL_BATCH),
                      "--grad-accum", str(GLOBAL_BATCH // n), "--no-progress", "--out", str(out)]
            common += ["--expert-parallel"] if load == "ep" else ["--load", load]
            if method == "esft":
                common += ["--experts", str(cfg)]
            launch = [sys.executable, "-m", "esft_core.cli"] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
                "esft_core.cli"]
            # 4 ranks must fit this machine: predicted from the 2-rank run, its peak less the quarter of the state
            # that a rank stops holding at 4 ranks
            two = runs.get(name.replace("_n4", "_n2"), {})
            if n == 4 and "peaks_mib" in two:
                need = 4 * (max(two["peaks_mib"]) * 2**20 - state_bytes(model, method) / 4)
                if need > 0.95 * mem_total():
                    runs[name] = {"skipped": f"4 ranks need ~{need / 2**30:.1f} GiB (predicted from the 2-rank run), "
                                             f"this machine has {mem_total() / 2**30:.1f} GiB"}
                    print(f"{name:14s} skipped: {runs[name]['skipped']}", flush=True)
                    continue
            try:
                peaks, wall = run([*launch, *common], n)
            except RuntimeError as e:  # recorded, and the other runs still go (e.g. 4 ranks killed for memory)
                runs[name] = {"failed": str(e)}
                print(f"{name:14s} failed: {e}", flush=True)
                continue
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[name] = {"peaks_mib": [round(p / 2**20) for p in peaks], "wall_s": round(wall, 1),
                          "load_s": round(lines[0]["elapsed"] - lines[0]["step_time"], 1),
                          "losses": [m["loss"] for m in lines],
                          "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in lines[1:]), 1)}
            if load == "ep":  # all-to-all bytes rank 0 sent per step (counted by esft train)
                runs[name]["ep_bytes_per_step"] = round(statistics.median(m["ep_bytes"] for m in lines))
            print(f"{name:14s} peak RSS per process {runs[name]['peaks_mib']} MiB, load {runs[name]['load_s']} s, "
                  f"{runs[name]['tokens_per_s']} tok/s, wall {wall:.0f} s, losses {runs[name]['losses']}", flush=True)
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # the FFT checkpoints are model-sized

    def ratio(name: str, one: str) -> float | None:  # None: the run was skipped
        if "peaks_mib" not in runs[name]:
            return None
        return round(max(runs[name]["peaks_mib"]) / runs[one]["peaks_mib"][0], 4)

    def above_runtime(name: str, one: str) -> float | None:  # the same, less the runtime every process holds
        if "peaks_mib" not in runs[name]:
            return None
        return round((max(runs[name]["peaks_mib"]) - base / 2**20) / (runs[one]["peaks_mib"][0] - base / 2**20), 4)

    def diff(x: str, y: str) -> float:
        return max(abs(p - q) for p, q in zip(runs[x]["losses"], runs[y]["losses"], strict=True))

    def within(value: float | None, goal: float) -> bool | None:
        return None if value is None else value <= goal

    sizes = param_bytes(model)
    for n in (2, 4):  # per step and rank: FSDP2 all-gathers each layer in forward and again in backward, per
        # micro-batch, (n-1)/n of it from the other ranks; gradients are reduce-scattered (fp32) once per step
        def allg(b: int, n: int = n) -> float:
            return 2 * (GLOBAL_BATCH // n) * b * (n - 1) / n

        rs = 4 * sizes["esft_trainable"] * (n - 1) / n
        fsdp_only = allg(sizes["experts"] + sizes["other"]) + rs
        if "ep_bytes_per_step" not in runs[f"esft_n{n}_ep"]:
            continue
        with_ep = allg(sizes["other"]) + runs[f"esft_n{n}_ep"]["ep_bytes_per_step"]
        runs[f"esft_n{n}_ep"]["bytes_per_step"] = {"fsdp_only_computed": round(fsdp_only),
                                                   "ep_fsdp_part_computed": round(allg(sizes["other"])),
                                                   "ep_all_to_all_counted": runs[f"esft_n{n}_ep"]["ep_bytes_per_step"],
                                                   "ratio": round(with_ep / fsdp_only, 4)}
    final = {
        "per_rank_peak_ratio": ratio("fft_n2", "fft_n1"), "per_rank_peak_ratio_n4": ratio("fft_n4", "fft_n1"),
        "esft_per_rank_peak_ratio": ratio("esft_n2", "esft_n1"),
        "esft_per_rank_peak_ratio_n4": ratio("esft_n4", "esft_n1"),
        "per_rank_peak_ratio_whole_load": ratio("fft_n2_whole", "fft_n1"),
        "esft_ep_per_rank_peak_ratio": ratio("esft_n2_ep", "esft_n1"),
        "esft_ep_per_rank_peak_ratio_n4": ratio("esft_n4_ep", "esft_n1"),
        "above_runtime": {f"{m}_n{n}{x}": above_runtime(f"{m}_n{n}{x}", f"{m}_n1") for m, n, x in
                          [("fft", 2, ""), ("fft", 4, ""), ("esft", 2, ""), ("esft", 4, ""), ("esft", 2, "_ep"),
                           ("esft", 4, "_ep")]},
        "ep_bytes_ratio": runs["esft_n2_ep"].get("bytes_per_step", {}).get("ratio"),
        "ep_bytes_ratio_n4": runs["esft_n4_ep"].get("bytes_per_step", {}).get("ratio"),
        "max_loss_diff": max(diff(x, f"{x.split('_')[0]}_n1") for x in runs
                             if not x.endswith("_n1") and "losses" in runs[x]
                             and "losses" in runs[f"{x.split('_')[0]}_n1"]),
        "load_s": {k: v["load_s"] for k, v in runs.items() if "load_s" in v},
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in runs.items() if "tokens_per_s" in v},
        "skipped": {k: v["skipped"] for k, v in runs.items() if "skipped" in v},
        "failed": {k: v["failed"] for k, v in runs.items() if "failed" in v},
        "model_gib": round(size / 2**30, 3), "runtime_rss_mib": round(base / 2**20),
        "previous_demo_ratio": PREVIOUS_DEMO_RATIO, "runs": runs,
    }
    final["goals"] = {  # None: not measured (the run was skipped)
        "peak_n2_fft": within(final["per_rank_peak_ratio"], 0.5 + 0.15),
        "peak_n2_esft": within(final["esft_per_rank_peak_ratio"], 0.5 + 0.15),
        "peak_n4_fft": within(final["per_rank_peak_ratio_n4"], 0.25 + 0.15),
        "peak_n4_esft": within(final["esft_per_rank_peak_ratio_n4"], 0.25 + 0.15),
        "loss": final["max_loss_diff"] <= 1e-4,
        "ep_bytes": within(max((r for r in (final["ep_bytes_ratio"], final["ep_bytes_ratio_n4"]) if r is not None),
                               default=None), 0.3)}
    (ROOT / "bench" / "results" / "distributed.json").write_text(json.dumps(final, indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
