"""DiffPath against an independent float64 transcription of the authors' arithmetic.

The reference below is re-written (not copied) from github.com/clear-nus/diffpath at 6f92000:
``improved_diffusion/respace.py`` (``space_timesteps`` with "ddimK", ``SpacedDiffusion`` re-deriving the betas of the
kept timesteps, ``_WrappedModel`` mapping respaced indices back to the original t), ``gaussian_diffusion.py``
(``alphas_cumprod_next`` ending in 0.0, ``p_mean_variance`` with ``clip_denoised`` -> clamp(-1, 1), and
``ddim_reverse_sample``, which returns the eps RE-DERIVED from the (clipped) x0 prediction, the eps that
``ddim_reverse_sample_loop(return_eps=True)`` collects), ``save_test_statistics.py`` (sums over the steps and C, H, W;
``np.diff(eps, axis=1) * n_ddim_steps`` with n_ddim_steps = len(respaced betas) = K), ``eval_6d.py`` (the six
columns) and ``eval_1d.py`` (``deps_dt_sq_sqrt``). It is held in numpy float64 (the authors' code runs in float32;
only the arithmetic is transcribed, so the comparison can be tight). The network is a small fixed random conv net
with a sinusoidal t-embedding that, like the authors' ``learn_sigma`` models, outputs 2C channels of which the first C
are eps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_ood.families.diffpath import (
    DIFFPATH1D,
    DIFFPATH6D,
    DiffPathSettings,
    ddim_inversion,
    diffpath_features,
    diffpath_timesteps,
)


def make_settings(steps: int, clip: tuple[float, float] | None):
    """The settings object handed to ``diffpath_features``: K inversion steps and the x0-prediction clip range
    (None: no clipping). The only place the settings API is touched."""
    return DiffPathSettings(steps=steps, clip=clip)


T = 1000
SHAPE = (4, 3, 8, 8)
AUTHORS_CLIP = (-1.0, 1.0)  # clip_denoised=True: pred_xstart.clamp(-1, 1)
RTOL = 1e-6


def linear_betas(n: int = T) -> np.ndarray:
    return np.linspace(1e-4, 0.02, n, dtype=np.float64)


def alphas_cumprod() -> np.ndarray:
    return np.cumprod(1.0 - linear_betas())


# ----------------------------------------------------------------------------------------------------------------
# The toy network.


class ToyNet(torch.nn.Module):
    """conv -> + t-embedding -> SiLU -> conv, float64, weights fixed by the seed; 2C output channels."""

    def __init__(self, channels: int = 3, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        with torch.random.fork_rng(devices=[]):  # fixed weights without touching the global RNG
            torch.manual_seed(seed)
            self.inp = torch.nn.Conv2d(channels, hidden, 3, padding=1)
            self.emb = torch.nn.Linear(hidden, hidden)
            self.out = torch.nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        self.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        angles = t.to(torch.float64)[:, None] * freqs[None]
        emb = self.emb(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))
        h = torch.nn.functional.silu(self.inp(x) + emb[:, :, None, None])
        return 2.0 * self.out(h)


NET = ToyNet()


def our_eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the project's eps_fn would be for this model: the eps half of the output."""
    with torch.no_grad():
        return NET(x, t)[:, : x.shape[1]]


def authors_model(x: np.ndarray, t_original: np.ndarray) -> np.ndarray:
    """The model as the authors' loop sees it: the full 2C-channel output, split afterwards."""
    with torch.no_grad():
        return NET(torch.from_numpy(x), torch.from_numpy(t_original)).numpy()


