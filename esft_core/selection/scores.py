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

from esft_core.errors import EsftError
from esft_core.traces import store

NORMALIZATIONS = ("token", "sample")
TOKEN_SETS = ("all", "answer")  # all = the paper; answer = only positions whose prediction is in the loss


@dataclass(frozen=True)
class ScoreFunction:
    """A named expert score: one SQL expression per normalisation (see module docstring for the columns)."""

    name: str
    help: str
    token_sql: str
    sample_sql: str
    default_p: float = 0.1  # the explorer's first top-p threshold (the paper: 0.1 for gate, 0.2 for token)

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
    default_p=0.2,
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


# Answer-token variant: the same cells, aggregated from routes over the positions with tokens.loss (the recorder's
# flag: the next token is an answer token), with L_j = answer positions of sample j. No pre-aggregate: it joins routes.
ANSWER_AGG_SQL = """
WITH sel AS (SELECT run_id, layers, num_experts FROM runs WHERE run_id IN ({ids})),
ans AS (SELECT run_id, sample_id, position FROM tokens WHERE run_id IN ({ids}) AND loss),
lens AS (SELECT run_id, sample_id, count(*)::DOUBLE AS n FROM ans GROUP BY run_id, sample_id),
per AS (SELECT r.run_id, r.sample_id, r.layer, r.expert, count(*)::DOUBLE AS n_sel, sum(r.weight::DOUBLE) AS g
        FROM routes r JOIN ans a ON r.run_id = a.run_id AND r.sample_id = a.sample_id AND r.position = a.position
        WHERE r.run_id IN ({ids}) GROUP BY r.run_id, r.sample_id, r.layer, r.expert),
tot AS (SELECT (SELECT count(*) FROM ans)::DOUBLE AS n_tokens, (SELECT count(*) FROM lens)::DOUBLE AS n_samples,
               (SELECT any_value(top_k) FROM runs WHERE run_id IN ({ids}))::DOUBLE AS top_k),
agg AS (SELECT layer, expert, sum(n_sel) AS n_selected, sum(g) AS gate_sum, sum(n_sel / lens.n) AS sample_token_sum,
               sum(g / lens.n) AS sample_gate_sum
        FROM per JOIN lens ON per.run_id = lens.run_id AND per.sample_id = lens.sample_id GROUP BY layer, expert),
norm AS (SELECT NULL::SMALLINT AS layer, NULL::SMALLINT AS expert, NULL::DOUBLE AS norm_gate_sum,
                NULL::DOUBLE AS sample_norm_gate_sum WHERE false),
"""


def answer_score_sql(metric: str, normalize: str, run_ids: list[int]) -> str:
    """Like score_sql, over answer positions only (tokens.loss)."""
    ids = ", ".join(str(int(r)) for r in run_ids)
    tail = SCORE_SQL[SCORE_SQL.index("grid AS"):]  # grid, cells, select: shared with the all-token SQL
    return (ANSWER_AGG_SQL + tail).format(ids=ids, expr=get_score(metric).sql(normalize))


def check_answer_flags(con, run_ids: list[int]) -> None:
    """Raise EsftError unless every run has answer-position flags (recorded by this version from chat data)."""
    cols = {c[0] for c in con.execute("DESCRIBE tokens").fetchall()}
    ids = ", ".join(str(int(r)) for r in run_ids)
    rows = [] if "loss" not in cols else con.execute(
        f"SELECT run_id, count(loss), count(*) FILTER (WHERE loss) FROM tokens WHERE run_id IN ({ids}) "
        "GROUP BY run_id").fetchall()
    have = {r[0] for r in rows if r[1] > 0 and r[2] > 0}
    missing = [r for r in run_ids if r not in have]
    if missing:
        raise EsftError(f"--tokens answer needs answer-token flags, which run(s) {', '.join(map(str, missing))} "
                        "lack (official logs, text data or an older recording); re-record them with `esft record`, "
                        "or use --tokens all")


def score_sql(metric: str, normalize: str, run_ids: list[int]) -> str:
    """The SQL computing (layer, expert, score) of `metric` over `run_ids` (for `esft sql` users, too)."""
    ids = ", ".join(str(int(r)) for r in run_ids)
    expr = get_score(metric).sql(normalize)
    norm_rel = (f"(SELECT * FROM expert_norm_stats WHERE run_id IN ({ids}))" if "norm_gate_sum" in expr else
                "(SELECT NULL::SMALLINT AS layer, NULL::SMALLINT AS expert, NULL::DOUBLE AS norm_gate_sum, "
                "NULL::DOUBLE AS sample_norm_gate_sum WHERE false)")  # older DBs lack expert_norm_stats
    return SCORE_SQL.format(ids=ids, expr=expr, norm_rel=norm_rel)


def compute_scores(con, task: str, metric: str = "token", normalize: str = "token",
                   run_ids: list[int] | None = None, model: str | None = None, pool_models: bool = False,
                   tokens: str = "all") -> Scores:
    """Scores of `task` over its complete runs (or `run_ids`) of `model`, read from an open connection; `tokens` =
    all (the paper) or answer (only positions whose prediction is in the training loss).

    Without `model`, runs of several models are refused unless `pool_models` (see store.complete_runs)."""
    fn = get_score(metric)
    fn.sql(normalize)  # validates normalize
    if tokens not in TOKEN_SETS:
        raise EsftError(f"unknown --tokens '{tokens}'; choose one of {', '.join(TOKEN_SETS)}")
    if tokens == "answer" and metric == "gate_norm":
        raise EsftError("--metric gate_norm is computed over all tokens only; use --tokens all, or --metric gate/token")
    runs = store.complete_runs(con, task, run_ids, model, pool_models)
    ids = [r[0] for r in runs]
    if tokens == "answer":
        check_answer_flags(con, ids)
    rows = con.execute((answer_score_sql if tokens == "answer" else score_sql)(metric, normalize, ids)).fetchnumpy()
    layers = sorted({int(x) for x in rows["layer"]})
    n_e = int(max(r[1] for r in runs))
    values = np.asarray(rows["score"], dtype=np.float64).reshape(len(layers), n_e)  # (layers, E)
    return Scores(task, metric, normalize, layers, values, ids, int(runs[0][2]),
                  int(sum(r[5] for r in runs)), int(sum(r[4] for r in runs)))


def load_scores(db, task: str, metric: str = "token", normalize: str = "token",
                run_ids: list[int] | None = None, model: str | None = None, pool_models: bool = False,
                tokens: str = "all") -> Scores:
    """compute_scores on a short-lived read-only connection to `db`."""
    with store.reader(db) as con:
        return compute_scores(con, task, metric, normalize, run_ids, model, pool_models, tokens)


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
