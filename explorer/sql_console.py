"""The explorer's SQL console: example queries and a read-only, row-capped, time-limited query runner.

No streamlit here; explorer/page_sql.py renders it. The query runs through esft_core.traces.sqlguard (shared with
`esft sql`): read-only, external file access disabled, memory and time limits, configuration locked so a query
cannot re-enable file access or change limits.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from esft_core.errors import EsftError
from esft_core.traces import store
from esft_core.traces.sqlguard import DEFAULT_MEMORY_LIMIT, QueryLimits, run_query, sandbox_config, spill_dir_removed

LOCK_WAIT_S = 8.0  # how long a console query waits for a writer holding the DB lock

EXAMPLE_QUERIES = {
    "Runs": "SELECT run_id, task, model, status, n_tokens, num_experts, top_k FROM runs ORDER BY run_id",
    "Expert load per layer (latest run)": """SELECT layer, expert, n_selected,
  round(n_selected / sum(n_selected) OVER (PARTITION BY layer), 4) AS share
FROM expert_stats WHERE run_id = (SELECT max(run_id) FROM runs WHERE status = 'complete')
ORDER BY layer, n_selected DESC""",
    "Top tokens of an expert": """SELECT token_text, n, round(gate_sum / n, 3) AS mean_gate
FROM expert_tokens WHERE run_id = (SELECT max(run_id) FROM runs WHERE status = 'complete')
  AND layer = (SELECT min(layer) FROM expert_stats) AND expert = 0
ORDER BY n DESC LIMIT 20""",
    "Tasks sharing an expert": """SELECT s.layer, s.expert, list(r.task ORDER BY r.task) AS tasks, count(*) AS n_tasks
FROM expert_stats s JOIN runs r USING (run_id)
WHERE r.status = 'complete' AND s.n_selected > 0.05 * r.n_tokens
GROUP BY ALL HAVING count(*) > 1 ORDER BY n_tasks DESC, layer, expert LIMIT 50""",
    "Concentration (experts for 50% of gate mass)": """WITH s AS (
  SELECT r.task, e.layer, e.expert, e.gate_sum / r.n_tokens AS g FROM expert_stats e JOIN runs r USING (run_id)
  WHERE r.status = 'complete'),
c AS (SELECT *, sum(g) OVER (PARTITION BY task, layer ORDER BY g DESC ROWS UNBOUNDED PRECEDING) AS cum,
             sum(g) OVER (PARTITION BY task, layer) AS total FROM s)
SELECT task, layer, count(*) FILTER (WHERE cum - g < 0.5 * total) AS experts_for_half FROM c
GROUP BY ALL ORDER BY task, layer""",
    "Per-sample routing (first sample, first MoE layer)": """SELECT t.position, t.token_text,
  list(r.expert ORDER BY r.rank) AS experts, list(round(r.weight, 3) ORDER BY r.rank) AS weights
FROM tokens t JOIN routes r USING (run_id, sample_id, position)
WHERE t.run_id = (SELECT min(run_id) FROM runs WHERE status = 'complete') AND t.sample_id = 0
  AND r.layer = (SELECT min(layer) FROM expert_stats)
GROUP BY ALL ORDER BY t.position LIMIT 100""",
    "Compare two runs (load difference)": """WITH
a AS (SELECT layer, expert, n_selected / sum(n_selected) OVER (PARTITION BY layer) AS s
           FROM expert_stats WHERE run_id = (SELECT min(run_id) FROM runs WHERE status = 'complete')),
     b AS (SELECT layer, expert, n_selected / sum(n_selected) OVER (PARTITION BY layer) AS s
           FROM expert_stats WHERE run_id = (SELECT max(run_id) FROM runs WHERE status = 'complete'))
SELECT layer, expert, round(coalesce(a.s, 0), 4) AS run_a, round(coalesce(b.s, 0), 4) AS run_b,
       round(coalesce(b.s, 0) - coalesce(a.s, 0), 4) AS diff
FROM a FULL JOIN b USING (layer, expert) ORDER BY abs(diff) DESC LIMIT 30""",
}


class SqlResult:
    """Result of a console query: frame (at most row_cap rows), truncated flag, elapsed milliseconds."""

    def __init__(self, frame: pl.DataFrame, truncated: bool, ms: float):
        self.frame, self.truncated, self.ms = frame, truncated, ms


def run_sql(db: str | Path, query: str, row_cap: int = 1000, timeout_s: float = 10.0,
            memory_limit: str = DEFAULT_MEMORY_LIMIT) -> SqlResult:
    """Run a user query on a read-only connection with external access disabled, at most `row_cap` rows returned,
    interrupted after `timeout_s`, within DuckDB `memory_limit` (the limits of `esft sql`, esft_core.traces.sqlguard).
    Raises ValueError with DuckDB's message on any SQL error or timeout."""
    if not query.strip():
        raise ValueError("empty query")
    t0 = time.perf_counter()
    try:
        limits = QueryLimits(timeout_s=timeout_s, memory_limit=memory_limit, max_rows=row_cap)
        with spill_dir_removed(db), store.reader(db, timeout=LOCK_WAIT_S, external_access=False,
                                                 config=sandbox_config(limits)) as con:
            cols, table, truncated = run_query(con, query, limits)
    except EsftError as e:
        raise ValueError(str(e)) from None
    if not cols:
        return SqlResult(pl.DataFrame(), False, (time.perf_counter() - t0) * 1e3)
    frame = pl.from_arrow(table)
    if isinstance(frame, pl.Series):
        frame = frame.to_frame()
    return SqlResult(frame, truncated, (time.perf_counter() - t0) * 1e3)
