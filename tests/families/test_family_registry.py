"""The registry: names, parsing, shared network calls and their count, settings from options, and a family
registered by a test alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_models import CallRecorder, linear_acp, wiggly_eps_fn

from ddpm_ood.errors import UserError
from ddpm_ood.families import (
    ENSEMBLE,
    RECONSTRUCTION,
    RECONSTRUCTION_SCORES,
    ScoreContext,
    ScoreOptions,
    compute_features,
    family_names,
    feature_family_names,
    get_family,
    make_settings,
    nfe_of,
    parse_families,
    score_names,
    without_reconstruction,
)

OPTIONS = ScoreOptions(score_levels=(100, 500, 900), diffpath_steps=5)
L, K = len(OPTIONS.score_levels), OPTIONS.diffpath_steps


def settings_of(families=None, options=OPTIONS):
    return make_settings(families or feature_family_names(), options, ScoreContext(acp=linear_acp()))


def test_the_registry_lists_every_score_once_in_table_order():
    assert feature_family_names() == ("eps_norm", "denoising_error", "msma", "diffpath6d", "diffpath1d")
    assert family_names() == (RECONSTRUCTION, *feature_family_names())
    assert score_names() == (*RECONSTRUCTION_SCORES, *feature_family_names(), ENSEMBLE)
    assert len(set(score_names())) == len(score_names())


def test_unknown_family_lists_the_accepted_names():
    for call in (lambda: get_family("mahalanobis"), lambda: parse_families("eps_norm,mahalanobis")):
        with pytest.raises(UserError, match="mahalanobis") as info:
            call()
        for name in (*family_names(), "diffpath", "all"):
            assert name in str(info.value)
    with pytest.raises(UserError, match="reconstruction engine"):
        get_family(RECONSTRUCTION)


def test_parse_families():
    assert parse_families("all") == list(family_names())
    assert parse_families("diffpath") == ["diffpath6d", "diffpath1d"]
    assert parse_families(" diffpath1d , eps_norm,diffpath,eps_norm ") == ["eps_norm", "diffpath6d", "diffpath1d"]
    assert parse_families("reconstruction,denoising_error") == [RECONSTRUCTION, "denoising_error"]
    assert without_reconstruction(parse_families("all")) == list(feature_family_names())
    with pytest.raises(UserError):
        parse_families(" , ")


def test_nfe_counts_shared_calls_once():
    settings = settings_of()
    msma_levels = len(settings["msma"].levels)
    assert nfe_of(["eps_norm"], settings) == nfe_of(["eps_norm", "denoising_error"], settings) == L
    assert nfe_of(["diffpath6d", "diffpath1d"], settings) == get_family("diffpath1d").nfe(settings["diffpath1d"]) == K
    assert nfe_of(list(feature_family_names()), settings) == L + msma_levels + K
    assert nfe_of([], settings) == 0
    # a group's calls are shared only between members with the same settings
    other = {**settings, "denoising_error": dataclasses.replace(settings["denoising_error"], seed=99)}
    assert nfe_of(["eps_norm", "denoising_error"], other) == 2 * L


def test_compute_features_runs_each_group_once_and_matches_each_family():
    acp = linear_acp()
    settings = settings_of()
    x0 = torch.rand((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    keys = ["a", "b", "c"]
    recorder = CallRecorder(wiggly_eps_fn)
    names = list(feature_family_names())
    together = compute_features(names, recorder, x0, keys, acp, settings)
    assert len(recorder.calls) == nfe_of(names, settings)
    assert all(batch == len(keys) for batch, _ in recorder.calls)
    assert list(together) == names
    for name in names:
        family = get_family(name)
        alone = family.features(wiggly_eps_fn, x0, keys, acp, settings[name])
        assert alone.dtype == np.float64 and alone.shape == (3, len(family.columns(settings[name])))
        np.testing.assert_array_equal(together[name], alone)
    assert get_family("eps_norm").columns(settings["eps_norm"]) == ["eps_norm_t100", "eps_norm_t500", "eps_norm_t900"]


def test_settings_come_from_the_options_and_the_context():
    context = ScoreContext(seed=11, noise_type="simplex", acp=linear_acp(), data_range=(0.0, 2.0), data_scale=2.0)
    s = make_settings(list(feature_family_names()), ScoreOptions(score_noise="per_image", diffpath_clip=True), context)
    assert s["eps_norm"] == s["denoising_error"]
    assert (s["eps_norm"].seed, s["eps_norm"].noise_type, s["eps_norm"].noise) == (11, "simplex", "per_image")
    assert s["eps_norm"].levels == tuple(range(50, 1000, 100))
    assert s["diffpath6d"].clip == (0.0, 2.0) and s["diffpath6d"].steps == 10
    assert s["msma"].data_scale == 2.0
    latent = make_settings(["diffpath6d"], ScoreOptions(), dataclasses.replace(context, data_range=None))
    assert latent["diffpath6d"].clip is None
    off = make_settings(["diffpath6d"], ScoreOptions(diffpath_clip=False), context)
    assert off["diffpath6d"].clip is None


def test_settings_survive_the_sidecar_round_trip():
    for name, settings in settings_of().items():
        family = get_family(name)
        record = family.settings_record(settings)
        assert family.settings_from(record) == settings
    with pytest.raises(UserError, match="eps_norm"):
        get_family("eps_norm").settings_from({"steps": 3})


@pytest.mark.parametrize("kwargs", [dict(score_noise="fresh"), dict(score_noise_draws=0),
                                    dict(score_noise="per_image", score_noise_draws=2)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(UserError):
        ScoreOptions(**kwargs)


def test_default_options():
    options = ScoreOptions()
    assert options.score_levels == tuple(range(50, 1000, 100))
    assert (options.score_noise, options.score_noise_draws, options.diffpath_steps, options.diffpath_clip) == (
        "shared", 1, 10, True)
