"""Expert relevance scores (ESFT-Gate, ESFT-Token) computed in SQL from the trace store, registered by name.

Notation (DESIGN.md): layer l, expert i, sample j of L_j tokens, N_s samples, K experts per token,
g_{i,k} the gate weight of expert i for token k (0 when not in the token's top-K).
- gate,  normalize=sample (the paper):  g_i = 1/N_s Σ_j 1/L_j Σ_k g_{i,k}
- token, normalize=sample (the paper):  r_i = 1/N_s Σ_j 1/L_j Σ_k 1(g_{i,k} > 0) / K
- normalize=token (the authors' shipped summary.json / configs): Σ over all tokens ÷ number of tokens.
Every score is an SQL expression over the per-(layer, expert) sums in `expert_stats` (n_selected, gate_sum,
sample_token_sum, sample_gate_sum) and the totals of the runs (n_tokens, n_samples, top_k). Several complete runs of
a task (e.g. recorded on several machines and merged) pool into one score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from esft_core import store
from esft_core.errors import EsftError

NORMALIZATIONS = ("token", "sample")


@dataclass(frozen=True)
class ScoreFunction:
    """A named expert score: one SQL expression per normalisation (see module docstring for the columns)."""

    name: str
    help: str
    token_sql: str
    sample_sql: str

    def sql(self, normalize: str) -> str:
        if normalize not in NORMALIZATIONS:
            raise EsftError(f"unknown normalization '{normalize}'; choose one of {', '.join(NORMALIZATIONS)}")
        return self.token_sql if normalize == "token" else self.sample_sql


SCORES: dict[str, ScoreFunction] = {}


def register_score(fn: ScoreFunction) -> ScoreFunction:
    SCORES[fn.name] = fn
    return fn


register_score(ScoreFunction(
    "gate", "average gate score (ESFT-Gate): mean gate weight an expert gets per token",
    token_sql="gate_sum / n_tokens",
    sample_sql="sample_gate_sum / n_samples",
))
register_score(ScoreFunction(
    "token", "token selection ratio (ESFT-Token): share of top-K slots that pick the expert",
    token_sql="n_selected / (top_k * n_tokens)",
    sample_sql="sample_token_sum / (top_k * n_samples)",
))
register_score(ScoreFunction(
    "gate_norm", "scale-free gate score: as gate, with each token's top-K weights divided by their sum (comparable "
                 "across families whose routers scale weights differently; sums to 1 per layer)",
    token_sql="norm_gate_sum / n_tokens",
    sample_sql="sample_norm_gate_sum / n_samples",
))


def get_score(metric: str) -> ScoreFunction:
    if metric not in SCORES:
        raise EsftError(f"unknown metric '{metric}'; choose one of {', '.join(SCORES)}")
    return SCORES[metric]


@dataclass
class Scores:
    """Scores of one task: `values[li, e]` is the score of expert e in layer `layers[li]`. Shape (layers, E)."""

    task: str
    metric: str
    normalize: str
    layers: list[int]
    values: np.ndarray = field(repr=False)
    run_ids: list[int]
    top_k: int
    n_tokens: int
    n_samples: int

    @property
    def num_experts(self) -> int:
        return int(self.values.shape[1])

    def row(self, layer: int) -> np.ndarray:
        return self.values[self.layers.index(layer)]


SCORE_SQL = """
WITH sel AS (SELECT run_id, layers, num_experts FROM runs WHERE run_id IN ({ids})),
tot AS (SELECT sum(n_tokens)::DOUBLE AS n_tokens, sum(n_samples)::DOUBLE AS n_samples,
               any_value(top_k)::DOUBLE AS top_k FROM runs WHERE run_id IN ({ids})),
agg AS (SELECT layer, expert, sum(n_selected)::DOUBLE AS n_selected, sum(gate_sum) AS gate_sum,
               sum(sample_token_sum) AS sample_token_sum, sum(sample_gate_sum) AS sample_gate_sum
        FROM expert_stats WHERE run_id IN ({ids}) GROUP BY layer, expert),
norm AS (SELECT layer, expert, sum(norm_gate_sum) AS norm_gate_sum, sum(sample_norm_gate_sum) AS sample_norm_gate_sum
         FROM {norm_rel} GROUP BY layer, expert),
