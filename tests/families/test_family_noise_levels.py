"""eps_norm and denoising_error against a direct per-image, per-level computation; batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import CallRecorder, gaussian_eps_fn, linear_acp, wiggly_eps_fn

from ddpm_ood.diffusion.noise import row_noise, row_noise_batch
from ddpm_ood.families.base import FamilySettings
from ddpm_ood.families.noise_levels import DENOISING_ERROR, EPS_NORM, noise_level_features

LEVELS = (10, 250, 600, 990)


def images(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def direct(eps_fn, x0, keys, acp, settings, noise_of):
    """One image and one level at a time, reductions in numpy float64."""
    norms = np.zeros((len(keys), len(settings.levels)))
    errors = np.zeros_like(norms)
    for b, key in enumerate(keys):
        for i, t in enumerate(settings.levels):
            n = noise_of(key, t)
            a = acp[t]
            x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * n
            e = eps_fn(x_t[None], torch.tensor([t]))[0].double().numpy()
            norms[b, i] = np.sqrt((e**2).sum())
            errors[b, i] = ((e - n.double().numpy()) ** 2).mean()
    return norms, errors


@pytest.mark.parametrize("shape", [(3, 2, 5, 4), (2, 1, 3, 4, 5)])
@pytest.mark.parametrize("network", ["wiggly", "gaussian"])
def test_features_match_direct_per_image_computation(shape, network):
    acp = linear_acp()
    eps_fn = wiggly_eps_fn if network == "wiggly" else gaussian_eps_fn(acp, 0.5, 0.3)
    x0 = images(shape)
    keys = [f"img{i}" for i in range(shape[0])]
    settings = FamilySettings(levels=LEVELS, seed=7)
    got = noise_level_features(eps_fn, x0, keys, acp, settings)
    norms, errors = direct(eps_fn, x0, keys, acp, settings, lambda k, t: row_noise(7, k, t, shape[1:]))
    np.testing.assert_allclose(got[EPS_NORM], norms, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[DENOISING_ERROR], errors, rtol=1e-12, atol=0)


def test_zero_network_gives_zero_norm_and_the_noise_energy_as_error():
    acp, x0 = linear_acp(), images((2, 1, 4, 4))
    settings = FamilySettings(levels=LEVELS)
    got = noise_level_features(lambda x, t: torch.zeros_like(x), x0, ["a", "b"], acp, settings)
    noise = row_noise_batch(settings.noise_type, settings.seed, ["a", "b"], LEVELS, x0.shape[1:]).double()
    assert (got[EPS_NORM] == 0).all()
    np.testing.assert_allclose(got[DENOISING_ERROR], noise.square().mean(dim=(2, 3, 4)).T.numpy(), rtol=1e-12)


def test_one_call_per_level_for_the_whole_batch():
    acp, x0 = linear_acp(), images((5, 1, 4, 4))
    recorder = CallRecorder(wiggly_eps_fn)
    noise_level_features(recorder, x0, list("abcde"), acp, FamilySettings(levels=LEVELS))
    assert recorder.calls == [(5, [t] * 5) for t in LEVELS]


@pytest.mark.parametrize("noise_type", ["gaussian", "simplex"])
def test_batch_sizes_one_and_seven_give_identical_rows(noise_type):
    acp, x0 = linear_acp(), images((7, 1, 6, 6))
    keys = [f"img{i}" for i in range(7)]
    settings = FamilySettings(levels=LEVELS, noise_type=noise_type)
    together = noise_level_features(wiggly_eps_fn, x0, keys, acp, settings)
    order = [3, 0, 6, 1, 5, 2, 4]
    shuffled = noise_level_features(wiggly_eps_fn, x0[order], [keys[i] for i in order], acp, settings)
    for i in range(7):
        alone = noise_level_features(wiggly_eps_fn, x0[i : i + 1], keys[i : i + 1], acp, settings)
        for name in (EPS_NORM, DENOISING_ERROR):
            np.testing.assert_array_equal(alone[name][0], together[name][i])
            np.testing.assert_array_equal(shuffled[name][order.index(i)], together[name][i])


def test_rows_depend_on_the_key_and_the_seed():
    acp, x0 = linear_acp(), images((1, 1, 4, 4))
    base = noise_level_features(wiggly_eps_fn, x0, ["a"], acp, FamilySettings(levels=LEVELS))
    other_key = noise_level_features(wiggly_eps_fn, x0, ["b"], acp, FamilySettings(levels=LEVELS))
    other_seed = noise_level_features(wiggly_eps_fn, x0, ["a"], acp, FamilySettings(levels=LEVELS, seed=3))
    for other in (other_key, other_seed):
        assert (other[DENOISING_ERROR] != base[DENOISING_ERROR]).all()
