"""Per-layer expert selection from scores: top-p (the authors' stop rule), top-k, include/exclude, contrast,
and bootstrap stability. Output is the authors' expert-config JSON.

- top-p: sort a layer's experts by score (descending, ties by expert id), add experts while the running sum of the
  already-added scores is < p (scripts/generate_expert_config.py). The authors select from the 4-decimal scores of
  summary.json, so `round_digits=4` by default; that is what reproduces their shipped configs exactly.
- contrast: c_i = max(s_i − λ·s'_i, 0) / Σ_j max(s_j − λ·s'_j, 0), where s are the task's scores and s' the pooled
  scores of the contrast runs (general corpus or other tasks); then top-p/top-k on c. Experts every input uses get
  c ≈ 0 and are not picked; an expert with c = 0 is never selected.
- stability: bootstrap over samples (resample N_s samples with replacement, rescore, reselect) gives per layer and
  expert the probability of being selected; random sample orders give the number of tokens after which the
  selection made from the first n samples no longer changes (per layer and for all layers).
"""

from __future__ import annotations

import math

import numpy as np

from esft_core.errors import EsftError
from esft_core.experts.expert_config import ExpertConfig
from esft_core.selection.scores import Scores, compute_scores, get_score
from esft_core.traces import store


def check_p(p: float) -> float:
    if not (0 < p <= 1):
        raise EsftError(f"--top-p must be in (0, 1], got {p}")
    return float(p)


def check_round(round_digits: int | None) -> int | None:
    if round_digits is not None and (not isinstance(round_digits, int) or round_digits < 0):
        raise EsftError(f"--round must be a number of decimals >= 0 or 'none', got {round_digits}")
    return round_digits


def selection_round_digits(round_digits: int | None, contrasted: bool) -> int | None:
    """The one rounding rule of every selection (CLI and explorer): scores are rounded the authors' way (4 decimals,
    what reproduces their shipped configs); contrast scores are not the authors' scores, so the default rounding is
    off for them (an explicitly different --round is kept)."""
    check_round(round_digits)
    return None if contrasted and round_digits == 4 else round_digits


def round_scores(values: np.ndarray, round_digits: int | None) -> np.ndarray:
    """Python's round() element-wise (the authors' rounding; np.round differs on some halves); None = unrounded."""
    v = np.asarray(values, dtype=np.float64)
    if check_round(round_digits) is None:
        return v
    return np.array([round(float(x), round_digits) for x in v.ravel()], dtype=np.float64).reshape(v.shape)


def ranked(row: np.ndarray, round_digits: int | None = 4) -> list[tuple[int, float]]:
    """(expert, score) by score descending, ties by expert id; scores rounded the authors' way (Python round)."""
    vals = [float(v) for v in round_scores(row, round_digits)]
    return sorted(enumerate(vals), key=lambda x: (-x[1], x[0]))


def top_p_mask(s: np.ndarray, p: float, round_digits: int | None = None) -> np.ndarray:
    """Vectorised top-p stop rule over the last axis (…, E): an expert is selected iff the sum of the higher-ranked
    scores (descending, ties by expert id) is < p and its own score is > 0. Same result as `top_p` per row."""
    check_p(p)
    s = round_scores(s, round_digits)
    order = np.argsort(-s, axis=-1, kind="stable")  # ties keep expert-id order
    ss = np.take_along_axis(s, order, axis=-1)
    # running sum before each expert, summed left to right as top_p does (cumsum[i-1], not cumsum[i] - s[i])
    excl = np.concatenate([np.zeros_like(ss[..., :1]), np.cumsum(ss, axis=-1)[..., :-1]], axis=-1)
    chosen_sorted = (excl < p) & (ss > 0)
    mask = np.zeros_like(chosen_sorted)
    np.put_along_axis(mask, order, chosen_sorted, axis=-1)
    return mask


