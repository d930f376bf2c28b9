"""Route rows per second into the DuckDB trace store.

Synthetic routes shaped like a recording (batches of 8 x 512 tokens, rows layer-major within a batch, 26 MoE
layers x top-6 of 64 like DeepSeek-V2-Lite, Zipf-distributed token ids, random experts and weights) are written three
ways into fresh DB files, median over --repeat:
- insert:      one transaction `INSERT INTO routes SELECT * FROM <Arrow table>` + COMMIT (the bulk insert itself);
- stage:       StagedRun.stage(): Arrow → Parquet parts next to the DB (what happens while the model runs);
- commit:      StagedRun.commit(): Parquet parts → routes, plus the expert_stats/expert_tokens aggregates, one
               transaction (what happens once at the end of a recording).
Prints a final JSON line {"rows_per_s": insert rate, "stage_rows_per_s": ..., "commit_rows_per_s": ...,
"end_to_end_rows_per_s": rows / (stage + commit), ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esft_core.traces import (
    staging,
    store,  # noqa: E402
)


def synthetic(n_tokens: int, layers: int, k: int, experts: int, batch: int = 4096, seq: int = 512, seed: int = 0):
    """(samples, tokens, routes) Arrow tables of a recording of n_tokens tokens."""
    rng = np.random.default_rng(seed)
    n_tokens -= n_tokens % batch
    sample = (np.arange(n_tokens) // seq).astype(np.int32)  # (T,)
    pos = (np.arange(n_tokens) % seq).astype(np.int32)  # (T,)
    nb = n_tokens // batch
    # layer-major inside each batch: (batches, layers, batch tokens, K)
    shape = (nb, layers, batch, k)
    s4 = np.broadcast_to(sample.reshape(nb, 1, batch, 1), shape).ravel()
    p4 = np.broadcast_to(pos.reshape(nb, 1, batch, 1), shape).ravel()
    l4 = np.broadcast_to(np.arange(1, layers + 1, dtype=np.int16).reshape(1, layers, 1, 1), shape).ravel()
    r4 = np.broadcast_to(np.arange(k, dtype=np.int8).reshape(1, 1, 1, k), shape).ravel()
    w = np.sort(rng.random(shape, dtype=np.float32), axis=-1)[..., ::-1].ravel()
    n = s4.size
    # token ids Zipf-distributed like natural text (sets how many (layer, expert, token) groups expert_tokens gets)
    tok_ids = (np.minimum(rng.zipf(1.2, n_tokens), 32000) - 1).astype(np.int32)  # (T,)
    routes = pa.table({"run_id": pa.repeat(pa.scalar(1, pa.int32()), n), "sample_id": s4, "position": p4,
                       "layer": l4, "rank": r4, "expert": rng.integers(0, experts, n).astype(np.int16),
                       "weight": w,
                       # the recorder stages each row's token id too (expert_tokens without a join)
                       "token_id": np.broadcast_to(tok_ids.reshape(nb, 1, batch, 1), shape).ravel()})
    tokens = pa.table({"run_id": pa.repeat(pa.scalar(1, pa.int32()), n_tokens), "sample_id": sample,
                       "position": pos, "token_id": tok_ids,
                       "token_text": pa.array([f"t{i}" for i in range(32000)]).take(tok_ids)})
    n_s = int(sample[-1]) + 1
    samples = pa.table({"run_id": pa.repeat(pa.scalar(1, pa.int32()), n_s),
                        "sample_id": np.arange(n_s, dtype=np.int32), "n_tokens": np.full(n_s, seq, np.int32),
                        "text": pa.nulls(n_s, pa.string())})
    return samples, tokens, routes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens (rows = tokens x layers x K)")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    samples, tokens, routes = synthetic(args.tokens, args.layers, args.top_k, args.experts)
    n = routes.num_rows
    t_ins, t_stage, t_commit = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            db = Path(tmp) / f"insert{i}.duckdb"
            store.connect(db).close()  # schema
            con = store.connect(db)
            t = time.perf_counter()
            con.execute("BEGIN TRANSACTION")
            con.register("arrow_routes", routes)
            con.execute("INSERT INTO routes SELECT * EXCLUDE (token_id) FROM arrow_routes")
            con.execute("COMMIT")
            t_ins.append(time.perf_counter() - t)
            con.close()

            db = Path(tmp) / f"staged{i}.duckdb"
            run = staging.StagedRun(db, "bench", "synthetic", args.experts, args.top_k,
                                  list(range(1, args.layers + 1)), {})
            t = time.perf_counter()
            step = 4_000_000  # the recorder's default flush size
            for start in range(0, n, step):
                part = {"routes": routes.slice(start, step)}
                if start == 0:
                    part |= {"samples": samples, "tokens": tokens}
                run.stage(part)
            t_stage.append(time.perf_counter() - t)
            t = time.perf_counter()
            run.commit()
            t_commit.append(time.perf_counter() - t)
    ins, stage, commit = (statistics.median(x) for x in (t_ins, t_stage, t_commit))
    print(json.dumps({
        "rows_per_s": round(n / ins), "stage_rows_per_s": round(n / stage), "commit_rows_per_s": round(n / commit),
        "end_to_end_rows_per_s": round(n / (stage + commit)), "rows": n, "repeat": args.repeat,
        "median_s": {"insert": round(ins, 3), "stage": round(stage, 3), "commit": round(commit, 3)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
