"""eps_norm and denoising_error against a direct per-image, per-level computation; batch invariance; per-image and
shared noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import CallRecorder, gaussian_eps_fn, linear_acp, wiggly_eps_fn

from ddpm_ood.diffusion.noise import row_noise, row_noise_batch
from ddpm_ood.errors import UserError
from ddpm_ood.families.noise_levels import DENOISING_ERROR, EPS_NORM, NoiseLevelSettings, noise_level_features
from ddpm_ood.seeding import shared_noise_key

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
    settings = NoiseLevelSettings(levels=LEVELS, seed=7, noise="per_image")
    got = noise_level_features(eps_fn, x0, keys, acp, settings)
    norms, errors = direct(eps_fn, x0, keys, acp, settings, lambda k, t: row_noise(7, k, t, shape[1:]))
    np.testing.assert_allclose(got[EPS_NORM], norms, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[DENOISING_ERROR], errors, rtol=1e-12, atol=0)


def test_zero_network_gives_zero_norm_and_the_noise_energy_as_error():
    acp, x0 = linear_acp(), images((2, 1, 4, 4))
    settings = NoiseLevelSettings(levels=LEVELS, noise="per_image")
    got = noise_level_features(lambda x, t: torch.zeros_like(x), x0, ["a", "b"], acp, settings)
    noise = row_noise_batch(settings.noise_type, settings.seed, ["a", "b"], LEVELS, x0.shape[1:]).double()
    assert (got[EPS_NORM] == 0).all()
    np.testing.assert_allclose(got[DENOISING_ERROR], noise.square().mean(dim=(2, 3, 4)).T.numpy(), rtol=1e-12)


def test_one_call_per_level_for_the_whole_batch():
    acp, x0 = linear_acp(), images((5, 1, 4, 4))
    recorder = CallRecorder(wiggly_eps_fn)
    noise_level_features(recorder, x0, list("abcde"), acp, NoiseLevelSettings(levels=LEVELS, noise="per_image"))
    assert recorder.calls == [(5, [t] * 5) for t in LEVELS]


@pytest.mark.parametrize("noise", ["shared", "per_image"])
@pytest.mark.parametrize("noise_type", ["gaussian", "simplex"])
def test_batch_sizes_one_and_seven_give_identical_rows(noise_type, noise):
    acp, x0 = linear_acp(), images((7, 1, 6, 6))
    keys = [f"img{i}" for i in range(7)]
    settings = NoiseLevelSettings(levels=LEVELS, noise_type=noise_type, noise=noise)
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
    base = noise_level_features(wiggly_eps_fn, x0, ["a"], acp, NoiseLevelSettings(levels=LEVELS, noise="per_image"))
    other_key = noise_level_features(wiggly_eps_fn, x0, ["b"], acp, NoiseLevelSettings(levels=LEVELS, noise="per_image"))
    other_seed = noise_level_features(wiggly_eps_fn, x0, ["a"], acp, NoiseLevelSettings(levels=LEVELS, seed=3, noise="per_image"))
    for other in (other_key, other_seed):
        assert (other[DENOISING_ERROR] != base[DENOISING_ERROR]).all()


@pytest.mark.parametrize("noise_type", ["gaussian", "simplex"])
def test_shared_noise_gives_an_image_the_same_feature_whatever_its_key_batch_or_position(noise_type):
    acp, x0 = linear_acp(), images((4, 1, 6, 6), seed=3)
    settings = NoiseLevelSettings(levels=LEVELS, noise="shared", seed=5, noise_type=noise_type)
    base = noise_level_features(wiggly_eps_fn, x0, ["a", "b", "c", "d"], acp, settings)
    # other keys, the image repeated at another position in another batch
    again = noise_level_features(wiggly_eps_fn, torch.cat([x0[2:3], x0[0:1], x0[2:3]]), ["z", "y", "x"], acp,
                                 settings)
    for name in (EPS_NORM, DENOISING_ERROR):
        np.testing.assert_array_equal(again[name][0], base[name][2])
        np.testing.assert_array_equal(again[name][2], base[name][2])
        np.testing.assert_array_equal(again[name][1], base[name][0])
    # per-image noise depends on the key: the same image under two keys gets two features
    per_image = NoiseLevelSettings(levels=LEVELS, noise="per_image", seed=5, noise_type=noise_type)
    one = noise_level_features(wiggly_eps_fn, x0[:1], ["a"], acp, per_image)
    two = noise_level_features(wiggly_eps_fn, x0[:1], ["b"], acp, per_image)
    assert (one[DENOISING_ERROR] != two[DENOISING_ERROR]).all()


def test_shared_noise_is_one_draw_per_level_and_seed_drawn_once_for_the_batch():
    """Against a direct computation with the noise of the shared key; another seed gives another draw."""
    acp, x0 = linear_acp(), images((3, 2, 5, 4))
    settings = NoiseLevelSettings(levels=LEVELS, noise="shared", seed=7)
    got = noise_level_features(wiggly_eps_fn, x0, ["a", "b", "c"], acp, settings)
    shared = shared_noise_key(0)
    norms, errors = direct(wiggly_eps_fn, x0, ["a", "b", "c"], acp, settings,
                           lambda k, t: row_noise(7, shared, t, x0.shape[1:]))
    np.testing.assert_allclose(got[EPS_NORM], norms, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[DENOISING_ERROR], errors, rtol=1e-12, atol=0)
    other = noise_level_features(wiggly_eps_fn, x0, ["a", "b", "c"], acp,
                                 NoiseLevelSettings(levels=LEVELS, noise="shared", seed=8))
    assert (other[DENOISING_ERROR] != got[DENOISING_ERROR]).all()


def test_several_shared_draws_average_the_features_of_each_draw():
    acp, x0 = linear_acp(), images((2, 1, 4, 4))
    recorder = CallRecorder(wiggly_eps_fn)
    settings = NoiseLevelSettings(levels=LEVELS, noise="shared", draws=3)
    got = noise_level_features(recorder, x0, ["a", "b"], acp, settings)
    assert len(recorder.calls) == len(LEVELS) * 3
    draws = [direct(wiggly_eps_fn, x0, ["a", "b"], acp, settings,
                    lambda k, t, m=m: row_noise(settings.seed, shared_noise_key(m), t, x0.shape[1:]))
             for m in range(3)]
    np.testing.assert_allclose(got[EPS_NORM], np.mean([d[0] for d in draws], axis=0), rtol=1e-12)
    np.testing.assert_allclose(got[DENOISING_ERROR], np.mean([d[1] for d in draws], axis=0), rtol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(levels=()), dict(levels=(0, 1000)), dict(levels=(5, 5)),
                                    dict(noise="fresh"), dict(draws=0), dict(noise="per_image", draws=2),
                                    dict(noise_type="pink")])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(UserError):
        NoiseLevelSettings(**{"levels": LEVELS, **kwargs})