def top_p(row: np.ndarray, p: float, round_digits: int | None = 4, exclude=(), include=()) -> list[int]:
    """Smallest score-ordered prefix reaching p (stop rule: add while running sum < p); include counts first."""
    check_p(p)
    chosen, total = [], 0.0
    order = ranked(row, round_digits)
    by_id = dict(order)
    for e in include:
        if e not in chosen:
            chosen.append(e)
            total += by_id[e]
    for e, s in order:
        if total >= p:
            break
        if e in chosen or e in exclude or s <= 0:
            continue
        chosen.append(e)
        total += s
    return sorted(chosen, key=lambda e: (-by_id[e], e))


def top_k(row: np.ndarray, k: int, round_digits: int | None = 4, exclude=(), include=()) -> list[int]:
    """The k highest-scoring experts (plus forced includes, minus excludes)."""
    if k < 1:
        raise EsftError(f"--top-k must be >= 1, got {k}")
    if k > len(row):
        raise EsftError(f"--top-k {k} is larger than the number of experts per layer ({len(row)})")
    order = ranked(row, round_digits)
    by_id = dict(order)
    chosen = list(dict.fromkeys(include))
    for e, s in order:
        if len(chosen) >= max(k, len(include)):
            break
        if e not in chosen and e not in exclude and s > 0:
            chosen.append(e)
    return sorted(chosen, key=lambda e: (-by_id[e], e))


def parse_expert_lists(specs: list[str] | None, layers: list[int], num_experts: int, flag: str) -> dict[int, set]:
    """'LAYER:E1,E2' or '*:E1,E2' (every layer), repeatable → {layer: {experts}}; bad specs are one-line errors."""
    out: dict[int, set] = {layer: set() for layer in layers}
    for spec in specs or []:
        head, sep, tail = spec.partition(":")
        if not sep or not tail:
            raise EsftError(f"{flag} '{spec}': expected LAYER:E1,E2 or *:E1,E2")
        try:
            experts = {int(x) for x in tail.split(",")}
            targets = layers if head.strip() == "*" else [int(head)]
        except ValueError:
            raise EsftError(f"{flag} '{spec}': layer and experts must be integers") from None
        for layer in targets:
            if layer not in out:
                raise EsftError(f"{flag} '{spec}': layer {layer} is not an MoE layer ({layers[0]}..{layers[-1]})")
            bad = [e for e in experts if not 0 <= e < num_experts]
            if bad:
                raise EsftError(f"{flag} '{spec}': expert {bad[0]} out of range 0..{num_experts - 1}")
            out[layer] |= experts
    return out


def check_contrast_weight(weight: float) -> float:
    if not math.isfinite(weight) or weight < 0:
        raise EsftError(f"--contrast-weight must be a finite number >= 0, got {weight}")
    return float(weight)


def pooled_scores(con, tasks: list[str], metric: str, normalize: str, model: str | None = None,
                  pool_models: bool = False) -> Scores:
    """The contrast input: scores of `tasks` pooled over their tokens (normalize='token') or samples ('sample')."""
    others = [compute_scores(con, t, metric, normalize, model=model, pool_models=pool_models) for t in tasks]
    w = np.array([o.n_tokens if normalize == "token" else o.n_samples for o in others], np.float64)
    pooled = sum(o.values * wi for o, wi in zip(others, w, strict=True)) / w.sum()  # (layers, E)
    return Scores("contrast", metric, normalize, others[0].layers, pooled, [r for o in others for r in o.run_ids],
                  others[0].top_k, int(sum(o.n_tokens for o in others)), int(sum(o.n_samples for o in others)))


def contrast(task: Scores, other: Scores, weight: float = 1.0) -> Scores:
    """Task-specific scores: max(s − λ·s', 0), renormalised per layer to sum to 1 (all-zero layers stay zero)."""
    check_contrast_weight(weight)
    if task.layers != other.layers or task.num_experts != other.num_experts:
        raise EsftError(f"contrast runs have layers/experts {other.layers[0]}..{other.layers[-1]}x"
                        f"{other.num_experts}, task has {task.layers[0]}..{task.layers[-1]}x{task.num_experts}")
    c = np.clip(task.values - weight * other.values, 0, None)  # (layers, E)
    tot = c.sum(axis=1, keepdims=True)
    c = np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)
    return Scores(task.task, task.metric, task.normalize, task.layers, c, task.run_ids, task.top_k,
                  task.n_tokens, task.n_samples)


