"""Compare ESFT with FFT, LoRA and random experts on the demo model (the paper's Tables 1-3 in miniature), fairly.

Protocol (fixed before any result was seen; docs/method_comparison.md explains it):
- Data. Per task, the last `--val` records of train.jsonl are a validation split; training uses the rest. Eval is
  the task's eval.jsonl (disjoint prompts by construction), all 200 examples. General ability: the held-out corpus,
  documents [0, 64) for eval and [200, 232) for validation (disjoint). Expert scores are recorded on the first 128
  training records (never validation or eval).
- Methods: vanilla, fft, lora, esft_token (p=0.2), esft_gate (p=0.1), esft_token_answer (ESFT-Token scored over
  answer positions only, `esft select --tokens answer`), random_token / random_gate (as many experts per layer as the
  ESFT config, drawn at random with the run's seed). Same steps, batch, sequence length, constant schedule, AdamW
  (0.9, 0.95), weight decay 0.1, clip 1.0 and data order (seed) for every method.
- Learning rate: every swept method gets a grid of 3 values spanning 10x (same width for all, centred on the usual
  setting for that method). Each (method, lr) trains once (seed 0) on every task; the chosen lr maximises the mean
  validation task score over tasks, ties broken by the lower mean validation general loss. Random-expert ablations
  use their ESFT counterpart's chosen lr (the ablation changes the experts only).
- Seeds: the chosen lr is trained with `--seeds` seeds (seed 0 is the sweep run). Every score is reported with a
  two-level (seeds x examples) paired bootstrap 95% CI (esft_core.stats); differences between methods come with a
  bootstrap p-value.

    python bench/compare_methods.py            # full: 4 tasks, 8 methods, 3 seeds (~2 h here); --resume continues
    python bench/compare_methods.py --quick    # law + math, fft vs esft_token, 1 seed (<= 10 min)

The last stdout line is JSON: {"esft_token": {"step_time": r, "peak_rss": r, "optimizer_bytes": r, "adapter_bytes": r,
"task_score": r, "general_loss_rise": r, "minus_lora_task_score": d, "minus_random_task_score": d, "<key>_ci":
[lo, hi], "<key>_p": p, "lr": chosen}, "esft_gate": ..., "chosen_lr": {method: lr}}: ratios to FFT (ratio of the
means over tasks) and differences (mean over tasks); None where a method was not run (quick mode).
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ["vanilla", "fft", "lora", "esft_token", "esft_gate", "esft_token_answer", "random_token", "random_gate"]
QUICK_METHODS = ["vanilla", "fft", "esft_token"]
EXTRA_METHODS = ["esft_token_p50"]  # diagnostics only (--methods): ESFT-Token with top-p 0.5
# lr grids: 3 values, 10x wide for every method, centred on the method's usual setting
# (the ESFT grids were first [3e-3, 3e-2]; the first quick run chose that grid's lower edge, so they moved down)
GRIDS = {"fft": [1e-4, 3e-4, 1e-3], "lora": [1e-3, 3e-3, 1e-2], "esft_token": [1e-3, 3e-3, 1e-2],
         "esft_gate": [1e-3, 3e-3, 1e-2], "esft_token_answer": [1e-3, 3e-3, 1e-2],
         "esft_token_p50": [1e-3, 3e-3, 1e-2]}
ABLATION_OF = {"random_token": "esft_token", "random_gate": "esft_gate"}
# expert config of each expert method: (score metric, top-p, token set)
EXPERT_CFGS = {"token": ("token", 0.2, "all"), "gate": ("gate", 0.1, "all"), "token_answer": ("token", 0.2, "answer"),
               "token_p50": ("token", 0.5, "all")}
CFG_OF = {"esft_token": "token", "esft_gate": "gate", "esft_token_answer": "token_answer", "random_token": "token",
          "random_gate": "gate", "esft_token_p50": "token_p50"}
GENERAL_EVAL, GENERAL_VAL = (0, 64), (200, 232)


# ---------------------------------------------------------------------------------------------------------------
def prepare_task(model, tok, task: str, n_val: int, n_score: int, tdir: Path) -> dict:
    """Split train into train/validation files and build the expert configs through the real pipeline (record with
    loss flags → score → top-p select) on the first `n_score` training records."""
    from esft_core import record, store
    from esft_core.data import read_records
    from esft_core.select import select_for_task

    tdir.mkdir(parents=True, exist_ok=True)
    src = ROOT / "data" / "tasks" / task / "train.jsonl"
    lines = src.read_text().splitlines(keepends=True)
    paths = {"train": tdir / "train.jsonl", "val": tdir / "val.jsonl",
             "eval": ROOT / "data" / "tasks" / task / "eval.jsonl"}
    paths["train"].write_text("".join(lines[:-n_val]))
    paths["val"].write_text("".join(lines[-n_val:]))
    db = tdir / "traces.duckdb"
    if db.exists():
        db.unlink()
    record.record(model, tok, read_records(paths["train"], limit=n_score), db, task, max_tokens=10**9, seq_len=256)
    with store.reader(db) as con:
        for name, (metric, p, tokens) in EXPERT_CFGS.items():
            paths[name] = tdir / f"expert_cfg_{name}.json"
            cfg = select_for_task(con, task, metric, "token", p=p, tokens=tokens).to_dict()
            paths[name].write_text(json.dumps(cfg, indent=1))
    return {k: str(v) for k, v in paths.items()}


def split_general(work: Path) -> dict[str, str]:
    lines = (ROOT / "data" / "general" / "heldout.jsonl").read_text().splitlines(keepends=True)
    out = {}
    for name, (a, b) in (("general_eval", GENERAL_EVAL), ("general_val", GENERAL_VAL)):
        out[name] = str(work / f"{name}.jsonl")
        Path(out[name]).write_text("".join(lines[a:b]))
    return out


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


def per_example(model, tok, path: str, task: str, limit: int, seq_len: int) -> dict:
    """Per-example task scores (greedy generation, the task's metric) and the mean answer loss of a chat file."""
    from esft_core.data import prompt_text, read_records, reference_answer
    from esft_core.demo.tasks import score
    from esft_core.evaluate import generate, loss_over

    recs = read_records(path, limit=limit)
    refs = [reference_answer(r["messages"]) for r in recs]
    max_new = min(256, max(len(tok.encode(r, add_special_tokens=False)) for r in refs) + 16)
    preds = generate(model, tok, [prompt_text(r["messages"]) for r in recs], max_new_tokens=max_new)
    return {"scores": [float(score(task, p, r)) for p, r in zip(preds, refs, strict=True)],
            "loss": loss_over(model, tok, recs, seq_len), "example": {"prediction": preds[0], "reference": refs[0]}}


def per_document_loss(model, tok, path: str, seq_len: int) -> list[float]:
    """Mean token loss of every document of a text file (one forward each)."""
    from esft_core.data import read_records
    from esft_core.evaluate import loss_over

    return [loss_over(model, tok, [d], seq_len) for d in read_records(path)]


def worker(spec: dict) -> dict:
    """One method, one lr, one seed, one task, in this (fresh) process: train, measure, then evaluate."""
    import torch

    from esft_core.train import Recipe, TrainConfig, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(1)
    res = {k: spec[k] for k in ("method", "task", "lr", "seed")}
    if spec["method"] == "vanilla":
        from esft_core.models import load_model

        model, tok = load_model(spec["model"])
    else:
        from esft_core.esft import optimizer_state_bytes

        m = spec["method"]
        method = "fft" if m == "fft" else "lora" if m == "lora" else m.split("_")[0]
        cfg = TrainConfig(data=spec["train"], out=spec["out"], model=spec["model"], method=method,
                          experts=spec.get("experts"), steps=spec["steps"], lr=spec["lr"],
                          batch_size=spec["batch_size"], seq_len=spec["seq_len"], seed=spec["seed"])
        recipe = Recipe(cfg, progress=False)
        recipe.setup()
        res["rss_after_load"] = _rss_now()
        with RssSampler() as sampler:
            recipe.train()
        # ru_maxrss carries the parent's high-water mark over fork+exec; the sampled peak covers training alone
        res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["vm_hwm"] = _vm_hwm()
        res["train_peak_rss"] = sampler.peak
        res["optimizer_bytes"] = optimizer_state_bytes(recipe.opt)
        res["trainable_params"] = sum(p.numel() for p in recipe.params)
        adapter = recipe.save()
        res["adapter_bytes"] = sum(f.stat().st_size for f in adapter.rglob("*.safetensors"))
        lines = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
        res["step_time"] = statistics.median(x["step_time"] for x in lines[1:] or lines)
        res["final_loss"] = lines[-1]["loss"]
        if recipe.expert_cfg is not None:
            res["experts_per_layer"] = {k: len(v) for k, v in recipe.expert_cfg.experts.items()}
        model, tok = recipe.model, recipe.tok
        if spec.get("keep_adapter") is False:
            import shutil

            shutil.rmtree(adapter, ignore_errors=True)
    model.eval()
    for split in ("val", "eval"):
        r = per_example(model, tok, spec[split], spec["task"], spec[f"{split}_limit"], spec["seq_len"])
        res[f"{split}_scores"], res[f"{split}_loss"], res[f"{split}_example"] = r["scores"], r["loss"], r["example"]
        res[f"{split}_score"] = statistics.mean(r["scores"])
        res[f"general_{split}_losses"] = per_document_loss(model, tok, spec[f"general_{split}"], spec["seq_len"])
        res[f"general_{split}_loss"] = statistics.mean(res[f"general_{split}_losses"])
    return res


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['method']}/{spec['task']} lr {spec['lr']} seed {spec['seed']} failed: "
                         f"{err.strip().splitlines()[-1:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t, 1)
    return res


