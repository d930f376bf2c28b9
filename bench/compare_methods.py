"""Compare ESFT with FFT, LoRA and random experts on the demo model (the paper's Tables 1-3 in miniature).

For each task (>= 3 adaptation + >= 1 enhancement), with the same data, steps and hyper-parameters:
vanilla (no tuning), fft, lora, esft_token (p=0.2), esft_gate (p=0.1), random_token / random_gate (as many experts per
layer as the token / gate config, chosen at random). Expert configs come from the real pipeline over the task's
training data: record into DuckDB, score (token selection ratio / average gate score, per-token normalisation), select
with the authors' top-p stop rule.

Each method trains in its own subprocess (`--worker`), which reports its own peak RSS (ru_maxrss) measured right after
training, before evaluation. Columns: task score (own task), other tasks' mean score, general held-out loss and its
rise over vanilla, median step time, peak RSS, trainable parameters, optimizer state bytes, adapter bytes.

    python bench/compare_methods.py            # full: 4 tasks, writes bench/results/compare_methods.{md,json}
    python bench/compare_methods.py --quick    # 2 tasks, few steps, small eval (<= 5 min), for checks

The last stdout line is JSON: {"esft_token": {"step_time": r, "peak_rss": r, "optimizer_bytes": r, "adapter_bytes": r,
"task_score": r, "general_loss_rise": r, "minus_lora_task_score": d, "minus_random_task_score": d}, "esft_gate": ...}
with ratios to FFT (ratio of the means over tasks) and differences (mean over tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ["vanilla", "fft", "lora", "esft_token", "esft_gate", "random_token", "random_gate"]
TRAINED = METHODS[1:]


# ---------------------------------------------------------------------------------------------------------------
def expert_configs(model, tok, train_file: Path, n: int, out_dir: Path) -> dict[str, Path]:
    """ESFT-Token (p=0.2) and ESFT-Gate (p=0.1) configs through the real pipeline: record the first `n` training
    records into a throwaway DuckDB trace store, score (token normalisation, as the authors' configs) and select."""
    from esft_core import record, store
    from esft_core.data import read_records
    from esft_core.select import select_for_task

    db = out_dir / "traces.duckdb"
    record.record(model, tok, read_records(train_file, limit=n), db, "task", max_tokens=10**9, seq_len=256)
    paths = {}
    with store.reader(db) as con:
        for metric, p in (("token", 0.2), ("gate", 0.1)):
            paths[metric] = out_dir / f"expert_cfg_{metric}.json"
            cfg = select_for_task(con, "task", metric, "token", p=p).to_dict()
            paths[metric].write_text(json.dumps(cfg, indent=1))
    return paths


# ---------------------------------------------------------------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class RssSampler:
    """Highest resident set size seen while training (sampled every 5 ms), next to the process-wide ru_maxrss."""

    def __init__(self):
        import threading

        self.peak, self.stop = _rss_now(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_now())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def worker(spec: dict) -> dict:
    """One method on one task, in this (fresh) process: train, measure, then evaluate."""
    import torch

    from esft_core.esft import optimizer_state_bytes
    from esft_core.evaluate import evaluate_files
    from esft_core.train import Recipe, TrainConfig, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(spec.get("threads", 1))
    res = {"method": spec["name"], "task": spec["task"]}
    if spec["name"] == "vanilla":
        from esft_core.models import load_model

        model, tok = load_model(spec["model"])
    else:
        method = {"fft": "fft", "lora": "lora"}.get(spec["name"], spec["name"].split("_")[0])
        cfg = TrainConfig(data=spec["train"], out=spec["out"], model=spec["model"], method=method,
                          experts=spec.get("experts"), steps=spec["steps"], lr=spec["lr"][method],
                          batch_size=spec["batch_size"], seq_len=spec["seq_len"], seed=spec["seed"])
        recipe = Recipe(cfg, progress=False)
        recipe.setup()
        res["rss_after_load"] = _rss_now()
        with RssSampler() as sampler:
            recipe.train()
        # ru_maxrss is useless here: Linux carries the parent's high-water mark over fork+exec, so every worker
        # reported the bench process's own peak. VmHWM is this process image's peak (loading included); the sampled
        # peak covers training alone and is what the table and ratios use.
        res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["vm_hwm"] = _vm_hwm()
        res["train_peak_rss"] = sampler.peak
        res["optimizer_bytes"] = optimizer_state_bytes(recipe.opt)
        res["trainable_params"] = sum(p.numel() for p in recipe.params)
        adapter = recipe.save()
        res["adapter_bytes"] = sum(f.stat().st_size for f in adapter.rglob("*.safetensors"))
        lines = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
        res["step_time"] = statistics.median(m["step_time"] for m in lines[1:] or lines)
        res["final_loss"] = lines[-1]["loss"]
        if recipe.expert_cfg is not None:
            res["experts_per_layer"] = {k: len(v) for k, v in recipe.expert_cfg.experts.items()}
        model, tok = recipe.model, recipe.tok
    own = Path(spec["eval"]).parent.name
    ev = evaluate_files(model, tok, [spec["eval"]], limit=spec["eval_limit"], seq_len=spec["seq_len"])
    other = evaluate_files(model, tok, spec["other_evals"], limit=spec["other_limit"], seq_len=spec["seq_len"])
    gen = evaluate_files(model, tok, [spec["general"]], limit=spec["general_limit"], seq_len=spec["seq_len"])
    res["task_score"] = ev["tasks"][own]["score"]
    res["eval_loss"] = ev["tasks"][own]["loss"]
    res["other_scores"] = {t: r["score"] for t, r in other["tasks"].items()}
    res["general_loss"] = gen["general_loss"]
    return res


def run_worker(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['name']}/{spec['task']} failed: {err.strip().splitlines()[-1:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t, 1)
    return res


# ---------------------------------------------------------------------------------------------------------------
def summarise(rows: list[dict], tasks: list[str]) -> tuple[dict, dict]:
    by = {(r["task"], r["method"]): r for r in rows}
    for r in rows:
        if "train_peak_rss" in r:
            r["peak_rss"] = r["train_peak_rss"]  # peak RSS while training (sampled every 5 ms)
    for t in tasks:
        van = by[(t, "vanilla")]["general_loss"]
        for m in METHODS:
            r = by[(t, m)]
            r["general_loss_rise"] = r["general_loss"] - van
            r["other_score"] = statistics.mean(r["other_scores"].values()) if r["other_scores"] else None

    def mean(m, key):
        vals = [by[(t, m)].get(key) for t in tasks]
        return statistics.mean(vals) if all(v is not None for v in vals) else None

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b not in (None, 0) else None

    out = {}
    for m, rnd in (("esft_token", "random_token"), ("esft_gate", "random_gate")):
        out[m] = {k: ratio(mean(m, k), mean("fft", k))
                  for k in ("step_time", "peak_rss", "optimizer_bytes", "adapter_bytes", "task_score",
                            "general_loss_rise")}
        out[m]["minus_lora_task_score"] = round(mean(m, "task_score") - mean("lora", "task_score"), 4)
        out[m]["minus_random_task_score"] = round(mean(m, "task_score") - mean(rnd, "task_score"), 4)
        # answer-token loss on the task's eval set: a graded view where exact-match scores are all 0
        out[m]["eval_loss"] = ratio(mean(m, "eval_loss"), mean("fft", "eval_loss"))
        out[m]["minus_lora_eval_loss"] = round(mean(m, "eval_loss") - mean("lora", "eval_loss"), 4)
        out[m]["minus_random_eval_loss"] = round(mean(m, "eval_loss") - mean(rnd, "eval_loss"), 4)
        # memory training adds on top of the loaded model (sampled), where the runtime's fixed ~0.5 GB cancels out
        rss = [by[(t, m)]["train_peak_rss"] - by[(t, m)]["rss_after_load"] for t in tasks]
        rss_fft = [by[(t, "fft")]["train_peak_rss"] - by[(t, "fft")]["rss_after_load"] for t in tasks]
        out[m]["train_rss_increase"] = ratio(statistics.mean(rss), statistics.mean(rss_fft))
    means = {m: {k: mean(m, k) for k in ("task_score", "eval_loss", "other_score", "general_loss", "general_loss_rise",
                                         "step_time", "peak_rss", "trainable_params", "optimizer_bytes",
                                         "adapter_bytes")} for m in METHODS}
    return out, means


def _fmt(v, kind=""):
    if v is None:
        return "–"
    if kind == "bytes":
        return f"{v / 2**20:.2f} MiB"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rows, tasks, ratios, means, meta) -> str:
    cols = [("task score", "task_score", ""), ("eval loss", "eval_loss", ""), ("other tasks", "other_score", ""),
            ("general loss", "general_loss", ""),
            ("rise", "general_loss_rise", ""), ("s/step", "step_time", ""), ("peak RSS", "peak_rss", "bytes"),
            ("trainable", "trainable_params", "int"), ("optimizer", "optimizer_bytes", "bytes"),
            ("adapter", "adapter_bytes", "bytes")]
    head = "| method | " + " | ".join(c[0] for c in cols) + " |\n|---" + "|---:" * len(cols) + "|\n"
    out = [f"# compare_methods ({meta['mode']})\n", f"Model `{meta['model']}`, {meta['steps']} steps, batch "
           f"{meta['batch_size']} × {meta['seq_len']} tokens, lr {meta['lr']}, eval limit {meta['eval_limit']} "
           f"(other tasks {meta['other_limit']}, general {meta['general_limit']}), seed {meta['seed']}; "
           f"{meta['elapsed_s']} s in all.\n",
           "\n## Mean over tasks (" + ", ".join(tasks) + ")\n\n", head]
    for m in METHODS:
        out.append(f"| {m} | " + " | ".join(_fmt(means[m][k], kind) for _, k, kind in cols) + " |\n")
    out.append("\n## Ratios to FFT (ratio of means) and differences\n\n```json\n" + json.dumps(ratios, indent=1)
               + "\n```\n")
    for t in tasks:
        out.append(f"\n## {t}\n\n" + head)
        for r in rows:
            if r["task"] == t:
                out.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(k), kind) for _, k, kind in cols) + " |\n")
    return "".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="base model (default: data/demo-moe)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default intent,translate,law,math)")
    ap.add_argument("--quick", action="store_true", help="2 tasks, few steps, small eval: <= 5 minutes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="re-render the table and ratios from a saved results JSON")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        ratios, means = summarise(saved["rows"], saved["meta"]["tasks"])
        saved.update(ratios=ratios, means=means)
        Path(args.render).write_text(json.dumps(saved, indent=1) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(saved["rows"], saved["meta"]["tasks"], ratios,
                                                                 means, saved["meta"]))
        print(json.dumps(ratios))
        return 0

    from esft_core.models import DEMO_MODEL, load_model
    from esft_core.train import quiet_transformers

    quiet_transformers()
    model_path = args.model or str(DEMO_MODEL)
    tasks = (args.tasks or ("intent,math" if args.quick else "intent,translate,law,math")).split(",")
    steps = args.steps or (8 if args.quick else 60)
    eval_limit = args.eval_limit or (8 if args.quick else 24)
    other_limit = 16  # other tasks' eval sets (retention), for every method but the random ablations
    general_limit = 16 if args.quick else 32
    # per-method peak lr (the usual practice: adapters and the few selected experts take a larger one than FFT)
    lr = {"fft": 1e-3, "lora": 3e-3, "esft": 5e-3, "random": 5e-3}
    data = ROOT / "data"
    work = ROOT / "artifacts" / "bench_compare"
    t0 = time.time()
    model, tok = load_model(model_path)
    rows = []
    for task in tasks:
        tdir = work / task
        if tdir.exists():
            import shutil

            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        cfgs = expert_configs(model, tok, data / "tasks" / task / "train.jsonl", 64 if args.quick else 128, tdir)
        for name in METHODS:
            spec = {"name": name, "task": task, "model": model_path, "seed": args.seed, "steps": steps, "lr": lr,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "out": str(tdir / name),
                    "train": str(data / "tasks" / task / "train.jsonl"),
                    "eval": str(data / "tasks" / task / "eval.jsonl"),
                    "other_evals": [str(data / "tasks" / t / "eval.jsonl") for t in tasks if t != task],
                    "general": str(data / "general" / "heldout.jsonl"), "eval_limit": eval_limit,
                    "other_limit": other_limit, "general_limit": general_limit}
            if args.quick or name.startswith("random"):
                spec["other_evals"] = []  # quick checks and the random ablations skip the cross-task evals
            if name.startswith(("esft", "random")):
                spec["experts"] = str(cfgs[name.split("_")[1]])
            r = worker(spec) if name == "vanilla" else run_worker(spec, timeout=1800)
            rows.append(r)
            print(f"[{time.time() - t0:6.0f}s] {task:10s} {name:12s} score {r['task_score']:.3f} "
                  f"general {r['general_loss']:.4f} step {r.get('step_time', 0):.3f}s", file=sys.stderr)
    ratios, means = summarise(rows, tasks)
    meta = {"mode": "quick" if args.quick else "full", "model": model_path, "steps": steps, "lr": lr,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_limit": eval_limit,
            "other_limit": other_limit, "general_limit": general_limit, "seed": args.seed, "tasks": tasks,
            "elapsed_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare_methods" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "ratios": ratios, "means": means, "rows": rows},
                                                 indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, tasks, ratios, means, meta))
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
