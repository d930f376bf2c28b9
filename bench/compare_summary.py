"""bench/compare_methods.py, the summary side: the fixed lr rule, paired-bootstrap summaries with CIs, the Pareto
fronts, the p / rank sweeps' summaries, and the Markdown / JSON result files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from bench.compare_lib import ABLATION_OF, GRIDS


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
    front(out, "general_loss_rise")
    for p in out:
        p["pareto"] = p.pop("pareto_general_loss_rise")
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
    from esft_core.evaluation.stats import diff_ci, mean_ci, ratio_ci, rise_ratio_ci

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
                   ("esft_token_p50", None), ("esft_token_shared", None), ("esft_token_nonexpert", None),
                   ("shared_only", None)):
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


def write_results(path: Path, meta, ratios, means, sweep, comparisons, rows) -> None:
    """<stem>.json (everything, per-example rows included) and <stem>.md (the tables)."""
    md = markdown(ratios, means, sweep, comparisons, meta)
    path.write_text(json.dumps({"meta": meta, "ratios": ratios, "means": means, "sweep": {
        m: {str(lr): v for lr, v in t.items()} for m, t in sweep.items()}, "comparisons": comparisons,
        "rows": rows}) + "\n")
    path.with_suffix(".md").write_text(md)


# ---------------------------------------------------------------------------------------------------------------
# The p / rank sweeps (the paper's Fig. 5): one method at one lr, a grid of one knob (top-p or LoRA rank).
def front(points: list[dict], cost: str) -> None:
    """Mark `pareto_<cost>` on every point that no other point beats on task score (higher) and `cost` (lower)."""
    for p in points:
        p[f"pareto_{cost}"] = not any(
            q["task_score"] >= p["task_score"] and q[cost] <= p[cost]
            and (q["task_score"], q[cost]) != (p["task_score"], p[cost]) for q in points)


def sweep_summary(rows: list[dict], tasks: list[str], method: str, knob: str, values: list, seeds: list[int],
                  n_boot: int = 2000) -> list[dict]:
    """Per knob value: mean task score over tasks [95% CI], general-loss rise over vanilla [95% CI] (paired
    two-level bootstrap, as the main comparison), mean trainable parameters, and the two Pareto fronts (score vs
    trainable parameters, score vs rise)."""
    from esft_core.evaluation.stats import diff_ci, mean_ci

    def arrays(rs_of, key):
        out = []
        for t in tasks:
            rs = sorted(rs_of(t), key=lambda r: r["seed"])
            out.append(np.array([r[key] for r in rs], dtype=np.float64))
        return out

    van = [r for r in rows if r["method"] == "vanilla"]
    van_g = [np.repeat(a, len(seeds), axis=0) for a in arrays(lambda t: [r for r in van if r["task"] == t],
                                                             "general_eval_losses")]
    points = []
    for v in values:
        rs = [r for r in rows if r["method"] == method and r.get(knob) == v and r["seed"] in seeds]
        if {(r["task"], r["seed"]) for r in rs} != {(t, s) for t in tasks for s in seeds}:
            continue  # an incomplete point (a killed run) is left out rather than averaged over fewer tasks

        def of(t, rs=rs):
            return [r for r in rs if r["task"] == t]

        ts = mean_ci(arrays(of, "eval_scores"), n_boot=n_boot)
        rise = diff_ci(arrays(of, "general_eval_losses"), van_g, n_boot=n_boot)
        points.append({knob: v, "task_score": _r(ts.value), "task_score_ci": [_r(ts.lo), _r(ts.hi)],
                       "per_task": {t: _r(statistics.mean(r["eval_score"] for r in of(t))) for t in tasks},
                       "general_loss_rise": _r(rise.value), "general_loss_rise_ci": [_r(rise.lo), _r(rise.hi)],
                       "trainable_params": statistics.mean(r["trainable_params"] for r in rs),
                       "step_time": statistics.mean(r["step_time"] for r in rs)})
    front(points, "trainable_params")
    front(points, "general_loss_rise")
    return points


def sweep_markdown(points: list[dict], meta: dict) -> str:
    knob, tasks = meta["knob"], meta["tasks"]
    name = {"top_p": "top-p", "lora_r": "LoRA rank r"}[knob]
    out = [f"# compare_methods ({meta['mode']}) sweep of {name}: {meta['method']}\n\n",
           f"Model `{Path(meta['model']).name}`, tasks {', '.join(tasks)}; {meta['steps']} steps, batch "
           f"{meta['batch_size']} × {meta['seq_len']} tokens, the main comparison's protocol (constant lr, AdamW (0.9, "
           f"0.95), wd 0.1, clip 1.0), every point at lr **{meta['lr']:g}** ({meta['lr_source']}); eval "
           f"{meta['eval_limit']} examples per task, general loss on {meta['general_eval_docs']} held-out documents; "
           f"seeds {meta['seeds']}; CIs: two-level paired bootstrap, 95%, {meta['n_boot']} resamples; "
           f"{meta['elapsed_s']} s in all{' (resumed)' if meta.get('resumed') else ''} "
           f"(generated by bench/compare_methods.py --sweep).\n\n",
           "The paper's Fig. 5 on the demo: task score against trainable parameters and against the general-loss "
           "rise over the untuned model. *front (params)*: no other point has a higher score with fewer trainable "
           "parameters; *front (rise)*: none has a higher score with a lower rise.\n\n",
           f"| {name} | trainable | task score [95% CI] | " + " | ".join(tasks)
           + " | general-loss rise [95% CI] | s/step | front (params) | front (rise) |\n"
           "|---:|---:|---|" + "---:|" * len(tasks) + "---|---:|---|---|\n"]
    for p in points:
        out.append(f"| {p[knob]:g} | {int(p['trainable_params']):,} | {p['task_score']:.3f} "
                   f"[{p['task_score_ci'][0]:.3f}, {p['task_score_ci'][1]:.3f}] | "
                   + " | ".join(f"{p['per_task'][t]:.3f}" for t in tasks)
                   + f" | {p['general_loss_rise']:.3f} [{p['general_loss_rise_ci'][0]:.3f}, "
                   f"{p['general_loss_rise_ci'][1]:.3f}] | {p['step_time']:.3f} | "
                   f"{'**yes**' if p['pareto_trainable_params'] else 'no'} | "
                   f"{'**yes**' if p['pareto_general_loss_rise'] else 'no'} |\n")
    return "".join(out)


def write_sweep(path: Path, meta: dict, points: list[dict], rows: list[dict]) -> None:
    """<stem>.json (meta, points, per-example rows) and <stem>.md (the table)."""
    path.write_text(json.dumps({"meta": meta, "points": points, "rows": rows}) + "\n")
    path.with_suffix(".md").write_text(sweep_markdown(points, meta))
