"""Time every query function the explorer pages call, on a synthetic trace DB in the contract schema.

Default scale is the issue's: 4 tasks × 131,072 tokens × 26 layers × top-6 of 64 experts = 81.8 M route rows,
generated inside DuckDB (explorer/synth.py). Each query runs the way a page runs it uncached: open a read-only
connection, query, close. We report the median of --repeat runs after one warm-up (pages cache results with
st.cache_data, so a user waits for this time once per DB change). Final line: {"max_query_ms": .., "queries": {..}}.

    .venv/bin/python bench/explorer_queries.py              # full scale (~1-2 min to build on 2 cores)
    .venv/bin/python bench/explorer_queries.py --rows 2e6   # scaled down quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import queries as q  # noqa: E402
from explorer import sql_console as sc  # noqa: E402
from explorer import synth  # noqa: E402

FULL_TOKENS, TASKS, LAYERS, K, E = 131072, ("math", "code", "intent", "law"), 26, 6, 64


def timed(db: str, fn, repeat: int) -> float:
    fn(db)  # warm-up: first touch of the file pages in the OS cache
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(db)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def with_con(f):
    def run(db):
        with q.reading(db) as con:
            return f(con)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=None, help="total route rows (default: the full 81.8 M)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--db", help="reuse/keep the DB at this path (default: a temp file, deleted)")
    args = ap.parse_args()
    per_tok = LAYERS * K * len(TASKS)
    tokens = FULL_TOKENS if args.rows is None else max(2048, int(args.rows) // per_tok // 512 * 512)
    tmp = tempfile.TemporaryDirectory()
    db = args.db or str(Path(tmp.name) / "bench.duckdb")
    t0 = time.perf_counter()
    if not Path(db).exists():
        synth.synthesize(db, tasks=TASKS, tokens_per_task=tokens, layers=tuple(range(1, LAYERS + 1)),
                         num_experts=E, top_k=K, sample_len=512)
    build_s = time.perf_counter() - t0
    with q.reading(db) as con:
        model = q.models(con)[0]
        runs = {t: q.latest_run(con, model, t) for t in TASKS}
        rows = int(con.sql("SELECT count(*) FROM routes").fetchall()[0][0])
    print(f"db {db}: {rows:,} route rows, built in {build_s:.1f} s", file=sys.stderr)
    r1 = runs[TASKS[0]]
    mid_sample = int(tokens // 512 // 2)

    def scores(con, metric="gate", norm="token"):
        return q.expert_scores(con, model, None, metric, norm)

    def scored(f):
        # Pure Polars steps on the score frame, timed including the score query they need.
        def run(db):
            with q.reading(db) as con:
                s = scores(con)
            return f(s)
        return run

    bench = {
        "list_runs": with_con(q.list_runs),
        "models": with_con(q.models),
        "tasks": with_con(lambda c: q.tasks(c, model)),
        "model_layout": with_con(lambda c: q.model_layout(c, model)),
        "latest_run": with_con(lambda c: q.latest_run(c, model, TASKS[0])),
        "db_summary": with_con(q.db_summary),
        "expert_scores_gate_token": with_con(lambda c: scores(c, "gate", "token")),
        "expert_scores_token_sample": with_con(lambda c: scores(c, "token", "sample")),
        "select_top_p": scored(lambda s: q.select_top_p(s, 0.2)),
        "concentration": scored(lambda s: q.concentration_spread(q.concentration(s))),
        "experts_needed": scored(lambda s: q.experts_needed(s, 0.2)),
        "shared_topk": scored(lambda s: q.shared_topk(s, K)),
        "jaccard_by_layer": scored(lambda s: q.jaccard_by_layer(q.select_top_p(s, 0.2))),
        "weighted_overlap": scored(q.weighted_overlap),
        "contrast_selection": with_con(lambda c: q.contrast_selection(c, model, TASKS[0], list(TASKS[1:]), "gate",
                                                                      "token", 0.2)),
        "list_samples": with_con(lambda c: q.list_samples(c, r1, 300)),
        "sample_routes": with_con(lambda c: q.sample_routes(c, r1, mid_sample, 13, 1024)),
        "sample_token_ids": with_con(lambda c: q.sample_token_ids(c, r1, mid_sample)),
        "top_tokens": with_con(lambda c: q.top_tokens(c, list(runs.values()), 13, 7, 12)),
        "expert_contexts": with_con(lambda c: q.expert_contexts(c, r1, 13, 7, 5, 8, 8192)),
        "expert_load": with_con(lambda c: q.expert_load(c, list(runs.values()))),
        "stability_view": with_con(lambda c: q.stability_view(c, model, TASKS[0], "token", "token", 0.2, 40)),
        "sql_example_runs": lambda d: sc.run_sql(d, sc.EXAMPLE_QUERIES["Runs"]),
        "sql_example_load": lambda d: sc.run_sql(d, sc.EXAMPLE_QUERIES["Expert load per layer (latest run)"]),
        "sql_select_star_routes_capped": lambda d: sc.run_sql(d, "SELECT * FROM routes", row_cap=1000),
    }
    out = {}
    for name, fn in bench.items():
        out[name] = round(timed(db, fn, args.repeat), 1)
        print(f"{name:32s} {out[name]:8.1f} ms", file=sys.stderr)
    result = {"max_query_ms": max(out.values()), "route_rows": rows, "build_s": round(build_s, 1),
              "repeat": args.repeat, "queries": out}
    print(json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    main()