grid AS (SELECT l.layer, e.expert
         FROM (SELECT DISTINCT unnest(layers)::SMALLINT AS layer FROM sel) l
         CROSS JOIN (SELECT range::SMALLINT AS expert FROM range((SELECT max(num_experts) FROM sel))) e),
cells AS (SELECT grid.layer, grid.expert,
                 coalesce(agg.n_selected, 0) AS n_selected, coalesce(agg.gate_sum, 0) AS gate_sum,
                 coalesce(agg.sample_token_sum, 0) AS sample_token_sum,
                 coalesce(agg.sample_gate_sum, 0) AS sample_gate_sum,
                 coalesce(norm.norm_gate_sum, 0) AS norm_gate_sum,
                 coalesce(norm.sample_norm_gate_sum, 0) AS sample_norm_gate_sum,
                 tot.n_tokens, tot.n_samples, tot.top_k
          FROM grid LEFT JOIN agg ON grid.layer = agg.layer AND grid.expert = agg.expert
          LEFT JOIN norm ON grid.layer = norm.layer AND grid.expert = norm.expert CROSS JOIN tot)
SELECT layer, expert, {expr} AS score FROM cells ORDER BY layer, expert
"""


def score_sql(metric: str, normalize: str, run_ids: list[int]) -> str:
    """The SQL computing (layer, expert, score) of `metric` over `run_ids` (for `esft sql` users, too)."""
    ids = ", ".join(str(int(r)) for r in run_ids)
    expr = get_score(metric).sql(normalize)
    norm_rel = (f"(SELECT * FROM expert_norm_stats WHERE run_id IN ({ids}))" if "norm_gate_sum" in expr else
                "(SELECT NULL::SMALLINT AS layer, NULL::SMALLINT AS expert, NULL::DOUBLE AS norm_gate_sum, "
                "NULL::DOUBLE AS sample_norm_gate_sum WHERE false)")  # older DBs lack expert_norm_stats
    return SCORE_SQL.format(ids=ids, expr=expr, norm_rel=norm_rel)


def compute_scores(con, task: str, metric: str = "token", normalize: str = "token",
                   run_ids: list[int] | None = None, model: str | None = None, pool_models: bool = False) -> Scores:
    """Scores of `task` over its complete runs (or `run_ids`) of `model`, read from an open connection.

    Without `model`, runs of several models are refused unless `pool_models` (see store.complete_runs)."""
    fn = get_score(metric)
    fn.sql(normalize)  # validates normalize
    runs = store.complete_runs(con, task, run_ids, model, pool_models)
    ids = [r[0] for r in runs]
    rows = con.execute(score_sql(metric, normalize, ids)).fetchnumpy()
    layers = sorted({int(x) for x in rows["layer"]})
    n_e = int(max(r[1] for r in runs))
    values = np.asarray(rows["score"], dtype=np.float64).reshape(len(layers), n_e)  # (layers, E)
    return Scores(task, metric, normalize, layers, values, ids, int(runs[0][2]),
                  int(sum(r[5] for r in runs)), int(sum(r[4] for r in runs)))


def load_scores(db, task: str, metric: str = "token", normalize: str = "token",
                run_ids: list[int] | None = None, model: str | None = None, pool_models: bool = False) -> Scores:
    """compute_scores on a short-lived read-only connection to `db`."""
    with store.reader(db) as con:
        return compute_scores(con, task, metric, normalize, run_ids, model, pool_models)


def esft_summary(db, task: str, normalize: str = "token", run_ids: list[int] | None = None,
                 digits: int = 4, model: str | None = None, pool_models: bool = False) -> dict:
    """The authors' summary.json structure: {"token_scores": {layer: {expert: s}}, "gate_scores": {...}}, rounded."""
    out = {}
    with store.reader(db) as con:
        for metric in ("token", "gate"):
            s = compute_scores(con, task, metric, normalize, run_ids, model, pool_models)
            out[f"{metric}_scores"] = {
                str(layer): {str(e): round(float(v), digits) for e, v in enumerate(s.row(layer))}
                for layer in sorted(s.layers, key=str)  # string order, as the authors' files
            }
    return out
