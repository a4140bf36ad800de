"""The ensemble: one validation-fitted density over all families' columns, in a fixed order."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_ood.errors import UserError
from ddpm_ood.families.density import FeatureDensity
from ddpm_ood.families.ensemble import ENSEMBLE_ORDER, ensemble_scores


def block(n, d, seed, shift=0.0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)) @ r.normal(size=(d, d)) + shift


def sets(shift_ood=5.0):
    """Three families' (val, in-distribution test, OOD test) over the same images."""
    return {
        "diffpath1d": (block(120, 1, 1), block(20, 1, 2), block(20, 1, 3, shift_ood)),
        "eps_norm": (block(120, 3, 4), block(20, 3, 5), block(20, 3, 6, shift_ood)),
        "reconstruction": (block(120, 2, 7), block(20, 2, 8), block(20, 2, 9, shift_ood)),
    }


def test_ensemble_is_one_density_over_the_concatenation_in_a_fixed_order():
    blocks = sets()
    result = ensemble_scores(blocks)
    assert result.families == [name for name in ENSEMBLE_ORDER if name in blocks] == [
        "eps_norm", "diffpath1d", "reconstruction"]
    reversed_blocks = dict(reversed(list(blocks.items())))
    again = ensemble_scores(reversed_blocks)
    stacked = [np.concatenate([blocks[name][i] for name in result.families], axis=1) for i in range(3)]
    direct = FeatureDensity().fit(stacked[0])
    for i in range(3):
        np.testing.assert_array_equal(result.scores[i], again.scores[i])
        np.testing.assert_array_equal(result.scores[i], direct.score(stacked[i]))
    assert len(result.columns) == 6 and result.density.describe()["dim"] == 6
    assert result.scores[2].min() > np.median(result.scores[1])  # shifted rows score higher


def test_ood_sets_do_not_change_the_fit_or_the_validation_scores():
    a, b = ensemble_scores(sets(5.0)), ensemble_scores(sets(-50.0))
    assert a.density.describe() == b.density.describe()
    for i in (0, 1):
        np.testing.assert_array_equal(a.scores[i], b.scores[i])
    assert not np.array_equal(a.scores[2], b.scores[2])


def test_bad_blocks_are_refused():
    blocks = sets()
    with pytest.raises(UserError, match="accepted"):
        ensemble_scores({**blocks, "msma": blocks["eps_norm"]})
    with pytest.raises(UserError, match="same images"):
        ensemble_scores({**blocks, "eps_norm": (blocks["eps_norm"][0][:-1], *blocks["eps_norm"][1:])})
    with pytest.raises(UserError, match="number of feature sets"):
        ensemble_scores({**blocks, "eps_norm": blocks["eps_norm"][:2]})
    with pytest.raises(UserError):
        ensemble_scores({})
