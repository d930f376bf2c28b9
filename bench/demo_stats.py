"""Figures of the shipped demo model: pre-training summary, held-out general loss, routing concentration per task,
cross-task overlap of the selected expert sets, and untuned task scores.

Routing goes through the real pipeline: record each task's train split into a temporary DuckDB trace store, score
(token selection ratio, token normalisation) and select with top-p = 0.2. Prints a table and a final JSON line.

    .venv/bin/python bench/demo_stats.py [--max-tokens 32768] [--eval-limit 50]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esft_core.data import read_records  # noqa: E402
from esft_core.demo.tasks import TASKS  # noqa: E402
from esft_core.evaluation.evaluate import evaluate_file, loss_over  # noqa: E402
from esft_core.models.loading import DEMO_MODEL, REPO_ROOT, load_model  # noqa: E402
from esft_core.selection.select import select_for_task  # noqa: E402
from esft_core.traces import record as rec  # noqa: E402
from esft_core.traces import store  # noqa: E402

DATA = REPO_ROOT / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=32768, help="tokens recorded per task")
    ap.add_argument("--eval-limit", type=int, default=50, help="eval examples per task for the untuned score")
    ap.add_argument("--top-p", type=float, default=0.2, help="selection threshold (token score)")
    args = ap.parse_args()
    t0 = time.time()
    log = json.loads((DEMO_MODEL / "build_log.json").read_text())
    curve = np.array(log["loss_curve"])
    model, tok = load_model("demo")
    held = read_records(DATA / "general" / "heldout.jsonl")
    general_loss = loss_over(model, tok, held, seq_len=256)

    sets: dict[str, dict[int, set[int]]] = {}
    per_task = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "demo.duckdb"
        for name in [*TASKS, "general"]:
            path = DATA / "general" / "train.jsonl" if name == "general" else DATA / "tasks" / name / "train.jsonl"
            rec.record(model, tok, read_records(path), db, name, max_tokens=args.max_tokens, seq_len=256)
        with store.reader(db) as con:
            for name in [*TASKS, "general"]:
                sel = select_for_task(con, name, "token", "token", p=args.top_p)
                sets[name] = {layer: set(ex) for layer, ex in sel.experts.items()}
    for name, spec in TASKS.items():
        ev = evaluate_file(model, tok, DATA / "tasks" / name / "eval.jsonl", task=name, limit=args.eval_limit,
                           seq_len=256)
        per_task[name] = {"kind": spec.kind, "experts_per_layer": round(float(np.mean([len(s) for s in
                          sets[name].values()])), 2), "untuned_score": ev["score"], "metric": spec.metric_name}

    def jaccard(a: str, b: str) -> float:
        return float(np.mean([len(sets[a][layer] & sets[b][layer]) / len(sets[a][layer] | sets[b][layer])
                              for layer in sets[a]]))

    pairs = {f"{a}/{b}": round(jaccard(a, b), 3) for a, b in itertools.combinations(TASKS, 2)}
    n_experts = model.config.n_routed_experts
    out = {
        "params": log["params"], "build_seconds": log["seconds"], "tokens_seen": log["tokens_seen"],
        "pretrain_loss": {"first": float(curve[0]), "min": float(curve.min()),
                          "last50_mean": round(float(curve[-50:].mean()), 4)},
        "general_heldout_loss": round(general_loss, 4),
        "num_experts": n_experts, "top_k": model.config.num_experts_per_tok,
        "tasks": per_task,
        "general_experts_per_layer": round(float(np.mean([len(s) for s in sets["general"].values()])), 2),
        "mean_pairwise_jaccard": round(float(np.mean(list(pairs.values()))), 3),
        "pairwise_jaccard": pairs,
        "seconds": round(time.time() - t0, 1),
    }
    print(f"{'task':10} {'kind':12} {'experts/layer (p=' + str(args.top_p) + ')':>24} {'untuned score':>14}")
    for name, r in per_task.items():
        print(f"{name:10} {r['kind']:12} {r['experts_per_layer']:>24} {r['untuned_score']:>14.3f}")
    print(f"mean pairwise Jaccard of selected sets: {out['mean_pairwise_jaccard']}; "
          f"general held-out loss {out['general_heldout_loss']}")
    (REPO_ROOT / "bench" / "results" / "demo_stats.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
