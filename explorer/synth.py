"""Synthetic trace databases in the contract schema (docs/CONTRACTS.md), generated entirely inside DuckDB.

Used by bench/explorer_queries.py (80 M route rows) and by the tests (a few thousand rows) so both exercise the real
query functions on a real DuckDB file without running a model. Routing is skewed per task and layer, so tasks
concentrate on different experts like a trained MoE does: expert = (skewed base + rank * 7) mod E, where the base
favours a task- and layer-specific offset. The `+ rank * 7` stride keeps the K experts of a token distinct whenever
E is a power of two (or any E coprime with 7 and > 6 * 7).
"""

from __future__ import annotations

import json

import duckdb

from esft_core.traces import store

WORDS = ["the", "model", "expert", "route", "token", "layer", "gate", "task", "law", "code", "math", "intent", "sum",
         "of", "to", "and", "is", "in", "for", "with", " ", "\n", "+", "=", "(", ")", "{", "}", "0", "1", "2", "é", "Σ"]


def synthesize(
    db: str,
    tasks: tuple[str, ...] = ("math", "code", "intent", "law"),
    tokens_per_task: int = 131072,
    layers: tuple[int, ...] = tuple(range(1, 27)),
    num_experts: int = 64,
    top_k: int = 6,
    sample_len: int = 512,
    model: str = "synthetic-moe",
    vocab: int = 2000,
) -> dict:
    """Write a complete synthetic trace DB (runs, samples, tokens, routes, expert_stats, expert_tokens)."""
    con = duckdb.connect(db)
    try:
        con.execute(store.SCHEMA)
        n_samples = max(1, tokens_per_task // sample_len)
        n_tok = n_samples * sample_len
        n_layers = len(layers)
        layer_list = "[" + ",".join(str(x) for x in layers) + "]"
        base = int(con.sql("SELECT coalesce(max(run_id), 0) FROM runs").fetchall()[0][0])
        words = "[" + ",".join("'" + w.replace("'", "''") + "'" for w in WORDS) + "]"
        for t_i, task in enumerate(tasks):
            run = base + t_i + 1
            params = json.dumps({"data": f"synthetic/{task}.jsonl", "max_tokens": tokens_per_task})
            con.sql(
                "INSERT INTO runs VALUES (?, ?, ?, 'record', 'complete', ?, ?, " + layer_list + ", ?, ?, ?, "
                "now()::TIMESTAMP, now()::TIMESTAMP)",
                params=[run, task, model, num_experts, top_k, n_samples, n_tok, params],
            )
            con.sql(
                f"INSERT INTO samples SELECT {run}, i, {sample_len}, 'synthetic sample ' || i || ' of {task}' "
                f"FROM range({n_samples}) t(i)"
            )
            # Zipf-ish token ids: small ids are frequent.
            con.sql(
                f"""INSERT INTO tokens (run_id, sample_id, position, token_id, token_text)
                    SELECT {run}, i // {sample_len}, i % {sample_len}, tid,
                      {words}[1 + tid % {len(WORDS)}] || CASE WHEN tid >= {len(WORDS)} THEN tid::VARCHAR ELSE '' END
                    FROM (SELECT i, (floor(pow((hash(i * 31 + {run}) % 1000003) / 1000003.0, 3) * {vocab}))::INTEGER
                          AS tid FROM range({n_tok}) t(i))"""
            )
            # One row per (token, layer, rank), in storage order (run, sample, position, layer, rank).
            layer_arr = layer_list
            con.sql(
                f"""INSERT INTO routes
                SELECT {run}, tok // {sample_len}, tok % {sample_len}, layer, rank,
                       ((b + rank * 7) % {num_experts})::SMALLINT,
                       (w0 * pow(0.72, rank))::FLOAT
                FROM (
                  SELECT i // ({n_layers} * {top_k}) AS tok,
                         {layer_arr}[1 + (i // {top_k}) % {n_layers}]::SMALLINT AS layer,
                         (i % {top_k})::TINYINT AS rank,
                         (floor(pow((hash(i // {top_k} + {run} * 7919) % 1000003) / 1000003.0, 2.2)
                                * {num_experts}) + {t_i} * 11 + ((i // {top_k}) % {n_layers}) * 5)::BIGINT AS b,
                         0.26 + ((hash(i // {top_k}) % 1000) / 1000.0) * 0.1 AS w0
                  FROM range({n_tok} * {n_layers} * {top_k}) t(i)
                )"""
            )
        for i in range(len(tasks)):  # the recorder's aggregates (expert_stats, expert_tokens, sample_expert_stats)
            store.write_aggregates(con, base + i + 1)
        return {"db": db, "route_rows": len(tasks) * n_tok * n_layers * top_k, "runs": len(tasks)}
    finally:
        con.close()
