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
  two-level (seeds x examples) paired bootstrap 95% CI (esft_core.evaluation.stats); differences between methods
  come with a bootstrap p-value.

- Table 3 (`--table3`): ESFT-Token + shared experts (esft_token_shared), + non-expert modules
  (esft_token_nonexpert), shared experts only (shared_only), each swept over its own 3-value grid like the others.
- Sweeps (`--sweep p|rank`, the paper's Fig. 5): ESFT-Token over top-p, LoRA over rank, every point at the method's
  chosen lr (`--lr-from` a results JSON, else the grid's middle), seed 0: task score and general-loss rise against
  trainable parameters, with the Pareto fronts.

    python bench/compare_methods.py            # full: 4 tasks, 8 methods, 3 seeds (~2 h here); --resume continues
    python bench/compare_methods.py --quick    # law + math, fft vs esft_token, 1 seed (<= 10 min)
    python bench/compare_methods.py --table3 --resume           # after the full run: reuses vanilla/fft/esft_token
    python bench/compare_methods.py --sweep p --lr-from bench/results/compare_methods.json
    python bench/compare_methods.py --sweep rank --lr-from bench/results/compare_methods.json

Module layout: bench/compare_lib.py (methods, grids, data preparation, the worker), bench/compare_summary.py (lr
rule, bootstrap summaries, Pareto fronts, result files), this file (the CLI and the orchestration).

The last stdout line is JSON: {"esft_token": {"step_time": r, "peak_rss": r, "optimizer_bytes": r, "adapter_bytes": r,
"task_score": r, "general_loss_rise": r, "minus_lora_task_score": d, "minus_random_task_score": d, "<key>_ci":
[lo, hi], "<key>_p": p, "lr": chosen}, "esft_gate": ..., "chosen_lr": {method: lr}}: ratios to FFT (ratio of the
means over tasks) and differences (mean over tasks); None where a method was not run (quick mode). A sweep's last
line: {"sweep": "top_p" | "lora_r", "method", "lr", "lr_source", "points": [{<knob>, task_score, task_score_ci,
general_loss_rise, general_loss_rise_ci, trainable_params, pareto_trainable_params, pareto_general_loss_rise, ...}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare_lib import (  # noqa: E402  (after the sys.path line)  # re-exported for tests and notebooks
    ABLATION_OF,
    CFG_OF,
    EXTRA_METHODS,
    GENERAL_EVAL,
    GENERAL_VAL,
    GRIDS,
    METHODS,
    P_GRID,
    QUICK_METHODS,
    RANK_GRID,
    SWEEP_METHOD,
    TABLE3_METHODS,
    prepare_task,
    run_worker,
    split_general,
    worker,
)
from bench.compare_summary import (  # noqa: E402, F401
    choose_lrs,
    markdown,
    pareto,
    summarise,
    sweep_markdown,
    sweep_summary,
    write_results,
    write_sweep,
)

KNOB = {"p": "top_p", "rank": "lora_r"}  # --sweep value -> the run field it varies


def _key(spec: dict) -> str:
    """Everything that changes a run; the sweeps' knobs only when set, so the main comparison's keys (and caches)
    are those of earlier versions."""
    key = {k: spec.get(k) for k in ("method", "task", "lr", "seed", "steps", "batch_size", "seq_len", "val_limit",
                                    "eval_limit", "model")}
    key.update({k: spec[k] for k in ("top_p", "lora_r") if spec.get(k) is not None})
    return json.dumps(key, sort_keys=True)


def _fail(msg: str) -> int:
    print(f"compare_methods: error: {msg}", file=sys.stderr)
    return 2


class Runs:
    """The run cache of one work directory (rows.jsonl, one line per finished run, keyed by `_key`) and the runner:
    a cached row is reused only with --resume, so an interrupted benchmark continues where it stopped."""

    def __init__(self, work: Path, resume: bool, base: dict, paths: dict, t0: float, jobs: int = 1):
        import threading

        self.cache, self.base, self.paths, self.t0 = work / "rows.jsonl", base, paths, t0
        self.work, self.done, self.rows, self.jobs, self.lock = work, {}, [], jobs, threading.Lock()
        if resume and self.cache.exists():
            for line in self.cache.read_text().splitlines():
                r = json.loads(line)
                self.done[r["key"]] = r
        elif self.cache.exists():
            self.cache.unlink()

    def run_many(self, calls: list[tuple]) -> list[dict]:
        """Run (method, task, lr, seed[, experts[, knob dict]]) calls, `--jobs` worker processes at a time; rows
        are appended in the order of `calls`, so results do not depend on which run finished first."""
        if self.jobs <= 1 or len(calls) <= 1:
            return [self.run(*c[:5], **(c[5] if len(c) > 5 else {})) for c in calls]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.jobs) as pool:  # threads only wait on worker subprocesses
            futs = [pool.submit(self.run, *c[:5], **(c[5] if len(c) > 5 else {}), append=False) for c in calls]
            out = [f.result() for f in futs]
        self.rows += out
        return out

    def run(self, method, task, lr, seed, experts: str | None = None, append: bool = True, **knob) -> dict:
        suffix = "".join(f"_{'p' if k == 'top_p' else 'r'}{v:g}" for k, v in knob.items())
        spec = {**self.base, "method": method, "task": task, "lr": lr, "seed": seed, **knob,
                "out": str(self.work / task / f"{method}{suffix}_lr{lr or 0:g}_s{seed}"),
                "train": self.paths[task]["train"], "val": self.paths[task]["val"], "eval": self.paths[task]["eval"],
                "keep_adapter": False}
        if experts or method in CFG_OF:
            spec["experts"] = experts or self.paths[task][CFG_OF[method]]
        key = _key(spec)
        if key in self.done:
            r = self.done[key]
        else:
            if Path(spec["out"]).exists():
                import shutil

                shutil.rmtree(spec["out"])
            r = worker(spec) if method == "vanilla" else run_worker(spec)
            r["key"] = key
            with self.lock, self.cache.open("a") as f:
                f.write(json.dumps(r) + "\n")
        if append:
            self.rows.append(r)
        print(f"[{time.time() - self.t0:6.0f}s] {task:9s} {method:20s}{suffix:6s} lr {lr or 0:<7g} seed {seed}  val "
              f"{r['val_score']:.3f} eval {r['eval_score']:.3f} general {r['general_eval_loss']:.3f} "
              f"step {r.get('step_time', 0):.3f}s", file=sys.stderr, flush=True)
        return r

    def clean_rows(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "key"} for r in self.rows]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="base model (default: data/demo-moe)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default intent,translate,law,math; "
                                                  "quick: law,math)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS + EXTRA_METHODS)} "
                                                    "(vanilla and fft are always run)")
    ap.add_argument("--quick", action="store_true", help="law + math, vanilla/fft/esft_token, 1 seed: <= 10 min")
    ap.add_argument("--table3", action="store_true",
                    help=f"the paper's Table 3: methods {','.join(TABLE3_METHODS)}; files *_table3.*; run it with "
                         "--resume after the main comparison to reuse its vanilla / fft / esft_token runs")
    ap.add_argument("--sweep", choices=sorted(KNOB), default=None,
                    help=f"the paper's Fig. 5: esft_token at top-p {P_GRID} or lora at rank {RANK_GRID}, each point "
                         "at the method's chosen lr (--lr-from); files compare_methods_<mode>_sweep_<p|rank>.*")
    ap.add_argument("--lr-from", metavar="JSON", default=None,
                    help="--sweep: take the method's lr from this results JSON (its chosen_lr); default: the middle "
                         "of the method's lr grid")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150; quick 100)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per method at its chosen lr (default 3; quick and --sweep 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val", type=int, default=100, help="training records held out as validation")
    ap.add_argument("--val-limit", type=int, default=None, help="validation examples scored (default all; quick 50)")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--fixed-lr", default=None, metavar="M=LR[,M=LR]",
                    help="diagnostics only: pin these methods' lr instead of sweeping (not the fair protocol)")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs of an interrupted benchmark")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes at a time (one CPU thread each; step times "
                    "and peak RSS are then measured with JOBS runs sharing the machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="recompute the summary and tables of a saved results JSON")
    ap.add_argument("--tag", default="", help="suffix of the result files (diagnostic runs beside the main ones)")
    return ap


