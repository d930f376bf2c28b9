"""Memory and speed of FFT vs ESFT vs LoRA at DeepSeek-V2-Lite layer widths, against the AdamW theory.

The model is built here, seeded and randomly initialised (no download): transformers' DeepseekV2ForCausalLM with
V2-Lite's widths — hidden 2048, MLA attention (16 heads, kv_lora_rank 512, q/k nope 128 + rope 64, v 128) — and two
decoder layers: layer 0 dense (intermediate 10944), layer 1 MoE with 64 routed experts x 1408, 2 shared experts,
top-6; vocabulary 4096 (the demo tokenizer's). 0.68 B parameters: 2.7 GB in float32, 1.4 GB in bfloat16.

ESFT's experts come from the real pipeline: the model (bfloat16) records its routing over the `law` demo task into a
DuckDB trace store, `select_for_task` keeps the 6 experts with the highest token selection ratio (top-k 6).

Each (dtype, method) runs in its own subprocess so peak RSS does not mix (VmHWM of the worker, which never forked):
build the model, time 3 no-grad forwards of the base model, apply the method (the method registry's prepare,
esft_core/tuning/registry.py: the code
`esft train` runs; experts implementation grouped_mm; no activation checkpointing). The ESFT worker then times 5
rounds of base vs ESFT no-grad forwards of the same model (the experts' forward swapped back and forth;
forward_ratio = median of the per-round ratios, so load drifts on a shared machine cancel). Then 3 AdamW steps on
one 1 x 256 batch (median of steps 2-3). Theory (AdamW): weights + trainable x (gradient + 2 moments), in the dtypes
actually used (ESFT: fp32 master copies of the selected experts on a bf16 model, plus their cached bf16 compute
copy; FFT / LoRA trainables in the model dtype). `peak_over_theory` = (peak RSS - RSS of the worker before the model
was built, i.e. interpreter + torch + transformers + peft) / theory. LoRA targets the attention linears and, through
peft's `target_parameters`, the fused routed experts (one rank-8 pair per expert; peft materialises W + BA for all
64 experts every forward — its documented cost, visible in its peak).

    python bench/scale_memory.py               # both dtypes (float32 FFT only when enough RAM is free)
    python bench/scale_memory.py --dtypes bfloat16

Last stdout line (JSON): esft_peak_over_theory, peak_ratio (ESFT/FFT peak), step_time_ratio (ESFT/FFT),
forward_ratio (ESFT forward / base forward), from the bfloat16 rows, plus every row under "rows".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GiB = 2**30

V2_LITE_WIDTHS = dict(
    vocab_size=4096, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=2,
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SEQ = 256


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def build(dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("deepseek_v2", **V2_LITE_WIDTHS)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.set_experts_implementation("grouped_mm")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a random router that is not uniform, as in a trained model
        gate = model.model.layers[1].mlp.gate.weight
        gate.copy_(torch.randn(gate.shape, generator=g) * 0.05)
    return model


def select_worker(out: str) -> dict:
    """Record the `law` task's routing on the model and keep the top-6 experts by token selection ratio."""
    import torch

    from esft_core.data import read_records
    from esft_core.models.loading import load_model
    from esft_core.selection.select import select_for_task
    from esft_core.traces import record, store

    torch.set_num_threads(1)
    _, tok = load_model("demo")
    model = build(torch.bfloat16).eval()
    db = Path(out) / "traces.duckdb"
    record.record(model, tok, read_records(ROOT / "data/tasks/law/train.jsonl", limit=64), db, "law",
                  max_tokens=1024, seq_len=SEQ)
    with store.reader(db) as con:
        cfg = select_for_task(con, "law", "token", "token", k=6).to_dict()
    return cfg


