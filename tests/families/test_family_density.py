"""FeatureDensity: fitted on validation rows only, deterministic, model selection, the 1-D KDE path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from ddpm_ood.errors import UserError
from ddpm_ood.families.density import FeatureDensity

N = 200


def rng(seed=0):
    return np.random.default_rng(seed)


def correlated_gaussian(n=N, seed=0):
    r = rng(seed)
    return r.normal(size=(n, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, -0.3], [0.0, 0.0, 0.2]]) + [5.0, -1.0, 0.0]


def test_one_component_for_gaussian_data():
    assert FeatureDensity().fit(correlated_gaussian()).describe()["n_components"] == 1


def test_more_than_one_component_for_a_bimodal_sample():
    r = rng(1)
    centres = np.where(r.random(N) < 0.5, -6.0, 6.0)
    x = np.column_stack([centres + r.normal(size=N), r.normal(size=N)])
    description = FeatureDensity().fit(x).describe()
    assert description["kind"] == "gmm" and description["n_components"] > 1


def test_far_points_score_higher_than_every_validation_point():
    x = correlated_gaussian()
    density = FeatureDensity().fit(x)
    directions = rng(2).normal(size=(20, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    far = x.mean(axis=0) + 10 * directions * x.std(axis=0)  # 10 standard deviations out
    assert density.score(far).min() > density.score(x).max()


def test_fitted_on_validation_only_and_scores_row_by_row():
    val = correlated_gaussian()
    density = FeatureDensity().fit(val)
    before = (density.describe(), density.score(val))
    test_a = np.vstack([val[:3] + 1.0, correlated_gaussian(50, seed=5) * 3])
    test_b = np.vstack([val[:3] + 1.0, correlated_gaussian(80, seed=6) - 40])
    score_a, score_b = density.score(test_a), density.score(test_b)
    # other OOD rows change nothing (but the rounding of batched linear algebra, about 1e-16 relative)
    np.testing.assert_allclose(score_a[:3], score_b[:3], rtol=1e-13, atol=0)
    np.testing.assert_allclose(density.score(test_a[:1])[0], score_a[0], rtol=1e-13, atol=0)
    after = (density.describe(), density.score(val))
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])


def test_same_validation_rows_give_bit_identical_scores():
    val, test = correlated_gaussian(), correlated_gaussian(30, seed=9)
    first, second = FeatureDensity().fit(val), FeatureDensity().fit(val.copy())
    np.testing.assert_array_equal(first.score(test), second.score(test))
    assert first.describe() == second.describe()


def test_one_dimension_uses_scotts_kde_on_standardised_values():
    x = rng(3).gamma(2.0, size=(N, 1)) * 7 + 3
    density = FeatureDensity().fit(x, columns=["deps_dt_sq_sqrt"])
    description = density.describe()
    assert description["kind"] == "kde"
    h = N ** (-1 / 5)  # Scott's factor for one dimension; the standardised data have standard deviation 1
    assert description["bandwidth"] == pytest.approx(h, rel=1e-12)
    z_val = (x[:, 0] - x.mean()) / x.std()
    query = np.array([[x.mean()], [x.max() + 5], [x.min()]])
    zq = (query - x.mean()) / x.std()
    expected = -(logsumexp(norm.logpdf(zq, loc=z_val[None, :], scale=h), axis=1) - np.log(N))
    np.testing.assert_allclose(density.score(query), expected, rtol=1e-10)
    assert "KDE" in density.summary()


def test_constant_column_is_refused_by_index():
    x = correlated_gaussian()
    x[:, 1] = 4.0
    with pytest.raises(UserError, match=r"column\(s\) 1 \(b\)"):
        FeatureDensity().fit(x, columns=["a", "b", "c"])


@pytest.mark.parametrize("bad", ["nan", "few", "shape"])
def test_bad_input_is_refused(bad):
    x = correlated_gaussian()
    if bad == "nan":
        x[7, 2] = np.nan
    with pytest.raises(UserError):
        FeatureDensity().fit({"nan": x, "few": x[:4], "shape": x[:, 0]}[bad])


def test_scored_columns_must_match():
    density = FeatureDensity().fit(correlated_gaussian())
    with pytest.raises(UserError, match="columns"):
        density.score(np.zeros((2, 2)))
