"""The official logs end to end: import + scores + select, ours vs an authors'-style numpy pipeline, same files.

- ours:     official.import_official() into a fresh DuckDB file (parse, validate, routes + aggregates stored), then
            token scores in SQL and top-p 0.2 selection → expert config;
- authors': per line `split('\\t\\t')`, `[int(i) ...]` / `[float(w) ...]` as in their get_expert_scores.py, np.add.at
            accumulation, 4-decimal summary, then their generate_expert_config.py selection.
Both must produce the same config (checked). Tasks intent and law from tests/fixtures/esft-official, interleaved, median
of --repeat. Prints a final JSON line {"speedup": authors' / ours, ...}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esft_core.models.loading import REPO_ROOT  # noqa: E402
from esft_core.selection.select import select_for_task  # noqa: E402
from esft_core.traces import (
    official,
    store,  # noqa: E402
)

SCORES = Path(REPO_ROOT) / "tests" / "fixtures" / "esft-official" / "expert_scores"


def authors_pipeline(log_dir: Path, top_k: int = 6, n_experts: int = 64, p: float = 0.2) -> dict:
    token_scores = {}
    for path in sorted(log_dir.glob("expert_weights_*.txt*")):
        layer = path.name.split("_")[2].split(".")[0]
        gate, tok = np.zeros(n_experts), np.zeros(n_experts)
        with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
            for line in f:
                ids, weights = line.split("\t\t")
                ids = [int(i) for i in ids.split("\t")]
                weights = [float(w) for w in weights.split("\t")]
                np.add.at(gate, ids, weights)
                np.add.at(tok, ids, 1.0 / top_k)
        total = tok.sum()
        token_scores[layer] = {e: round(v / total, 4) for e, v in enumerate(tok)}
        _gate_scores = {e: round(v / total, 4) for e, v in enumerate(gate)}
    experts = {}
    for layer, scores in token_scores.items():
        chosen, cur = [], 0.0
        for e, s in sorted(scores.items(), key=lambda x: x[1], reverse=True):
            if cur >= p:
                break
            chosen.append(e)
            cur += s
        experts[layer] = chosen
    return {"experts": experts, "shared_experts": False, "non_expert_modules": False}


def ours(log_dir: Path, db: Path, task: str, p: float = 0.2, parts: dict | None = None) -> dict:
    """official.import_official() step by step (to report where the time goes), then scores + select."""
    t0 = time.perf_counter()
    logs, k, n_e, lens = official.read_logs(log_dir)
    tables = official.build_tables(logs, k, lens)
    t1 = time.perf_counter()
    meta = dict(task=task, model=official.OFFICIAL_MODEL, source="official", num_experts=n_e, top_k=k,
                layers=[log.layer for log in logs], params={"log_dir": str(log_dir)})
    store.ingest_arrow(db, meta, tables, exact_weights=True)
    t2 = time.perf_counter()
    with store.reader(db) as con:
        cfg = select_for_task(con, task, "token", "token", p=p).to_dict()
    if parts is not None:
        for key, dt in (("parse", t1 - t0), ("db_write", t2 - t1), ("scores_select", time.perf_counter() - t2)):
            parts[key] = parts.get(key, 0.0) + dt
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tasks", default="intent,law")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    t_ours, t_auth, t_parts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours(SCORES / tasks[0], Path(tmp) / "warm.duckdb", "warm")  # warm-up (imports, pyarrow init)
        for i in range(args.repeat):
            a = b = 0.0
            parts: dict = {}
            for task in tasks:
                t = time.perf_counter()
                cfg_ours = ours(SCORES / task, Path(tmp) / f"{task}{i}.duckdb", task, parts=parts)
                a += time.perf_counter() - t
                t = time.perf_counter()
                cfg_auth = authors_pipeline(SCORES / task)
                b += time.perf_counter() - t
                if cfg_ours != cfg_auth:
                    raise SystemExit(f"configs differ for {task}")
            t_ours.append(a)
            t_auth.append(b)
            t_parts.append(parts)
    a, b = statistics.median(t_ours), statistics.median(t_auth)
    print(json.dumps({"speedup": round(b / a, 2), "ours_s": round(a, 3), "authors_numpy_s": round(b, 3),
                      "ours_parts_s": {k: round(statistics.median(p[k] for p in t_parts), 3) for k in t_parts[0]},
                      "tasks": tasks, "repeat": args.repeat, "same_configs": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