def toy_images(seed: int = 1) -> np.ndarray:
    """Data in [-1, 1] (the authors' Normalize(0.5, 0.5) range), some pixels at the ends."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, SHAPE)
    x[:, :, 0, :4] = 1.0
    x[:, :, -1, -4:] = -1.0
    return x


# ----------------------------------------------------------------------------------------------------------------
# The transcription.


def ref_space_timesteps(num_steps: int, k: int) -> list[int]:
    """space_timesteps(num_steps, "ddimK"): the first stride s = 1, 2, ... giving exactly k points of
    range(0, num_steps, s); the kept timesteps, ascending (the authors keep a set, iterated in index order)."""
    s = 1
    while s < num_steps:
        kept = list(range(0, num_steps, s))
        if len(kept) == k:
            return kept
        s += 1
    raise ValueError(k)


def ref_respaced(k: int):
    """SpacedDiffusion: betas re-derived between kept steps, then the GaussianDiffusion arrays."""
    base = alphas_cumprod()
    kept = ref_space_timesteps(T, k)
    new_betas, previous = [], 1.0
    for i, abar in enumerate(base):
        if i in kept:
            new_betas.append(1.0 - abar / previous)
            previous = abar
    abar = np.cumprod(1.0 - np.array(new_betas))
    abar_next = np.append(abar[1:], 0.0)
    return kept, abar, abar_next, np.sqrt(1.0 / abar), np.sqrt(1.0 / abar - 1.0)


def authors_inversion(x0: np.ndarray, k: int, clip: bool, collect: str = "rederived"):
    """ddim_reverse_sample_loop(model, shape, x0, clip_denoised=clip, return_eps=True, return_xt=True).

    Returns eps (K, B, C, H, W) as collected and the path (K + 1, B, C, H, W) with path[0] = x0. ``collect`` =
    "raw" collects the network's eps instead of the re-derived one (a deliberately wrong variant, to show the
    comparison can tell them apart)."""
    timestep_map, _, abar_next, recip, recipm1 = ref_respaced(k)
    channels = x0.shape[1]
    x, collected, path = x0, [], [x0]
    for i in range(k):  # the respaced indices 0..K-1, ascending
        t_model = timestep_map[i] * (1000.0 / T)  # _WrappedModel with rescale_timesteps=True: t * 1000 / T
        assert t_model == int(t_model)  # an integer for T = 1000, as our eps_fn takes
        output = authors_model(x, np.full(x.shape[0], int(t_model), dtype=np.int64))
        model_eps = output[:, :channels]  # learn_sigma: th.split(output, C, dim=1)[0]
        pred_x0 = recip[i] * x - recipm1[i] * model_eps  # _predict_xstart_from_eps
        if clip:
            pred_x0 = np.clip(pred_x0, -1.0, 1.0)
        eps = (recip[i] * x - pred_x0) / recipm1[i]
        x = pred_x0 * np.sqrt(abar_next[i]) + np.sqrt(1.0 - abar_next[i]) * eps
        collected.append(model_eps if collect == "raw" else eps)
        path.append(x)
    return np.stack(collected), np.stack(path)


def authors_statistics(eps_k_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """save_test_statistics.py + eval_6d.py / eval_1d.py: (B, 6) and (B,)."""
    eps = eps_k_first.transpose(1, 0, 2, 3, 4)  # B, K, C, H, W
    k = eps.shape[1]
    axes = (1, 2, 3, 4)
    diff = np.diff(eps, axis=1) * k
    six = np.column_stack(
        [
            np.sum(eps, axis=axes),
            np.sum(eps**2, axis=axes),
            np.sum(eps**3, axis=axes),
            np.sum(diff, axis=axes),
            np.sum(diff**2, axis=axes),
            np.sum(diff**3, axis=axes),
        ]
    )
    return six, np.sqrt(np.sum(diff**2, axis=axes))


# ----------------------------------------------------------------------------------------------------------------
# Comparisons.


def assert_rel_close(got: np.ndarray, want: np.ndarray, scale: np.ndarray | float, what: str) -> None:
    """|got - want| <= RTOL * max(|want|, scale): relative, with a floor for entries that are sums of terms of both
    signs (scale: the size of the terms summed, so a near-zero sum is not compared against itself)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bound = RTOL * np.maximum(np.abs(want), scale)
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{what}: worst relative error {float(np.max(np.abs(got - want) / bound)) * RTOL:.3g}"


def column_scales(eps_k_first: np.ndarray) -> np.ndarray:
    """(B, 6): sums of |term| for each statistic, the floor for the relative comparison of signed sums."""
    eps = eps_k_first.transpose(1, 0, 2, 3, 4)
    diff = np.diff(eps, axis=1) * eps.shape[1]
    axes = (1, 2, 3, 4)
    return np.column_stack([np.sum(np.abs(a) ** p, axis=axes) for a in (eps, diff) for p in (1, 2, 3)])


