"""Are the demo model's scored experts specialised? Expert ablation with all-token and answer-token scores.

For each task: route the first `--n` training records through the untuned model and compute the token selection
ratio (ESFT-Token, per-token normalisation) twice: over every token (the paper) and over the loss-bearing positions
only (the positions whose next-token prediction is an assistant answer token). Select experts with top-p on each.
Then zero the selected experts (their rows of the fused `gate_up_proj` / `down_proj`, so they output 0 whenever the
router picks them) and measure the task's answer loss on its eval split and the general held-out loss, against
zeroing the same number of random experts per layer (`--draws` seeded draws). If the scored experts are the task's
experts, zeroing them must hurt the task far more than zeroing random ones, and the general corpus less.

    python bench/expert_ablation.py [--tasks law,intent] [--p 0.2] [--n 128] [--draws 5]

Writes bench/results/expert_ablation.{json,md}; the last stdout line is JSON {task: {variant: task_loss_rise}}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def route_scores(model, tok, records: list[dict], seq_len: int = 256) -> dict[str, np.ndarray]:
    """Token selection ratio (layers, E) over all positions and over loss-bearing positions."""
    from esft_core.data import IGNORE_INDEX, encode_record
    from esft_core.models.loading import moe_layout
    from esft_core.traces.record import RouterTap

    lay = moe_layout(model)
    n_l, n_e, k = len(lay.layers), lay.num_experts, lay.top_k
    counts = {"all": np.zeros((n_l, n_e)), "answer": np.zeros((n_l, n_e))}
    n_tok = {"all": 0, "answer": 0}
    for rec in records:
        ids, labels = encode_record(rec, tok)
        ids, labels = ids[:seq_len], labels[:seq_len]
        # position t is loss-bearing when its prediction (token t+1) is a label
        loss = np.array([labels[t + 1] != IGNORE_INDEX for t in range(len(ids) - 1)] + [False])  # (T,)
        with RouterTap(lay) as tap:
            model(input_ids=torch.tensor([ids]), logits_to_keep=1, use_cache=False)
            _, experts = tap.take(torch.ones(len(ids), dtype=torch.bool))  # (L, T, K)
        for name, mask in (("all", np.ones_like(loss)), ("answer", loss)):
            sel = experts[:, mask]  # (L, T', K)
            for li in range(n_l):
                counts[name][li] += np.bincount(sel[li].reshape(-1), minlength=n_e)
            n_tok[name] += int(mask.sum())
    return {name: counts[name] / (k * n_tok[name]) for name in counts}


@contextlib.contextmanager
def zeroed(model, experts: dict[int, list[int]]):
    """Zero the given experts' fused weights for the duration of the block (restored after)."""
    from esft_core.models.loading import moe_layout

    lay = moe_layout(model)
    saved = []
    with torch.no_grad():
        for layer, ids in experts.items():
            for p in lay.expert_params(layer).values():  # [E, ...]
                saved.append((p, ids, p[ids].clone()))
                p[ids] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, ids, old in saved:
                p[ids] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="law,intent,translate,math")
    ap.add_argument("--p", type=float, default=0.2)
    ap.add_argument("--n", type=int, default=128, help="training records to score on")
    ap.add_argument("--draws", type=int, default=5, help="random expert draws per task")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--general-limit", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    from esft_core.data import read_records
    from esft_core.evaluation.evaluate import loss_over
    from esft_core.models.loading import DEMO_MODEL, load_model, moe_layout
    from esft_core.selection.select import top_p
    from esft_core.tuning.train import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok = load_model(DEMO_MODEL)
    model.eval()
    lay = moe_layout(model)
    data = ROOT / "data"
    general = read_records(data / "general" / "heldout.jsonl", limit=args.general_limit)
    base_general = loss_over(model, tok, general, seq_len=256)
    results = {}
    for task in args.tasks.split(","):
        train = read_records(data / "tasks" / task / "train.jsonl", limit=args.n)
        evals = read_records(data / "tasks" / task / "eval.jsonl", limit=args.eval_limit)
        scores = route_scores(model, tok, train)
        sel = {name: {layer: top_p(s[li], args.p) for li, layer in enumerate(lay.layers)}
               for name, s in scores.items()}
        base = loss_over(model, tok, evals, seq_len=256)
        # the whole chat as text: the task's prompts too (adaptation tasks' answers are unknown to the untuned model)
        texts = [{"text": f"User: {r['messages'][0]['content']}\n\nAssistant: {r['messages'][-1]['content']}"}
                 for r in evals]
        base_text = loss_over(model, tok, texts, seq_len=256)
        row = {"base_task_loss": base, "base_text_loss": base_text, "base_general_loss": base_general,
               "experts_all": {str(k): v for k, v in sel["all"].items()},
               "experts_answer": {str(k): v for k, v in sel["answer"].items()},
               "overlap": sum(len(set(sel["all"][la]) & set(sel["answer"][la])) for la in lay.layers),
               # share of the task's answer-position routing that the all-token selection covers, and vice versa
               "answer_mass_in_all_sel": float(np.mean([scores["answer"][li][sel["all"][la]].sum()
                                                        for li, la in enumerate(lay.layers)])),
               "all_mass_in_all_sel": float(np.mean([scores["all"][li][sel["all"][la]].sum()
                                                     for li, la in enumerate(lay.layers)])),
               "answer_mass_in_answer_sel": float(np.mean([scores["answer"][li][sel["answer"][la]].sum()
                                                           for li, la in enumerate(lay.layers)]))}
        for name in ("all", "answer"):
            with zeroed(model, sel[name]):
                row[f"zero_{name}"] = {"task_loss": loss_over(model, tok, evals, seq_len=256),
                                       "text_loss": loss_over(model, tok, texts, seq_len=256),
                                       "general_loss": loss_over(model, tok, general, seq_len=256),
                                       "n_experts": sum(map(len, sel[name].values()))}
            rnd = []
            for d in range(args.draws):
                rng = random.Random(1000 * d + 7)
                pick = {la: rng.sample(range(lay.num_experts), len(v)) for la, v in sel[name].items()}
                with zeroed(model, pick):
                    rnd.append({"task_loss": loss_over(model, tok, evals, seq_len=256),
                                "text_loss": loss_over(model, tok, texts, seq_len=256),
                                "general_loss": loss_over(model, tok, general, seq_len=256)})
            row[f"zero_random_{name}"] = {
                "task_loss_mean": statistics.mean(r["task_loss"] for r in rnd),
                "task_loss_min": min(r["task_loss"] for r in rnd), "task_loss_max": max(r["task_loss"] for r in rnd),
                "text_loss_mean": statistics.mean(r["text_loss"] for r in rnd),
                "general_loss_mean": statistics.mean(r["general_loss"] for r in rnd), "draws": rnd}
        results[task] = row
        print(f"[{time.time() - t0:5.0f}s] {task}: base {base:.3f}; zero all-token sel "
              f"{row['zero_all']['task_loss']:.3f} vs random {row['zero_random_all']['task_loss_mean']:.3f}; "
              f"zero answer-token sel {row['zero_answer']['task_loss']:.3f} vs random "
              f"{row['zero_random_answer']['task_loss_mean']:.3f}", file=sys.stderr, flush=True)
    meta = {"p": args.p, "n": args.n, "draws": args.draws, "eval_limit": args.eval_limit,
            "general_limit": args.general_limit, "elapsed_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_ablation.json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=1) + "\n")
    lines = ["# expert_ablation\n\n",
             f"ESFT-Token scores (token normalisation) on {args.n} training records per task, top-p {args.p}; "
             f"task answer loss on {args.eval_limit} eval examples, general loss on {args.general_limit} held-out "
             f"documents; random = same count per layer, {args.draws} draws (mean [min, max]). "
             f"{meta['elapsed_s']} s.\n\n",
             "| task | scores | experts | overlap | answer loss: none | zero selected | zero random | "
             "chat-text loss: none | zero selected | zero random | general: none | zero selected | zero random |\n"
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"]
    for task, r in results.items():
        for name in ("all", "answer"):
            z, zr = r[f"zero_{name}"], r[f"zero_random_{name}"]
            lines.append(f"| {task} | {name} | {z['n_experts']} | {r['overlap']} | {r['base_task_loss']:.3f} | "
                         f"{z['task_loss']:.3f} | {zr['task_loss_mean']:.3f} [{zr['task_loss_min']:.3f}, "
                         f"{zr['task_loss_max']:.3f}] | {r['base_text_loss']:.3f} | {z['text_loss']:.3f} | "
                         f"{zr['text_loss_mean']:.3f} | {r['base_general_loss']:.3f} | {z['general_loss']:.3f} | "
                         f"{zr['general_loss_mean']:.3f} |\n")
    (out / "expert_ablation.md").write_text("".join(lines))
    print(json.dumps({t: {n: round(r[f"zero_{n}"]["task_loss"] - r["base_task_loss"], 4) for n in ("all", "answer")}
                      | {f"random_{n}": round(r[f"zero_random_{n}"]["task_loss_mean"] - r["base_task_loss"], 4)
                         for n in ("all", "answer")} for t, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