# ---------------------------------------------------------------------------------------------------------------
def choose_lrs(rows: list[dict], methods: list[str], tasks: list[str], fixed: dict | None = None) -> tuple[dict, dict]:
    """The fixed rule: per swept method, max mean validation task score over tasks; ties → lower mean validation
    general loss. Returns (chosen lr per method, sweep table {method: {lr: (val score, val general loss)}}).
    `fixed` (diagnostics only) pins a method's lr without a sweep."""
    table, chosen = {}, dict(fixed or {})
    for m in methods:
        if m not in GRIDS or m in chosen:
            continue
        table[m] = {}
        for lr in GRIDS[m]:
            rs = [r for r in rows if r["method"] == m and r["lr"] == lr and r["seed"] == 0]
            if len({r["task"] for r in rs}) == len(tasks):
                table[m][lr] = (statistics.mean(r["val_score"] for r in rs),
                                statistics.mean(r["general_val_loss"] for r in rs))
        chosen[m] = max(table[m], key=lambda lr: (table[m][lr][0], -table[m][lr][1]))
    for m, of in ABLATION_OF.items():
        if m in methods and of in chosen:
            chosen[m] = chosen[of]
    return chosen, table


def pareto(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Every (method, lr) of seed 0 on eval: mean task score and general-loss rise over vanilla, and whether no other
    point has a higher score and a lower rise (the Pareto front of the paper's Fig. 5, over lr instead of p)."""
    van = statistics.mean(r["general_eval_loss"] for r in rows if r["method"] == "vanilla")
    pts = {}
    for r in rows:
        if r["method"] != "vanilla" and r["seed"] == 0:
            pts.setdefault((r["method"], r["lr"]), []).append(r)
    out = [{"method": m, "lr": lr, "task_score": statistics.mean(r["eval_score"] for r in rs),
            "general_loss_rise": statistics.mean(r["general_eval_loss"] for r in rs) - van,
            "trainable_params": statistics.mean(r["trainable_params"] for r in rs)}
           for (m, lr), rs in pts.items() if len({r["task"] for r in rs}) == len(tasks)]
    for p in out:
        p["pareto"] = not any(q["task_score"] >= p["task_score"] and q["general_loss_rise"] <= p["general_loss_rise"]
                              and (q["task_score"], q["general_loss_rise"]) != (p["task_score"],
                                                                               p["general_loss_rise"])
                              for q in out)
    return sorted(out, key=lambda p: -p["task_score"])


def _arrays(rows, m, tasks, key, seeds, lr):
    """Per task, (seeds, items) array of `key` (a per-item list) for method m at lr; vanilla repeated over seeds."""
    out = []
    for t in tasks:
        rs = sorted((r for r in rows if r["method"] == m and r["task"] == t and (m == "vanilla" or r["lr"] == lr)
                     and (m == "vanilla" or r["seed"] in seeds)), key=lambda r: r["seed"])
        a = np.array([r[key] for r in rs], dtype=np.float64)
        out.append(np.repeat(a, len(seeds), axis=0) if m == "vanilla" else a)
    return out


def summarise(rows: list[dict], tasks: list[str], methods: list[str], seeds: list[int], n_boot: int = 2000,
              fixed: dict | None = None):
    from esft_core.stats import diff_ci, mean_ci, ratio_ci, rise_ratio_ci

    chosen, sweep = choose_lrs(rows, methods, tasks, fixed)
    chosen["vanilla"] = None
    S = {m: _arrays(rows, m, tasks, "eval_scores", seeds, chosen[m]) for m in methods}
    G = {m: _arrays(rows, m, tasks, "general_eval_losses", seeds, chosen[m]) for m in methods}
    kw = {"n_boot": n_boot}
    means = {}
    for m in methods:
        final = [r for r in rows if r["method"] == m and (m == "vanilla" or (r["lr"] == chosen[m]
                                                                            and r["seed"] in seeds))]
        ts = mean_ci(S[m], **kw)
        rise = diff_ci(G[m], G["vanilla"], **kw)
        means[m] = {"lr": chosen[m], "task_score": ts.value, "task_score_ci": [ts.lo, ts.hi],
                    "per_task": {t: {"score": e.value, "lo": e.lo, "hi": e.hi}
                                 for t, e in ((t, mean_ci(S[m][i], **kw)) for i, t in enumerate(tasks))},
                    "general_loss": mean_ci(G[m], **kw).value, "general_loss_rise": rise.value,
                    "general_loss_rise_ci": [rise.lo, rise.hi],
                    "eval_loss": statistics.mean(r["eval_loss"] for r in final)}
        for k in ("step_time", "train_peak_rss", "trainable_params", "optimizer_bytes", "adapter_bytes"):
            vals = [r[k] for r in final if k in r]
            means[m][k] = statistics.mean(vals) if vals else None
        means[m]["peak_rss"] = means[m].pop("train_peak_rss")
    out, comparisons = {}, []

    def est(name, e):
        comparisons.append({"comparison": name, "value": _r(e.value), "lo": _r(e.lo), "hi": _r(e.hi), "p": _r(e.p)})
        return e

    for m, rnd in (("esft_token", "random_token"), ("esft_gate", "random_gate"), ("esft_token_answer", "random_token"),
                   ("esft_token_p50", None)):
        if m not in methods or "fft" not in methods:
            continue
        o = {k: (round(means[m][k] / means["fft"][k], 4) if means[m][k] is not None and means["fft"][k] else None)
             for k in ("step_time", "peak_rss", "optimizer_bytes", "adapter_bytes")}
        e = est(f"{m} / fft task score", ratio_ci(S[m], S["fft"], **kw))
        o.update(task_score=_r(e.value), task_score_ci=[_r(e.lo), _r(e.hi)], task_score_p=_r(e.p))
        e = est(f"{m} / fft general-loss rise", rise_ratio_ci(G[m], G["fft"], G["vanilla"], **kw))
        o.update(general_loss_rise=_r(e.value), general_loss_rise_ci=[_r(e.lo), _r(e.hi)],
                 general_loss_rise_p=_r(e.p))
        for key, other in (("minus_lora_task_score", "lora"), ("minus_random_task_score", rnd),
                           ("minus_esft_token_task_score", None if m == "esft_token" else "esft_token")):
            if other == "esft_token" and m == "esft_gate":
                continue
            if other is None:
                continue
            if other not in methods:
                o[key] = o[f"{key}_ci"] = o[f"{key}_p"] = None
                continue
            e = est(f"{m} - {other} task score", diff_ci(S[m], S[other], **kw))
            o.update({key: _r(e.value), f"{key}_ci": [_r(e.lo), _r(e.hi)], f"{key}_p": _r(e.p)})
        o["lr"] = chosen[m]
        out[m] = o
    for m in ("esft_token", "esft_gate"):  # the JSON keeps its keys when a variant did not run (quick mode)
        out.setdefault(m, {k: None for k in ("step_time", "peak_rss", "optimizer_bytes", "adapter_bytes",
                                             "task_score", "general_loss_rise", "minus_lora_task_score",
                                             "minus_random_task_score", "lr")})
    for a, b in (("fft", "lora"), ("lora", "vanilla"), ("fft", "vanilla")):
        if a in methods and b in methods:
            est(f"{a} - {b} task score", diff_ci(S[a], S[b], **kw))
    out["chosen_lr"] = {m: lr for m, lr in chosen.items() if lr is not None}
    means["_pareto"] = pareto(rows, tasks)
    return out, means, sweep, comparisons


def _r(v, digits: int = 4):
    """Rounded float, None when undefined (a ratio to a zero score): the JSON stays strict."""
    return round(float(v), digits) if v is not None and np.isfinite(v) else None


def _fmt(v, kind=""):
    if v is None:
        return "–"
    if kind == "bytes":
        return f"{v / 2**20:.2f} MiB"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(ratios, means, sweep, comparisons, meta) -> str:
    tasks = meta["tasks"]
    out = [f"# compare_methods ({meta['mode']})\n\n",
           f"Model `{Path(meta['model']).name}`, tasks {', '.join(tasks)}; {meta['steps']} steps, batch "
           f"{meta['batch_size']} × {meta['seq_len']} tokens, constant lr, AdamW (0.9, 0.95), wd 0.1, clip 1.0; "
           f"validation {meta['val']} records carved from train (scored on {meta['val_limit']}), eval "
           f"{meta['eval_limit']} examples per task, general loss on {meta['general_eval_docs']} held-out documents; "
           f"seeds {meta['seeds']}; CIs: two-level (seeds × examples) paired bootstrap, 95%, {meta['n_boot']} "
           f"resamples; {meta['elapsed_s']} s in all{' (resumed)' if meta.get('resumed') else ''}, "
           f"{meta.get('worker_wall_s')} s in training/eval workers (generated by bench/compare_methods.py).\n\n",
           "## Learning-rate sweep (seed 0; mean over tasks of validation task score / validation general loss)\n\n",
           "| method | " + " | ".join(f"lr {i + 1}" for i in range(3)) + " | chosen |\n|---|---|---|---|---|\n"]
    for m, tab in sweep.items():
        cells = [f"{lr:g}: {s:.3f} / {g:.3f}" for lr, (s, g) in tab.items()]
        lr = ratios["chosen_lr"][m]
        edge = " (grid edge)" if lr in (min(tab), max(tab)) else ""
        out.append(f"| {m} | " + " | ".join(cells) + f" | **{lr:g}**{edge} |\n")
    if meta.get("fixed_lr"):
        out.append(f"\nDiagnostic run: lr fixed without a sweep for {meta['fixed_lr']}.\n")
    out.append("\nRule fixed in advance: highest mean validation task score; ties → lower validation general loss. "
               "Random-expert ablations reuse their ESFT counterpart's lr.\n")
    cols = [("lr", "lr", ""), ("task score [95% CI]", None, ""), ("eval loss", "eval_loss", ""),
            ("general loss", "general_loss", ""), ("rise [95% CI]", None, ""), ("s/step", "step_time", ""),
            ("peak RSS", "peak_rss", "bytes"), ("trainable", "trainable_params", "int"),
            ("optimizer", "optimizer_bytes", "bytes"), ("adapter", "adapter_bytes", "bytes")]
    out.append("\n## Mean over tasks\n\n| method | " + " | ".join(c[0] for c in cols) + " |\n|---"
               + "|---:" * len(cols) + "|\n")
    front = means.pop("_pareto", [])
    for m, r in means.items():
        cells = []
        for name, key, kind in cols:
            if name.startswith("task score"):
                cells.append(f"{r['task_score']:.3f} [{r['task_score_ci'][0]:.3f}, {r['task_score_ci'][1]:.3f}]")
            elif name.startswith("rise"):
                cells.append(f"{r['general_loss_rise']:.3f} [{r['general_loss_rise_ci'][0]:.3f}, "
                             f"{r['general_loss_rise_ci'][1]:.3f}]")
            else:
                cells.append(_fmt(r[key], kind) if key != "lr" else (f"{r['lr']:g}" if r["lr"] else "–"))
        out.append(f"| {m} | " + " | ".join(cells) + " |\n")
    out.append("\n## Every (method, lr) run of seed 0 on eval: task score vs general-loss rise (Pareto front)\n\n"
               "| method | lr | task score | general-loss rise | trainable | on the front |\n"
               "|---|---:|---:|---:|---:|---|\n")
    for p in front:
        out.append(f"| {p['method']} | {p['lr']:g} | {p['task_score']:.3f} | {p['general_loss_rise']:.3f} | "
                   f"{int(p['trainable_params']):,} | {'**yes**' if p['pareto'] else 'no'} |\n")
    out.append("\n## Per task: task score [95% CI]\n\n| method | " + " | ".join(tasks) + " |\n|---"
               + "|---:" * len(tasks) + "|\n")
    for m, r in means.items():
        out.append(f"| {m} | " + " | ".join(f"{r['per_task'][t]['score']:.3f} [{r['per_task'][t]['lo']:.3f}, "
                                            f"{r['per_task'][t]['hi']:.3f}]" for t in tasks) + " |\n")
    out.append("\n## Comparisons (paired bootstrap; p: two-sided, H0 difference = 0 / ratio = 1)\n\n"
               "| comparison | value | 95% CI | p | significant (p < 0.05) |\n|---|---:|---|---:|---|\n")
    for c in comparisons:
        if c["value"] is None:
            out.append(f"| {c['comparison']} | undefined (zero denominator) | – | – | – |\n")
            continue
        out.append(f"| {c['comparison']} | {c['value']:.3f} | [{c['lo']:.3f}, {c['hi']:.3f}] | {c['p']:.4f} | "
                   f"{'yes' if c['p'] < 0.05 else 'no'} |\n")
    out.append("\n## Final JSON (ratios to FFT, differences)\n\n```json\n" + json.dumps(ratios, indent=1) + "\n```\n")
    means["_pareto"] = front
    return "".join(out)


def _key(spec: dict) -> str:
    return json.dumps({k: spec.get(k) for k in ("method", "task", "lr", "seed", "steps", "batch_size", "seq_len",
                                                 "val_limit", "eval_limit", "model")}, sort_keys=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="base model (default: data/demo-moe)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default intent,translate,law,math; "
                                                  "quick: law,math)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} "
                                                    "(vanilla and fft are always run)")
    ap.add_argument("--quick", action="store_true", help="law + math, vanilla/fft/esft_token, 1 seed: <= 10 min")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150; quick 100)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method at its chosen lr (default 3; quick 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val", type=int, default=100, help="training records held out as validation")
    ap.add_argument("--val-limit", type=int, default=None, help="validation examples scored (default all; quick 50)")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--fixed-lr", default=None, metavar="M=LR[,M=LR]",
                    help="diagnostics only: pin these methods' lr instead of sweeping (not the fair protocol)")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs of an interrupted benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="recompute the summary and tables of a saved results JSON")
    ap.add_argument("--tag", default="", help="suffix of the result files (diagnostic runs beside the main ones)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        meta = saved["meta"]
        ratios, means, sweep, comparisons = summarise(saved["rows"], meta["tasks"], meta["methods"], meta["seeds"],
                                                      meta["n_boot"], meta.get("fixed_lr"))
        write_results(Path(args.render), meta, ratios, means, sweep, comparisons, saved["rows"])
        print(json.dumps(ratios))
        return 0

    from esft_core.models import DEMO_MODEL, load_model
    from esft_core.train import quiet_transformers

    quiet_transformers()
    model_path = args.model or str(DEMO_MODEL)
    tasks = (args.tasks or ("law,math" if args.quick else "intent,translate,law,math")).split(",")
    methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else METHODS)
    fixed = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in args.fixed_lr.split(",")} if args.fixed_lr else {}
    bad = [m for m in [*methods, *fixed] if m not in METHODS + EXTRA_METHODS]
    if bad:
        print(f"compare_methods: error: unknown method {bad[0]!r}; choose from "
              f"{', '.join(METHODS + EXTRA_METHODS)}", file=sys.stderr)
        return 2
    methods = [m for m in METHODS + EXTRA_METHODS if m in set(methods) | {"vanilla", "fft"}]
    for m, of in ABLATION_OF.items():
        if m in methods and of not in methods:
            methods.insert(methods.index(m), of)  # an ablation needs its ESFT counterpart's chosen lr
    steps = args.steps or (100 if args.quick else 150)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    val_limit = args.val_limit or (50 if args.quick else args.val)
    work = ROOT / "artifacts" / ("bench_compare_quick" if args.quick else "bench_compare")
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "rows.jsonl"
    done = {}
    if args.resume and cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    elif cache.exists():
        cache.unlink()
    t0 = time.time()
    model, tok = load_model(model_path)
    general = split_general(work)
    paths = {t: prepare_task(model, tok, t, args.val, 128, work / t) for t in tasks}
    del model
    base = {"model": model_path, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "val_limit": val_limit, "eval_limit": args.eval_limit, **general}
    rows = []

    def run(method, task, lr, seed):
        spec = {**base, "method": method, "task": task, "lr": lr, "seed": seed,
                "out": str(work / task / f"{method}_lr{lr or 0:g}_s{seed}"), "train": paths[task]["train"],
                "val": paths[task]["val"], "eval": paths[task]["eval"], "keep_adapter": False}
        if method in CFG_OF:
            spec["experts"] = paths[task][CFG_OF[method]]
        key = _key(spec)
        if key in done:
            r = done[key]
        else:
            if Path(spec["out"]).exists():
                import shutil

                shutil.rmtree(spec["out"])
            r = worker(spec) if method == "vanilla" else run_worker(spec)
            r["key"] = key
            with cache.open("a") as f:
                f.write(json.dumps(r) + "\n")
        rows.append(r)
        print(f"[{time.time() - t0:6.0f}s] {task:9s} {method:17s} lr {lr or 0:<7g} seed {seed}  val "
              f"{r['val_score']:.3f} eval {r['eval_score']:.3f} general {r['general_eval_loss']:.3f} "
              f"step {r.get('step_time', 0):.3f}s", file=sys.stderr, flush=True)
        return r

    for task in tasks:
        run("vanilla", task, None, 0)
    for m in methods:  # the sweep (seed 0)
        for lr in ([] if m in fixed else GRIDS.get(m, [])):
            for task in tasks:
                run(m, task, lr, 0)
    chosen, _ = choose_lrs(rows, methods, tasks, fixed)
    for m in methods[1:]:  # the chosen lr with every seed (seed 0 of swept methods is the sweep run)
        for seed in seeds:
            for task in tasks:
                if not (m in GRIDS and m not in fixed and seed == 0):
                    run(m, task, chosen[m], seed)
    ratios, means, sweep, comparisons = summarise(rows, tasks, methods, seeds, args.n_boot, fixed)
    meta = {"mode": "quick" if args.quick else "full", "model": model_path, "tasks": tasks, "methods": methods,
            "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "val": args.val,
            "val_limit": val_limit, "eval_limit": args.eval_limit,
            "general_eval_docs": GENERAL_EVAL[1] - GENERAL_EVAL[0], "general_val_docs": GENERAL_VAL[1] - GENERAL_VAL[0],
            "seeds": seeds, "grids": {m: GRIDS[m] for m in methods if m in GRIDS and m not in fixed},
            "fixed_lr": fixed, "n_boot": args.n_boot,
            "elapsed_s": round(time.time() - t0, 1), "resumed": bool(done),
            "worker_wall_s": round(sum(r.get("wall_s", 0) for r in rows), 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare_methods" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    write_results(out / f"{stem}.json", meta, ratios, means, sweep, comparisons,
                  [{k: v for k, v in r.items() if k != "key"} for r in rows])
    print(json.dumps(ratios))
    return 0


def write_results(path: Path, meta, ratios, means, sweep, comparisons, rows) -> None:
    """<stem>.json (everything, per-example rows included) and <stem>.md (the tables)."""
    md = markdown(ratios, means, sweep, comparisons, meta)
    path.write_text(json.dumps({"meta": meta, "ratios": ratios, "means": means, "sweep": {
        m: {str(lr): v for lr, v in t.items()} for m, t in sweep.items()}, "comparisons": comparisons,
        "rows": rows}) + "\n")
    path.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