def ours(x0: np.ndarray, k: int, clip: bool):
    acp = torch.from_numpy(alphas_cumprod())
    clip_range = AUTHORS_CLIP if clip else None
    settings = make_settings(k, clip_range)
    features = diffpath_features(our_eps_fn, torch.from_numpy(x0), [f"i{j}" for j in range(len(x0))], acp, settings)
    eps, path = ddim_inversion(our_eps_fn, torch.from_numpy(x0), acp, diffpath_timesteps(k, T), clip_range)
    return features, eps.numpy(), path.numpy()


@pytest.mark.parametrize("k", [10, 5])
def test_timesteps_are_the_authors_ddim_spacing(k):
    assert diffpath_timesteps(k, T) == ref_space_timesteps(T, k)
    assert diffpath_timesteps(k, T) == list(range(0, T, T // k))
    # the authors' 4000-step models: 0, 400, ..., 3600 for K = 10
    assert diffpath_timesteps(10, 4000) == ref_space_timesteps(4000, 10) == list(range(0, 4000, 400))
    _, abar, abar_next, _, _ = ref_respaced(k)
    np.testing.assert_allclose(abar, alphas_cumprod()[ref_space_timesteps(T, k)], rtol=1e-14, atol=0)
    assert abar_next[-1] == 0.0


@pytest.mark.parametrize("k", [10, 5])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_features_and_path_equal_the_authors_arithmetic(k, clip):
    x0 = toy_images()
    ref_eps, ref_path = authors_inversion(x0, k, clip)
    ref_six, ref_one = authors_statistics(ref_eps)
    features, eps, path = ours(x0, k, clip)

    assert features[DIFFPATH6D].dtype == np.float64 and features[DIFFPATH6D].shape == (SHAPE[0], 6)
    assert features[DIFFPATH1D].shape == (SHAPE[0], 1)
    eps_scale = np.abs(ref_eps).max()
    assert_rel_close(eps, ref_eps, eps_scale, "collected eps")
    assert_rel_close(path, ref_path, np.abs(ref_path).max(axis=tuple(range(1, ref_path.ndim)), keepdims=True), "path")
    assert_rel_close(features[DIFFPATH6D], ref_six, column_scales(ref_eps), "diffpath6d")
    assert_rel_close(features[DIFFPATH1D][:, 0], ref_one, 0.0, "diffpath1d")
    # the last step lands at alpha-bar 0: the end of the path is the last collected eps
    np.testing.assert_allclose(ref_path[-1], ref_eps[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [10, 5])
def test_the_comparison_can_tell_the_collected_eps_apart(k):
    """With clipping on, the eps re-derived from the clipped x0 differs from the network's: collecting the raw one
    (the wrong variant) must miss our features by far more than the tolerance, and clipping must change them."""
    x0 = toy_images()
    features, _, _ = ours(x0, k, clip=True)
    right_eps, _ = authors_inversion(x0, k, clip=True)
    wrong_eps, _ = authors_inversion(x0, k, clip=True, collect="raw")
    unclipped_eps, _ = authors_inversion(x0, k, clip=False)
    right, wrong, unclipped = (authors_statistics(e)[0] for e in (right_eps, wrong_eps, unclipped_eps))
    scale = column_scales(right_eps)
    for other in (wrong, unclipped):
        assert np.max(np.abs(other - right) / np.maximum(np.abs(right), scale)) > 1e3 * RTOL
    with pytest.raises(AssertionError):
        assert_rel_close(features[DIFFPATH6D], wrong, column_scales(wrong_eps), "diffpath6d vs raw-eps variant")


def test_network_is_called_with_the_original_timesteps():
    calls = []

    def recording(x, t):
        calls.append(t.tolist())
        return our_eps_fn(x, t)

    diffpath_features(recording, torch.from_numpy(toy_images()), ["a", "b", "c", "d"],
                      torch.from_numpy(alphas_cumprod()), make_settings(10, AUTHORS_CLIP))
    assert calls == [[t] * SHAPE[0] for t in ref_space_timesteps(T, 10)]