def sweep_lr(method: str, lr_from: str | None) -> tuple[float, str]:
    """The lr of every sweep point: the method's chosen lr in a results JSON, else its grid's middle value."""
    from esft_core.errors import EsftError

    if lr_from is None:
        return GRIDS[method][1], f"the middle of {method}'s grid {GRIDS[method]}: no --lr-from given"
    try:
        chosen = json.loads(Path(lr_from).read_text())["ratios"]["chosen_lr"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EsftError(f"--lr-from {lr_from}: not a compare_methods results JSON with ratios.chosen_lr "
                        f"({type(e).__name__})") from None
    if method not in chosen:
        raise EsftError(f"--lr-from {lr_from}: no chosen lr for {method} (has {', '.join(chosen) or 'none'}); "
                        "run the comparison with that method or drop --lr-from")
    return float(chosen[method]), f"{method}'s lr chosen on validation in {Path(lr_from).name}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        meta = saved["meta"]
        if "knob" in meta:  # a sweep's file
            points = sweep_summary(saved["rows"], meta["tasks"], meta["method"], meta["knob"], meta["values"],
                                   meta["seeds"], meta["n_boot"])
            write_sweep(Path(args.render), meta, points, saved["rows"])
            print(json.dumps({"sweep": meta["knob"], "points": points}))
            return 0
        ratios, means, sweep, comparisons = summarise(saved["rows"], meta["tasks"], meta["methods"], meta["seeds"],
                                                      meta["n_boot"], meta.get("fixed_lr"))
        write_results(Path(args.render), meta, ratios, means, sweep, comparisons, saved["rows"])
        print(json.dumps(ratios))
        return 0
    if args.sweep and (args.table3 or args.methods or args.fixed_lr):
        return _fail("--sweep runs one method at one lr; drop --table3 / --methods / --fixed-lr (use --lr-from)")
    if args.lr_from and not args.sweep:
        return _fail("--lr-from applies to --sweep only")
    if args.jobs < 1:
        return _fail(f"--jobs must be at least 1, got {args.jobs}")
    from esft_core.errors import EsftError

    try:
        return _sweep(args) if args.sweep else _compare(args)
    except EsftError as e:
        return _fail(str(e))


def _prepare(args, work: Path, cfgs: dict | None = None):
    """Load the model once, split the data and build the expert configs of every task; the run cache."""
    from esft_core.models.loading import DEMO_MODEL, load_model
    from esft_core.tuning.train import quiet_transformers

    quiet_transformers()
    model_path = args.model or str(DEMO_MODEL)
    tasks = (args.tasks or ("law,math" if args.quick else "intent,translate,law,math")).split(",")
    steps = args.steps or (100 if args.quick else 150)
    val_limit = args.val_limit or (50 if args.quick else args.val)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_model(model_path)
    general = split_general(work)
    paths = {t: prepare_task(model, tok, t, args.val, 128, work / t, cfgs) for t in tasks}
    del model
    base = {"model": model_path, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "val_limit": val_limit, "eval_limit": args.eval_limit, **general}
    meta = {"mode": "quick" if args.quick else "full", "model": model_path, "tasks": tasks, "steps": steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "val": args.val, "val_limit": val_limit,
            "eval_limit": args.eval_limit, "general_eval_docs": GENERAL_EVAL[1] - GENERAL_EVAL[0],
            "general_val_docs": GENERAL_VAL[1] - GENERAL_VAL[0], "n_boot": args.n_boot, "jobs": args.jobs}
    return Runs(work, args.resume, base, paths, t0, args.jobs), tasks, meta


def _compare(args) -> int:
    methods = (args.methods.split(",") if args.methods else TABLE3_METHODS if args.table3
               else QUICK_METHODS if args.quick else METHODS)
    fixed = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in args.fixed_lr.split(",")} if args.fixed_lr else {}
    bad = [m for m in [*methods, *fixed] if m not in METHODS + EXTRA_METHODS]
    if bad:
        return _fail(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    methods = [m for m in METHODS + EXTRA_METHODS if m in set(methods) | {"vanilla", "fft"}]
    for m, of in ABLATION_OF.items():
        if m in methods and of not in methods:
            methods.insert(methods.index(m), of)  # an ablation needs its ESFT counterpart's chosen lr
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    runs, tasks, meta = _prepare(args, ROOT / "artifacts" / ("bench_compare_quick" if args.quick else "bench_compare"))
    for task in tasks:
        runs.run("vanilla", task, None, 0)
    # the sweep (seed 0), then the chosen lr with every seed (seed 0 of swept methods is the sweep run)
    runs.run_many([(m, task, lr, 0) for m in methods for lr in ([] if m in fixed else GRIDS.get(m, []))
                   for task in tasks])
    chosen, _ = choose_lrs(runs.rows, methods, tasks, fixed)
    runs.run_many([(m, task, chosen[m], seed) for m in methods[1:] for seed in seeds for task in tasks
                   if not (m in GRIDS and m not in fixed and seed == 0)])
    ratios, means, sweep, comparisons = summarise(runs.rows, tasks, methods, seeds, args.n_boot, fixed)
    meta.update(methods=methods, seeds=seeds, grids={m: GRIDS[m] for m in methods if m in GRIDS and m not in fixed},
                fixed_lr=fixed, elapsed_s=round(time.time() - runs.t0, 1), resumed=bool(runs.done),
                worker_wall_s=round(sum(r.get("wall_s", 0) for r in runs.rows), 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("compare_methods" + ("_quick" if args.quick else "") + ("_table3" if args.table3 else "")
            + (f"_{args.tag}" if args.tag else ""))
    write_results(out / f"{stem}.json", meta, ratios, means, sweep, comparisons, runs.clean_rows())
    print(json.dumps(ratios))
    return 0


def _sweep(args) -> int:
    """ESFT-Token over top-p or LoRA over rank at one lr (seed 0 unless --seeds), with vanilla for the rise."""
    method, knob = SWEEP_METHOD[args.sweep], KNOB[args.sweep]
    lr, source = sweep_lr(method, args.lr_from)  # a bad --lr-from fails before any run
    values = P_GRID if args.sweep == "p" else RANK_GRID
    cfgs = {f"token_p{p:g}": ("token", p, "all") for p in P_GRID} if args.sweep == "p" else {}
    mode = "quick" if args.quick else "full"
    runs, tasks, meta = _prepare(args, ROOT / "artifacts" / f"bench_compare_{mode}_sweep_{args.sweep}", cfgs)
    seeds = list(range(args.seeds or 1))
    print(f"sweep {knob} of {method} at lr {lr:g} ({source})", file=sys.stderr, flush=True)
    for task in tasks:
        runs.run("vanilla", task, None, 0)
    runs.run_many([(method, task, lr, seed, runs.paths[task][f"token_p{v:g}"] if knob == "top_p" else None,
                    {knob: v}) for v in values for seed in seeds for task in tasks])
    points = sweep_summary(runs.rows, tasks, method, knob, values, seeds, args.n_boot)
    meta.update(method=method, knob=knob, values=values, lr=lr, lr_source=source, seeds=seeds,
                elapsed_s=round(time.time() - runs.t0, 1), resumed=bool(runs.done),
                worker_wall_s=round(sum(r.get("wall_s", 0) for r in runs.rows), 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_methods_{mode}_sweep_{args.sweep}" + (f"_{args.tag}" if args.tag else "")
    write_sweep(out / f"{stem}.json", meta, points, runs.clean_rows())
    print(json.dumps({"sweep": knob, "method": method, "lr": lr, "lr_source": source, "points": points}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
