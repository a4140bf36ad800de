"""The registry: names, parsing, shared network calls and their count, settings validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import CallRecorder, linear_acp, wiggly_eps_fn

from ddpm_ood.errors import UserError
from ddpm_ood.families import (
    ALL_SCORES,
    FAMILIES,
    FEATURE_FAMILIES,
    RECONSTRUCTION,
    FamilySettings,
    compute_features,
    feature_families,
    get_family,
    nfe_of,
    parse_families,
)

SETTINGS = FamilySettings(levels=(100, 500, 900), diffpath_steps=5)
L, K = len(SETTINGS.levels), SETTINGS.diffpath_steps


def test_unknown_family_lists_the_accepted_names():
    for call in (lambda: get_family("msma"), lambda: parse_families("eps_norm,msma")):
        with pytest.raises(UserError, match="msma") as info:
            call()
        for name in (*ALL_SCORES, "diffpath", "all"):
            assert name in str(info.value)
    with pytest.raises(UserError, match="reconstruction engine"):
        get_family(RECONSTRUCTION)
    with pytest.raises(UserError, match="reconstruction engine"):
        compute_features([RECONSTRUCTION], wiggly_eps_fn, torch.zeros(1, 1, 2, 2), ["a"], linear_acp(), SETTINGS)


def test_parse_families():
    assert parse_families("all") == list(ALL_SCORES)
    assert parse_families("diffpath") == ["diffpath6d", "diffpath1d"]
    assert parse_families(" diffpath1d , eps_norm,diffpath,eps_norm ") == ["eps_norm", "diffpath6d", "diffpath1d"]
    assert parse_families("reconstruction,denoising_error") == [RECONSTRUCTION, "denoising_error"]
    assert feature_families(parse_families("all")) == list(FEATURE_FAMILIES)
    assert RECONSTRUCTION not in FAMILIES and set(FEATURE_FAMILIES) == set(FAMILIES)
    with pytest.raises(UserError):
        parse_families(" , ")


def test_nfe_counts_shared_calls_once():
    assert nfe_of(["eps_norm"], SETTINGS) == nfe_of(["eps_norm", "denoising_error"], SETTINGS) == L
    assert nfe_of(["diffpath6d", "diffpath1d"], SETTINGS) == FAMILIES["diffpath1d"].nfe(SETTINGS) == K
    assert nfe_of(list(FEATURE_FAMILIES), SETTINGS) == L + K
    assert nfe_of([], SETTINGS) == 0


def test_compute_features_runs_each_group_once_and_matches_each_family():
    acp = linear_acp()
    x0 = torch.rand((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    keys = ["a", "b", "c"]
    recorder = CallRecorder(wiggly_eps_fn)
    together = compute_features(list(FEATURE_FAMILIES), recorder, x0, keys, acp, SETTINGS)
    assert len(recorder.calls) == nfe_of(list(FEATURE_FAMILIES), SETTINGS)
    assert all(batch == len(keys) for batch, _ in recorder.calls)
    assert list(together) == list(FEATURE_FAMILIES)
    for name in FEATURE_FAMILIES:
        family = FAMILIES[name]
        alone = family.features(wiggly_eps_fn, x0, keys, acp, SETTINGS)
        assert alone.dtype == np.float64 and alone.shape == (3, len(family.feature_names(SETTINGS)))
        np.testing.assert_array_equal(together[name], alone)
    assert FAMILIES["eps_norm"].feature_names(SETTINGS) == ["eps_norm_t100", "eps_norm_t500", "eps_norm_t900"]


@pytest.mark.parametrize("kwargs", [dict(levels=()), dict(levels=(0, 1000)), dict(levels=(5, 5)),
                                    dict(diffpath_steps=1), dict(noise_type="pink"), dict(diffpath_clip=(1.0, 0.0))])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(UserError):
        FamilySettings(**kwargs)


def test_default_settings():
    settings = FamilySettings()
    assert settings.levels == tuple(range(50, 1000, 100)) and len(settings.levels) == 10
    assert settings.diffpath_steps == 10 and settings.diffpath_clip is None
