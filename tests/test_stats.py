"""Bootstrap CIs and paired tests of esft_core.evaluation.stats against closed forms and constructed cases."""

import numpy as np
import pytest

from esft_core.errors import EsftError
from esft_core.evaluation.stats import diff_ci, mean_ci, ratio_ci, rise_ratio_ci


def test_mean_ci_of_bernoulli_matches_normal_approximation():
    x = np.random.default_rng(1).integers(0, 2, 400).astype(float)  # (items,)
    est = mean_ci(x, n_boot=4000)
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert est.value == pytest.approx(x.mean())
    assert est.lo == pytest.approx(x.mean() - half, abs=0.012) and est.hi == pytest.approx(x.mean() + half, abs=0.012)
    assert est.p < 0.01  # the mean is clearly not 0


def test_constant_and_identical_inputs():
    est = mean_ci(np.full(50, 0.25))
    assert (est.value, est.lo, est.hi) == (0.25, 0.25, 0.25)
    x = np.random.default_rng(0).random((3, 60))
    d = diff_ci(x, x)
    assert (d.value, d.lo, d.hi, d.p) == (0.0, 0.0, 0.0, 1.0) and not d.significant()


def test_paired_difference_ignores_shared_noise():
    rng = np.random.default_rng(2)
    b = rng.random((3, 200))  # large per-example spread shared by both methods
    a = b + 0.02
    d = diff_ci(a, b)
    assert d.value == pytest.approx(0.02) and d.lo == pytest.approx(0.02) and d.hi == pytest.approx(0.02)
    assert d.significant() and d.p == pytest.approx(1 / 2000)
    # unpaired noise of the same size makes a 0.02 difference insignificant
    d2 = diff_ci(rng.random((3, 200)) + 0.02, b)
    assert not d2.significant() and d2.lo < 0 < d2.hi


def test_seed_level_widens_the_interval():
    rng = np.random.default_rng(3)
    items = rng.random(200)
    seeds = np.stack([items + s for s in (-0.2, 0.0, 0.2)])  # (3, 200): strong seed effect
    wide, narrow = mean_ci(seeds), mean_ci(seeds.mean(0))
    assert (wide.hi - wide.lo) > 3 * (narrow.hi - narrow.lo)


def test_tasks_are_averaged_not_resampled_and_ratios():
    t1, t2 = np.full((2, 10), 1.0), np.full((2, 30), 3.0)
    assert mean_ci([t1, t2]).value == 2.0 and mean_ci([t1, t2]).lo == 2.0  # tasks weigh equally, fixed
    r = ratio_ci([t1 * 0.5, t2 * 0.5], [t1, t2])
    assert (r.value, r.lo, r.hi) == pytest.approx((0.5, 0.5, 0.5)) and r.significant()
    base = [np.zeros((2, 10)), np.ones((2, 30))]
    rr = rise_ratio_ci([t1 * 0.25, t2 * 0 + 1.5], [t1, t2 * 0 + 3.0], base)
    assert rr.value == pytest.approx((0.25 + 0.5) / 2 / ((1 + 2) / 2))


def test_bad_input_raises():
    with pytest.raises(EsftError, match="shape"):
        diff_ci(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(EsftError, match="tasks"):
        diff_ci([np.zeros(5)], [np.zeros(5), np.zeros(5)])
    with pytest.raises(EsftError, match="level"):
        mean_ci(np.zeros(5), level=1.5)
    with pytest.raises(EsftError, match=r"\(items,\)"):
        mean_ci(np.zeros((2, 2, 2)))


def test_undefined_ratio_is_nan_not_inf():
    r = ratio_ci(np.ones(10), np.zeros(10))
    assert all(np.isnan([r.value, r.lo, r.hi, r.p]))
