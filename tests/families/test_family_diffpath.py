"""DiffPath: the DDIM inversion against closed forms, the statistics against their definition, batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import CallRecorder, gaussian_eps_fn, linear_acp, wiggly_eps_fn

from ddpm_ood.errors import UserError
from ddpm_ood.families.diffpath import (
    DIFFPATH1D,
    DIFFPATH6D,
    DiffPathSettings,
    ddim_inversion,
    diffpath_features,
    diffpath_timesteps,
)

MU, S = 0.3, 0.5
F32 = np.finfo(np.float32).eps


def gaussian_x0(shape=(4, 1, 4, 4), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(shape, generator=g)


def test_timesteps_follow_improved_diffusion_ddim_spacing():
    assert diffpath_timesteps(10) == list(range(0, 1000, 100))
    for steps in (2, 7, 10, 50, 200, 1000):
        ts = diffpath_timesteps(steps)
        strides = set(np.diff(ts).tolist())
        assert len(ts) == steps and ts[0] == 0 and len(strides) == 1 and ts[-1] < 1000
        # the smallest stride giving that many steps: one less would give more steps
        stride = strides.pop()
        assert stride == 1 or len(range(0, 1000, stride - 1)) > steps
    with pytest.raises(UserError, match="nearby step counts"):
        diffpath_timesteps(300)  # ceil(1000 / s) is 334 for s = 3 and 250 for s = 4


def test_one_step_matches_float64_hand_computation():
    acp, x0 = linear_acp(), gaussian_x0()
    eps_fn = gaussian_eps_fn(acp, MU, S)
    ts = [0, 100]
    eps, path = ddim_inversion(eps_fn, x0, acp, ts)
    a0, a1 = float(acp[0]), float(acp[100])  # the float32 schedule values, in float64
    x = x0.double()
    e = np.sqrt(1 - a0) * (x - np.sqrt(a0) * MU) / (a0 * S * S + 1 - a0)
    x0_pred = (x - np.sqrt(1 - a0) * e) / np.sqrt(a0)
    expected = np.sqrt(a1) * x0_pred + np.sqrt(1 - a1) * e
    # float32 arithmetic of a handful of operations on values of order 1
    tol = 16 * F32 * float(expected.abs().max())
    torch.testing.assert_close(eps[0].double(), e, rtol=0, atol=tol)
    torch.testing.assert_close(path[1].double(), expected, rtol=0, atol=tol)
    # the last step goes to alpha-bar 0: x_K is the last eps
    torch.testing.assert_close(path[2], eps[1], rtol=0, atol=0)


def test_trajectory_matches_the_closed_form_euler_product():
    """For Gaussian data DDIM is Euler on y = x / sqrt(a) in sigma = sqrt((1 - a) / a) with
    dy/dsigma = sigma (y - mu) / (s^2 + sigma^2), so y_{k+1} - mu = (y_k - mu) (1 + sigma_k dsigma / (s^2 + sigma_k^2))."""
    acp, x0 = linear_acp(), gaussian_x0()
    ts = diffpath_timesteps(10)
    _, path = ddim_inversion(gaussian_eps_fn(acp, MU, S), x0, acp, ts)
    a = acp.double()[ts]
    sigma = ((1 - a) / a).sqrt()
    y = x0.double() / a[0].sqrt()
    for k in range(len(ts) - 1):
        y = MU + (y - MU) * (1 + sigma[k] * (sigma[k + 1] - sigma[k]) / (S * S + sigma[k] ** 2))
        expected = a[k + 1].sqrt() * y
        # float32 rounding accumulates over k steps of a few operations each
        tol = 16 * (k + 1) * F32 * float(expected.abs().max())
        torch.testing.assert_close(path[k + 1].double(), expected, rtol=0, atol=tol)


def test_many_steps_converge_to_the_exact_ode_solution():
    """The probability-flow ODE of N(mu, s^2) data moves x from t_0 along
    x_t = sqrt(a_t) (mu + sqrt(s^2 + sigma_t^2) z), z = (x_0 / sqrt(a_0) - mu) / sqrt(s^2 + sigma_0^2), to z at a = 0.
    DDIM is first order (Euler): doubling K from 100 to 200 must halve the error (ratio 2 up to the next-order term,
    O(1/K) relative, hence the 10 % band), and Richardson extrapolation 2 x_200 - x_100, which cancels the first-order
    term, must land an order of magnitude closer to the exact solution than x_200 does."""
    acp, x0 = linear_acp(), gaussian_x0()
    eps_fn = gaussian_eps_fn(acp, MU, S)
    a = acp.double()
    t100, t200 = diffpath_timesteps(100), diffpath_timesteps(200)
    p100 = ddim_inversion(eps_fn, x0, acp, t100)[1].double()
    p200 = ddim_inversion(eps_fn, x0, acp, t200)[1].double()
    z = (x0.double() / a[0].sqrt() - MU) / (S * S + (1 - a[0]) / a[0]).sqrt()
    for t in (500, 900, None):  # None: the end point, at alpha-bar 0
        if t is None:
            x100, x200, exact = p100[-1], p200[-1], z
        else:
            x100, x200 = p100[t100.index(t)], p200[t200.index(t)]
            exact = a[t].sqrt() * (MU + (S * S + (1 - a[t]) / a[t]).sqrt() * z)
        err100, err200 = (x100 - exact).abs().max(), (x200 - exact).abs().max()
        assert 1.8 < err100 / err200 < 2.2
        assert (2 * x200 - x100 - exact).abs().max() < err200 / 10


def test_network_sees_original_timesteps_once_per_step_for_the_whole_batch():
    acp, x0 = linear_acp(), gaussian_x0((5, 2, 4, 4))
    recorder = CallRecorder(wiggly_eps_fn)
    settings = DiffPathSettings(steps=10)
    diffpath_features(recorder, x0, [f"k{i}" for i in range(5)], acp, settings)
    assert [b for b, _ in recorder.calls] == [5] * 10
    assert [ts[0] for _, ts in recorder.calls] == list(range(0, 1000, 100))
    assert all(len(set(ts)) == 1 for _, ts in recorder.calls)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 1, 2, 3, 4)])
def test_statistics_match_diffpath_definition(shape):
    """diffpath6d / 1d from the stored eps, computed as save_test_statistics.py does (in float64)."""
    acp, x0 = linear_acp(), gaussian_x0(shape)
    settings = DiffPathSettings(steps=7)
    steps = settings.steps
    eps, _ = ddim_inversion(wiggly_eps_fn, x0, acp, diffpath_timesteps(steps))
    e = eps.double().numpy().swapaxes(0, 1)  # B, K, C, *spatial
    axes = tuple(range(1, e.ndim))
    d = np.diff(e, axis=1) * steps
    expected = np.column_stack([(e**p).sum(axis=axes) for p in (1, 2, 3)] + [(d**p).sum(axis=axes) for p in (1, 2, 3)])
    got = diffpath_features(wiggly_eps_fn, x0, ["a", "b", "c"], acp, settings)
    np.testing.assert_allclose(got[DIFFPATH6D], expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[DIFFPATH1D][:, 0], np.sqrt(expected[:, 4]), rtol=1e-12, atol=0)


def test_clipping_rederives_eps_from_the_clipped_prediction():
    acp = linear_acp()
    x0 = gaussian_x0((3, 1, 4, 4)).clamp(0, 1)
    ts = diffpath_timesteps(10)
    eps, path = ddim_inversion(wiggly_eps_fn, x0, acp, ts, clip=(0.0, 1.0))
    a = acp.double()[ts]
    for k in range(len(ts)):
        recip, recipm1 = 1 / a[k].sqrt(), ((1 - a[k]) / a[k]).sqrt()
        x0_pred = recip * path[k].double() - recipm1 * eps[k].double()
        # float32 rounding of the two terms, a few operations each
        tol = 16 * F32 * float(recip * path[k].abs().max() + recipm1 * eps[k].abs().max())
        assert x0_pred.min() >= -tol and x0_pred.max() <= 1 + tol
    unclipped, _ = ddim_inversion(wiggly_eps_fn, x0, acp, ts)
    assert not torch.allclose(unclipped, eps)  # the stand-in's x0 predictions do leave [0, 1]
    # A range that clips nothing changes eps only by rounding: re-deriving eps divides by sqrt(1 / a - 1), 0.01 at
    # t = 0, so float32 rounding of order 1e-7 grows to about 1e-5.
    wide, _ = ddim_inversion(wiggly_eps_fn, x0, acp, ts, clip=(-1e6, 1e6))
    torch.testing.assert_close(wide, unclipped, rtol=0, atol=1e-4)


def test_batch_sizes_one_and_seven_give_identical_rows():
    acp = linear_acp()
    x0 = gaussian_x0((7, 1, 4, 4))
    keys = [f"img{i}" for i in range(7)]
    settings = DiffPathSettings(steps=10)
    together = diffpath_features(wiggly_eps_fn, x0, keys, acp, settings)
    for i in range(7):
        alone = diffpath_features(wiggly_eps_fn, x0[i : i + 1], keys[i : i + 1], acp, settings)
        for name in (DIFFPATH6D, DIFFPATH1D):
            np.testing.assert_array_equal(alone[name][0], together[name][i])
