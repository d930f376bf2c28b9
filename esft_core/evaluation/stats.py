"""Statistics for method comparisons: bootstrap confidence intervals and paired significance over seeds and examples.

Every comparison in bench/compare_methods.py is a statistic of per-example values laid out per task as a
(seeds, items) array: items are the eval examples (task scores 0/1 or graded) or the held-out documents (general
loss), seeds the training seeds. A two-level (seeds × items) percentile bootstrap resamples, per task and
independently, the seeds and the items with replacement; the *same* indices are used for every array of one
comparison, so method A and method B stay paired (same examples, same seeds, same data order). Tasks are fixed (the
statistic averages over them). This is the usual "resample what would change if you reran the study" rule: new seeds
and new eval examples, same tasks.

- `bootstrap(stat, *arrays)` → Estimate(value, lo, hi, p): value on the data, percentile CI, and a two-sided
  bootstrap p-value for "the statistic is 0" (2 · min(share ≤ 0, share ≥ 0), at least 1/n_boot); for ratios pass a
  statistic minus 1.
- `mean_ci`, `diff_ci`, `ratio_ci`: the mean over tasks of per-task means, a paired difference, a ratio of means.
With one seed the seed level is a no-op, so the intervals then cover eval-set noise only (say so when reporting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from esft_core.errors import EsftError

Arrays = Sequence[np.ndarray]  # per task: (seeds, items)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval and the two-sided p-value of 'value = 0'."""

    value: float
    lo: float
    hi: float
    p: float
    n_boot: int

    def significant(self, alpha: float = 0.05) -> bool:
        """True when the interval excludes 0 (for differences) at level 1 - alpha."""
        return self.p < alpha

    def as_dict(self, digits: int = 4) -> dict:
        return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def as_tasks(x) -> list[np.ndarray]:
    """Normalise input to a list over tasks of float (seeds, items) arrays: (items,) → 1 seed; (S, N) → 1 task."""
    if isinstance(x, np.ndarray) or (isinstance(x, Sequence) and x and np.isscalar(x[0])):
        x = [x]
    out = []
    for a in x:
        a = np.asarray(a, dtype=np.float64)
        a = a[None, :] if a.ndim == 1 else a
        if a.ndim != 2 or a.size == 0:
            raise EsftError(f"bootstrap input must be (items,) or (seeds, items) per task, got shape {a.shape}")
        out.append(a)
    return out


def _resample(tasks: list[list[np.ndarray]], n_boot: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """tasks[t][a] (S, N) → the same nesting of (n_boot, S, N) resamples, indices shared across arrays `a`."""
    out = []
    for arrays in tasks:
        s, n = arrays[0].shape
        if any(a.shape != (s, n) for a in arrays):
            raise EsftError(f"paired arrays differ in shape: {[a.shape for a in arrays]}")
        si = rng.integers(0, s, size=(n_boot, s))[:, :, None]  # (B, S, 1)
        ii = rng.integers(0, n, size=(n_boot, n))[:, None, :]  # (B, 1, N)
        out.append([a[si, ii] for a in arrays])  # each (B, S, N)
    return out


def bootstrap(stat: Callable[..., np.ndarray], *arrays, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> Estimate:
    """Percentile bootstrap of `stat` over seeds and items (module docstring).

    `arrays`: one argument per compared quantity, each a list over tasks of (seeds, items) arrays, paired across
    arguments. `stat(*args)` receives, per argument, a list over tasks of (B, S, N) arrays and returns (B,).
    """
    if not 0 < level < 1:
        raise EsftError(f"level must be in (0, 1), got {level}")
    if n_boot < 10:
        raise EsftError(f"n_boot must be >= 10, got {n_boot}")
    per_arg = [as_tasks(a) for a in arrays]
    n_tasks = {len(a) for a in per_arg}
    if len(n_tasks) != 1:
        raise EsftError(f"paired arguments cover different numbers of tasks: {sorted(n_tasks)}")
    tasks = [list(t) for t in zip(*per_arg, strict=True)]  # [task][arg]
    with np.errstate(divide="ignore", invalid="ignore"):  # ratios over a zero mean: non-finite, dropped below
        value = float(np.asarray(stat(*[[t[a][None] for t in tasks] for a in range(len(per_arg))]))[0])
        res = _resample(tasks, n_boot, np.random.default_rng(seed))
        boot = np.asarray(stat(*[[t[a] for t in res] for a in range(len(per_arg))]), dtype=np.float64)  # (B,)
    boot = boot[np.isfinite(boot)]
    if not np.isfinite(value) or boot.size == 0:  # undefined (e.g. a ratio to a zero score)
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), n_boot)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail])
    p = min(1.0, max(2 * min(np.mean(boot <= 0), np.mean(boot >= 0)), 1 / boot.size))
    return Estimate(value, float(lo), float(hi), float(p), n_boot)


def _mean(xs: list[np.ndarray]) -> np.ndarray:
    """Mean over tasks of each task's mean over (seeds, items): (B,)."""
    return np.mean([x.mean(axis=(1, 2)) for x in xs], axis=0)


def mean_ci(x, **kw) -> Estimate:
    """Mean (over tasks of per-task means) with its CI; p tests 'mean = 0'."""
    return bootstrap(_mean, x, **kw)


def diff_ci(a, b, **kw) -> Estimate:
    """Paired difference mean(a) − mean(b) with its CI and p-value."""
    return bootstrap(lambda x, y: _mean(x) - _mean(y), a, b, **kw)


def ratio_ci(a, b, **kw) -> Estimate:
    """mean(a) / mean(b), paired; p tests 'ratio = 1' (the p of ratio − 1)."""
    est = bootstrap(lambda x, y: _mean(x) / _mean(y) - 1, a, b, **kw)
    return Estimate(est.value + 1, est.lo + 1, est.hi + 1, est.p, est.n_boot)


def rise_ratio_ci(a, b, base, **kw) -> Estimate:
    """(mean(a) − mean(base)) / (mean(b) − mean(base)), paired: e.g. ESFT's general-loss rise over FFT's."""
    est = bootstrap(lambda x, y, z: (_mean(x) - _mean(z)) / (_mean(y) - _mean(z)) - 1, a, b, base, **kw)
    return Estimate(est.value + 1, est.lo + 1, est.hi + 1, est.p, est.n_boot)