def select(scores: Scores, p: float | None = None, k: int | None = None, include=None, exclude=None,
           round_digits: int | None = 4, shared_experts: bool = False,
           non_expert_modules: bool = False) -> ExpertConfig:
    """Select per layer with top-p or top-k (exactly one of p, k)."""
    if (p is None) == (k is None):
        raise EsftError("give exactly one of --top-p or --top-k")
    include = include or {}
    exclude = exclude or {}
    out = {}
    for li, layer in enumerate(scores.layers):
        inc, exc = sorted(include.get(layer, ())), set(exclude.get(layer, ()))
        if set(inc) & exc:
            raise EsftError(f"layer {layer}: expert {sorted(set(inc) & exc)[0]} is both included and excluded")
        row = scores.values[li]
        if len(exc) >= scores.num_experts:
            raise EsftError(f"--exclude removes every expert of layer {layer}; nothing could be selected there")
        out[layer] = (top_p(row, p, round_digits, exc, inc) if p is not None
                      else top_k(row, k, round_digits, exc, inc))
    if not any(out.values()):
        raise EsftError(f"the selection of task '{scores.task}' is empty (every score is 0 after contrast/exclude); "
                        "no expert config written")
    return ExpertConfig(out, shared_experts, non_expert_modules)


# -- stability ------------------------------------------------------------------------------------------------
def per_sample_counts(con, task: str, metric: str, normalize: str, run_ids=None, model: str | None = None,
                      pool_models: bool = False):
    """Per-sample sums (samples, layers, E) of the metric's numerator, tokens per sample (samples,), layers, K."""
    runs = store.complete_runs(con, task, run_ids, model, pool_models)
    ids = ", ".join(str(r[0]) for r in runs)
    n_e = int(max(r[1] for r in runs))
    smp = con.execute(f"SELECT run_id, sample_id, n_tokens FROM samples WHERE run_id IN ({ids}) "
                      "ORDER BY run_id, sample_id").fetchnumpy()
    layers = sorted({int(x) for r in runs for x in r[3]})
    col = "n_selected::DOUBLE" if metric == "token" else "gate_sum"
    src = (f"SELECT run_id, sample_id, layer, expert, {col} AS v FROM sample_expert_stats WHERE run_id IN ({ids})")
    has = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'sample_expert_stats'").fetchone()[0]
    n_runs = con.execute(f"SELECT count(DISTINCT run_id) FROM sample_expert_stats WHERE run_id IN ({ids})"
                         ).fetchone()[0] if has else 0
    if n_runs < len(runs):  # a DB written before sample_expert_stats existed: aggregate the routes
        val = "count(*)::DOUBLE" if metric == "token" else "sum(weight::DOUBLE)"
        src = f"SELECT run_id, sample_id, layer, expert, {val} AS v FROM routes WHERE run_id IN ({ids}) GROUP BY ALL"
    rows = con.execute(src).fetchnumpy()
    key = smp["run_id"].astype(np.int64) * (1 << 32) + smp["sample_id"].astype(np.int64)  # sorted
    sidx = np.searchsorted(key, rows["run_id"].astype(np.int64) * (1 << 32) + rows["sample_id"].astype(np.int64))
    lidx = np.searchsorted(np.array(layers), rows["layer"].astype(np.int64))
    # one bincount over the flat (sample, layer, expert) index (np.add.at is ~10x slower)
    flat = (sidx * len(layers) + lidx) * n_e + rows["expert"].astype(np.int64)
    x = np.bincount(flat, weights=np.asarray(rows["v"], np.float64), minlength=key.size * len(layers) * n_e)
    x = x.reshape(key.size, len(layers), n_e)  # (samples, layers, E)
    lens = smp["n_tokens"].astype(np.float64)  # (samples,)
    return x, lens, layers, int(runs[0][2])


