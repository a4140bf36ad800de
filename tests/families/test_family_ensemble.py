"""The ensemble: the mean of its members' validation z-scores, members fixed by rule, fitted on validation only."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_ood.errors import UserError
from ddpm_ood.families.ensemble import PAPER_SCORE, Ensemble, ensemble_members


def scores(seed, n, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(size=n) * scale + shift


def test_members_are_every_family_once_and_the_paper_score_when_present():
    families = ["eps_norm", "denoising_error", "msma", "diffpath6d", "diffpath1d"]
    assert ensemble_members(families, True) == [PAPER_SCORE, "eps_norm", "denoising_error", "msma", "diffpath6d"]
    assert ensemble_members(families, False) == ["eps_norm", "denoising_error", "msma", "diffpath6d"]
    assert ensemble_members(["diffpath1d"], False) == []


def test_score_is_the_mean_of_validation_z_scores():
    val = {"a": scores(1, 50, shift=10.0, scale=3.0), "b": scores(2, 80, shift=-2.0, scale=0.1)}
    ensemble = Ensemble.fit(val)
    new = {"a": np.array([10.0, 16.0]), "b": np.array([-2.0, -2.3])}
    za = (new["a"] - val["a"].mean()) / val["a"].std(ddof=1)
    zb = (new["b"] - val["b"].mean()) / val["b"].std(ddof=1)
    np.testing.assert_allclose(ensemble.score(new), (za + zb) / 2, rtol=1e-12)
    # on its own validation rows each member's z-scores have mean 0, so their mean has mean 0 too
    assert abs(Ensemble.fit({"a": val["a"], "b": val["a"] ** 3}).score({"a": val["a"], "b": val["a"] ** 3}).mean()) \
        < 1e-12


def test_units_of_a_member_do_not_matter_and_the_score_is_row_by_row():
    val = {"a": scores(1, 60), "b": scores(2, 60)}
    new = {"a": scores(3, 10, shift=2.0), "b": scores(4, 10, shift=1.0)}
    base = Ensemble.fit(val).score(new)
    scaled = Ensemble.fit({"a": val["a"] * 1e6 + 5, "b": val["b"]}).score({"a": new["a"] * 1e6 + 5, "b": new["b"]})
    np.testing.assert_allclose(scaled, base, rtol=1e-9)
    alone = Ensemble.fit(val).score({"a": new["a"][3:4], "b": new["b"][3:4]})
    assert alone[0] == base[3]


def test_separated_members_give_a_perfect_ensemble():
    from sklearn.metrics import roc_auc_score

    val = {"a": scores(1, 100), "b": scores(2, 100)}
    ind = {"a": scores(3, 30), "b": scores(4, 30)}
    ood = {"a": scores(5, 30, shift=20.0), "b": scores(6, 30, shift=20.0)}
    ensemble = Ensemble.fit(val)
    labels = np.r_[np.zeros(30), np.ones(30)]
    assert roc_auc_score(labels, np.r_[ensemble.score(ind), ensemble.score(ood)]) == 1.0


def test_bad_members_are_refused():
    with pytest.raises(UserError, match="two or more"):
        Ensemble.fit({"a": scores(1, 10)})
    with pytest.raises(UserError, match="constant"):
        Ensemble.fit({"a": scores(1, 10), "b": np.ones(10)})
    with pytest.raises(UserError, match="finite"):
        Ensemble.fit({"a": scores(1, 10), "b": np.r_[scores(2, 9), np.nan]})
    with pytest.raises(UserError, match="needs the b"):
        Ensemble.fit({"a": scores(1, 10), "b": scores(2, 10)}).score({"a": scores(3, 2)})