def _median_time(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(spec: dict) -> dict:
    import peft  # noqa: F401  (imports are runtime, not training memory: load them before the baseline)
    import torch
    import transformers.models.deepseek_v2.modeling_deepseek_v2  # noqa: F401

    from esft_core.experts.esft import ExpertConfig, optimizer_state_bytes, tensor_bytes
    from esft_core.tuning.config import TrainConfig
    from esft_core.tuning.registry import get_method, resolve

    torch.set_num_threads(1)
    dtype = getattr(torch, spec["dtype"])
    rss0 = _vm("VmRSS")
    model = build(dtype)
    hwm_build, rss_build = _vm("VmHWM"), _vm("VmRSS")
    ids = torch.randint(3, V2_LITE_WIDTHS["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)  # warm-up
        base_fwd = _median_time(lambda: model(ids))
    method = spec["method"]
    ecfg = ExpertConfig.from_dict(spec["experts"]) if method == "esft" else None
    cfg = TrainConfig(data="-", out="-", method=method, experts_cfg=spec["experts"], lora_r=8, lora_alpha=16)
    master = torch.float32 if dtype != torch.float32 else None
    torch.manual_seed(0)
    model = resolve(get_method(method).prepare)(model, cfg, ecfg, master_dtype=master)
    model.train()
    forward_ratios, wrapped = [], []
    if method == "esft":  # interleave base and ESFT forwards of this very model: load drifts cancel per round
        experts = model.model.layers[1].mlp.experts
        esft_forward = experts.__dict__["forward"]
        with torch.no_grad():
            for _ in range(5):
                del experts.forward  # the class's forward: the base model
                b = _median_time(lambda: model(ids), 1)
                experts.forward = esft_forward
                w = _median_time(lambda: model(ids), 1)
                forward_ratios.append(w / b)
                wrapped.append(w)
        wrapped_fwd = statistics.median(wrapped)
    else:
        with torch.no_grad():
            wrapped_fwd = _median_time(lambda: model(ids))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as `esft train`
    steps, fwd = [], []
    for _ in range(3):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        fwd.append(time.perf_counter() - t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t)
    peak = _vm("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = tensor_bytes(params)
    # + gradient + exp_avg + exp_avg_sq in the trainable dtype; fp32 masters also keep a compute-dtype copy (the
    # standard mixed-precision weight copy, cached between optimizer steps)
    cast_copy = sum(p.numel() * p.new_empty((), dtype=dtype).element_size() for p in params if p.dtype != dtype)
    theory = weights + trainable * 3 + cast_copy
    with tempfile.TemporaryDirectory() as d:
        if method == "esft":
            from esft_core.experts.adapters import save_adapter

            save_adapter(model, ecfg, d, {}, dtype=dtype)
        else:
            state = {n: p.detach().to(dtype) for n, p in model.named_parameters() if p.requires_grad}
            model.save_pretrained(d, state_dict=state)
        adapter = sum(f.stat().st_size for f in Path(d).rglob("*.safetensors"))
    return {"dtype": spec["dtype"], "method": method, "peak_rss": peak, "rss_before_model": rss0,
            "rss_after_build": rss_build, "hwm_after_build": hwm_build,
            "theory": theory, "peak_over_theory": round((peak - rss0) / theory, 4), "weights_bytes": weights,
            "trainable_params": sum(p.numel() for p in params), "trainable_bytes": trainable,
            "optimizer_bytes": optimizer_state_bytes(opt), "adapter_bytes": adapter,
            "step_time": round(statistics.median(steps[1:]), 3),
            "train_forward_time": round(statistics.median(fwd[1:]), 3),
            "base_forward_time": round(base_fwd, 3), "wrapped_forward_time": round(wrapped_fwd, 3),
            "forward_ratio_paired": round(statistics.median(forward_ratios), 4) if forward_ratios else None,
            "loss": [round(float(out.loss), 4)]}


# Real models: parameter counts from their published configs (per-expert / per-layer widths), for the README.
REAL_MODELS = {
    # name: (total params, routed-expert params, GPUs' memory note)
    "DeepSeek-V2-Lite": dict(total=15.7e9, routed=26 * 64 * 3 * 2048 * 1408),
    "Qwen3-30B-A3B": dict(total=30.5e9, routed=48 * 128 * 3 * 2048 * 768),
    "GPT-OSS-20B": dict(total=20.9e9, routed=24 * 32 * (2880 * 5760 + 5760 + 2880 * 2880 + 2880)),
}


def theory_table(selected_share: float = 0.09) -> dict:
    """AdamW memory (GiB, activations excluded) for each real model, as this benchmark's theory counts it.

    bf16 weights (2 B/param); ESFT: `selected_share` of the routed experts trained with fp32 master + grad + 2 moments
    (16 B/param) on top; FFT: fp32 master + fp32 grad + 2 fp32 moments + bf16 compute copy (18 B/param), sharded over
    N GPUs by FSDP2 (the bf16 all-gather of one decoder layer at a time comes on top)."""
    out = {}
    for name, m in REAL_MODELS.items():
        weights = 2 * m["total"]
        esft = weights + 16 * selected_share * m["routed"]
        fft = 18 * m["total"]
        out[name] = {"weights_bf16": round(weights / GiB, 1), "esft_1gpu": round(esft / GiB, 1),
                     "esft_per_gpu_8": round(esft / 8 / GiB, 1), "fft_1gpu": round(fft / GiB, 1),
                     "fft_per_gpu_8": round(fft / 8 / GiB, 1), "selected_params": round(selected_share * m["routed"])}
    return out


def _sub(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=["esft", "fft", "lora"])
    ap.add_argument("--theory", action="store_true", help="print the AdamW theory for real models and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--select", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.select:
        print(json.dumps(select_worker(a.select)))
        return
    if a.theory:
        print(json.dumps(theory_table(), indent=1))
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        experts = _sub(["--select", d])
    if "error" in experts:
        raise SystemExit(f"selection failed: {experts['error']}")
    print(f"ESFT experts (record -> select top-6 by token ratio on law): {experts['experts']}", flush=True)
    rows = []
    for dtype in a.dtypes:
        for method in a.methods:
            n_params = 0.683e9
            need = n_params * (4 if dtype == "float32" else 2) * (4.6 if method == "fft" else 1.6)
            if need > _mem_available() - 2 * GiB:
                row = {"dtype": dtype, "method": method,
                       "skipped": f"needs ~{need / GiB:.1f} GiB, {_mem_available() / GiB:.1f} GiB available"}
            else:
                row = {"dtype": dtype, "method": method, **_sub(["--worker", json.dumps(
                    {"dtype": dtype, "method": method, "experts": experts})])}
            rows.append(row)
            if "peak_rss" in row:
                print(f"{dtype:9s} {method:5s} peak {row['peak_rss'] / GiB:6.2f} GiB  theory {row['theory'] / GiB:6.2f}"
                      f" GiB  peak/theory {row['peak_over_theory']:.3f}  step {row['step_time']:7.2f} s  "
                      f"fwd {row['train_forward_time']:6.2f} s  base fwd {row['base_forward_time']:6.2f} s  "
                      f"wrapped fwd {row['wrapped_forward_time']:6.2f} s  opt {row['optimizer_bytes'] / GiB:.3f} GiB"
                      f"  adapter {row['adapter_bytes'] / 2**20:.1f} MiB", flush=True)
            else:
                print(f"{dtype:9s} {method:5s} {row.get('skipped') or row.get('error')}", flush=True)
    summary = {"elapsed_s": round(time.time() - t0, 1)}
    for dtype in a.dtypes:
        r = {x["method"]: x for x in rows if x["dtype"] == dtype and "peak_rss" in x}
        s = {}
        if "esft" in r:
            s["esft_peak_over_theory"] = r["esft"]["peak_over_theory"]
            s["forward_ratio"] = r["esft"]["forward_ratio_paired"]
        if "esft" in r and "fft" in r:
            s["peak_ratio"] = round(r["esft"]["peak_rss"] / r["fft"]["peak_rss"], 4)
            s["peak_ratio_net"] = round((r["esft"]["peak_rss"] - r["esft"]["rss_before_model"])
                                        / (r["fft"]["peak_rss"] - r["fft"]["rss_before_model"]), 4)
            s["theory_ratio"] = round(r["esft"]["theory"] / r["fft"]["theory"], 4)
            s["step_time_ratio"] = round(r["esft"]["step_time"] / r["fft"]["step_time"], 4)
        if "lora" in r and "fft" in r:
            s["lora_peak_ratio"] = round(r["lora"]["peak_rss"] / r["fft"]["peak_rss"], 4)
        summary[dtype] = s
    main_dtype = "bfloat16" if "bfloat16" in a.dtypes else a.dtypes[0]
    final = {**summary.get(main_dtype, {}), "dtype": main_dtype, "by_dtype": summary, "rows": rows}
    out = ROOT / "bench" / "results" / "scale_memory.json"
    out.write_text(json.dumps(final, indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