def _scores_from(x_w: np.ndarray, lens_w: np.ndarray, norm_w: np.ndarray, metric: str, normalize: str, k: int):
    """Scores (..., layers, E) from weighted per-sample sums; x_w = Σ_j w_j x_j, lens_w = Σ w_j L_j, norm_w = Σ w_j."""
    scale = k if metric == "token" else 1
    den = lens_w if normalize == "token" else norm_w
    return x_w / (scale * den)[..., None, None]


def stability_arrays(con, task: str, metric: str = "token", normalize: str = "token", p: float = 0.2,
                     n_boot: int = 100, n_orders: int = 20, seed: int = 0, run_ids=None, model: str | None = None,
                     pool_models: bool = False, checkpoints: int = 16) -> dict:
    """The stability estimates as arrays (what `esft select --bootstrap` reports and the explorer draws).

    Keys: layers, full (layers, E) bool = the top-p selection on all samples, prob (layers, E) = share of bootstrap
    resamples selecting each expert, same (layers,) = share of resamples reproducing `full` exactly, stable_tokens
    (orders, layers) = tokens after which random sample orders stop changing the selection (n_orders=0 skips it;
    the bootstrap draws come first, so prob/full/same do not depend on n_orders), curve_tokens /
    curve_jaccard (checkpoints,) = mean Jaccard of the selection from the first n samples (stored order) with `full`.
    """
    check_p(p)
    get_score(metric)
    if n_boot < 1:
        raise EsftError(f"--bootstrap must be >= 1, got {n_boot}")
    x, lens, layers, k = per_sample_counts(con, task, metric, normalize, run_ids, model, pool_models)
    if normalize == "sample":
        x = x / lens[:, None, None]  # per-sample normalised: Σ_j x_j / L_j
    n = lens.size
    rng = np.random.default_rng(seed)
    full = top_p_mask(_scores_from(x.sum(0), lens.sum(), np.float64(n), metric, normalize, k), p)  # (layers, E)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, samples)
    xb = np.einsum("bs,sle->ble", w, x)  # (B, layers, E)
    sel = top_p_mask(_scores_from(xb, w @ lens, w.sum(1), metric, normalize, k), p)  # (B, layers, E)
    # tokens until stable: prefixes of random sample orders
    stable_layer = np.zeros((n_orders, len(layers)))
    for r in range(n_orders):
        perm = rng.permutation(n)
        cx = np.cumsum(x[perm], axis=0)  # (samples, layers, E) sums of the first i+1 samples
        cl = np.cumsum(lens[perm])
        mask = top_p_mask(_scores_from(cx, cl, np.arange(1, n + 1, dtype=np.float64), metric, normalize, k), p)
        differs = ~(mask == full[None]).all(-1)  # (samples, layers)
        # first prefix index after the last differing one
        last_diff = np.where(differs.any(0), n - 1 - np.argmax(differs[::-1], axis=0), -1)  # (layers,)
        stable_layer[r] = cl[np.minimum(last_diff + 1, n - 1)]
    # convergence curve in stored sample order, at up to `checkpoints` prefix sizes
    cuts = np.unique(np.linspace(1, n, min(checkpoints, n)).astype(int))  # (C,) numbers of samples
    cx, cl = np.cumsum(x, axis=0)[cuts - 1], np.cumsum(lens)[cuts - 1]
    pm = top_p_mask(_scores_from(cx, cl, cuts.astype(np.float64), metric, normalize, k), p)  # (C, layers, E)
    inter, union = (pm & full[None]).sum(-1), (pm | full[None]).sum(-1)  # (C, layers)
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean(-1)  # (C,)
    return {"layers": layers, "full": full, "prob": sel.mean(0), "same": (sel == full[None]).all(-1).mean(0),
            "stable_tokens": stable_layer, "n_samples": int(n), "n_tokens": int(lens.sum()),
            "curve_tokens": cl.astype(np.int64), "curve_jaccard": jac}


