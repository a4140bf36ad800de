"""MSMA as published: the score's norm at the clean input, at scales 1..0.01 placed on the model's schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import CallRecorder, gaussian_eps_fn, linear_acp

from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.errors import UserError
from ddpm_ood.families import ScoreContext, ScoreOptions, get_family
from ddpm_ood.families.msma import MSMA, MSMASettings, level_sigmas, msma_features, msma_levels, msma_sigmas

QUICKSTART = ScheduleConfig(beta_schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)


def test_scales_are_geometric_from_one_to_a_hundredth():
    sigmas = np.array(msma_sigmas())
    assert len(sigmas) == 10 and sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(0.01)
    np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], 0.01 ** (1 / 9))


@pytest.mark.parametrize("schedule", [ScheduleConfig(), QUICKSTART], ids=["linear", "quickstart"])
@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_each_scale_goes_to_the_level_nearest_in_log_sigma(schedule, data_scale):
    acp = alphas_cumprod(schedule)
    sigmas = msma_sigmas()
    levels = msma_levels(sigmas, acp, data_scale)
    per_level = np.log(level_sigmas(acp, data_scale))
    assert list(levels) == sorted(set(levels))
    for s in sigmas:  # no other level is nearer to a scale than the one it was given
        nearest = min(levels, key=lambda t: abs(per_level[t] - np.log(s)))
        assert abs(per_level[nearest] - np.log(s)) == np.abs(per_level - np.log(s)).min()
    # sigma_t grows with t: the largest scale (1) maps to the highest level
    assert level_sigmas(acp, data_scale)[levels[-1]] == pytest.approx(1.0, rel=0.05)


def test_quickstart_schedule_merges_the_scales_below_its_first_sigma():
    acp = alphas_cumprod(QUICKSTART)
    # sigma_0 = sqrt(beta_0 / (1 - beta_0)) = 0.039: the scales 0.01, 0.017 and 0.028 all map to t = 0
    assert level_sigmas(acp, 1.0)[0] == pytest.approx(np.sqrt(0.0015 / 0.9985), rel=1e-4)
    levels = msma_levels(msma_sigmas(), acp, 1.0)
    assert msma_levels(msma_sigmas()[-3:], acp, 1.0) == (0,)
    assert levels[0] == 0 and len(levels) == 10 - 2
    # with a data scale of 2 (b_scale = 2) the same image-unit scales are twice the model-space sigma
    assert msma_levels(msma_sigmas(), acp, 2.0) != levels


def test_feature_is_the_norm_of_the_exact_score_at_the_clean_input():
    """Gaussian data N(0, s^2) per element and the exact noise predictor: at the clean input sqrt(a) x0,
    eps = sqrt(a (1 - a)) x0 / (a s^2 + 1 - a), so the feature is that factor times ||x0||."""
    acp, s = linear_acp(), 0.5
    x0 = torch.randn((4, 2, 3, 3), generator=torch.Generator().manual_seed(0)) * s
    settings = MSMASettings(msma_sigmas(), 1.0, msma_levels(msma_sigmas(), acp, 1.0))
    recorder = CallRecorder(gaussian_eps_fn(acp, 0.0, s))
    got = msma_features(recorder, x0, ["a", "b", "c", "d"], acp, settings)[MSMA]
    a = acp.double()[list(settings.levels)].numpy()
    norms = x0.double().reshape(4, -1).norm(dim=1).numpy()
    expected = norms[:, None] * np.sqrt(a * (1 - a)) / (a * s * s + 1 - a)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert recorder.calls == [(4, [t] * 4) for t in settings.levels]  # one call per level, no noise drawn


def test_settings_from_the_context_and_refusals():
    acp = alphas_cumprod(QUICKSTART)
    family = get_family(MSMA)
    settings = family.make_settings(ScoreOptions(), ScoreContext(acp=acp, data_scale=1.0))
    assert family.nfe(settings) == len(settings.levels) == 8
    assert family.columns(settings)[0] == "msma_t0"
    with pytest.raises(UserError):
        msma_sigmas(1)
    with pytest.raises(UserError):
        MSMASettings(msma_sigmas(), 1.0, (5, 5))