def stability(con, task: str, metric: str = "token", normalize: str = "token", p: float = 0.2,
              n_boot: int = 100, n_orders: int = 20, seed: int = 0, run_ids=None, model: str | None = None,
              pool_models: bool = False) -> dict:
    """Bootstrap selection probability per (layer, expert) and tokens until the selection stops changing (JSON)."""
    if n_orders < 1:
        raise EsftError(f"orders must be >= 1, got {n_orders}")
    a = stability_arrays(con, task, metric, normalize, p, n_boot, n_orders, seed, run_ids, model, pool_models)
    layers, full, prob, same, stable_layer = a["layers"], a["full"], a["prob"], a["same"], a["stable_tokens"]
    return {
        "task": task, "metric": metric, "normalize": normalize, "top_p": p, "bootstrap": n_boot,
        "orders": n_orders, "n_samples": a["n_samples"], "n_tokens": a["n_tokens"],
        "selected": {str(layer): [int(e) for e in np.flatnonzero(full[li])] for li, layer in enumerate(layers)},
        "selection_probability": {
            str(layer): {str(e): round(float(prob[li, e]), 4) for e in np.flatnonzero(prob[li] > 0)}
            for li, layer in enumerate(layers)},
        "same_selection_rate": {str(layer): round(float(same[li]), 4) for li, layer in enumerate(layers)},
        "tokens_to_stable": {
            "layers": {str(layer): int(np.median(stable_layer[:, li])) for li, layer in enumerate(layers)},
            "all_layers": int(np.median(stable_layer.max(1))),
        },
    }


def task_scores(con, task: str, metric: str, normalize: str = "token", contrast_tasks=None,
                contrast_weight: float = 1.0, run_ids=None, model: str | None = None,
                pool_models: bool = False, tokens: str = "all") -> tuple[Scores, Scores, Scores | None]:
    """The scores a selection ranks: the task's own (over `tokens`), or its contrast scores against
    `contrast_tasks`. Returns (scores to rank, the task's own scores, pooled contrast scores or None)."""
    s = compute_scores(con, task, metric, normalize, run_ids, model, pool_models, tokens)
    if not contrast_tasks:
        return s, s, None
    check_contrast_weight(contrast_weight)
    if task in contrast_tasks:
        raise EsftError(f"--contrast {task}: a task cannot be contrasted against itself (all its scores would be 0)")
    pooled = pooled_scores(con, list(contrast_tasks), metric, normalize, model, pool_models)
    return contrast(s, pooled, contrast_weight), s, pooled


def select_for_task(con, task: str, metric: str, normalize: str = "token", p: float | None = None,
                    k: int | None = None, include_specs=None, exclude_specs=None, contrast_tasks=None,
                    contrast_weight: float = 1.0, round_digits: int | None = 4, run_ids=None,
                    shared_experts: bool = False, non_expert_modules: bool = False, model: str | None = None,
                    pool_models: bool = False, tokens: str = "all") -> ExpertConfig:
    """Everything `esft select` does but output: scores, optional contrast, include/exclude, top-p/top-k.
    tokens: score the task over all tokens (the paper) or only answer positions (scores.TOKEN_SETS)."""
    if p is not None:
        check_p(p)
    check_contrast_weight(contrast_weight)
    digits = selection_round_digits(round_digits, bool(contrast_tasks))
    s, _, _ = task_scores(con, task, metric, normalize, contrast_tasks, contrast_weight, run_ids, model, pool_models,
                          tokens)
    inc = parse_expert_lists(include_specs, s.layers, s.num_experts, "--include")
    exc = parse_expert_lists(exclude_specs, s.layers, s.num_experts, "--exclude")
    return select(s, p, k, inc, exc, digits, shared_experts, non_expert_modules)
