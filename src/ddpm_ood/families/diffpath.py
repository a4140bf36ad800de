"""DiffPath (Heng, Thiery & Soh, "Out-of-distribution detection with a single unconditional diffusion model",
NeurIPS 2024): statistics of the deterministic DDIM path from the image towards noise.

Followed from the authors' code, github.com/clear-nus/diffpath (built on openai/improved-diffusion), files
``save_test_statistics.py`` / ``save_train_statistics.py`` (the statistics), ``improved_diffusion/respace.py``
(``space_timesteps``, ``_WrappedModel``), ``improved_diffusion/gaussian_diffusion.py`` (``ddim_reverse_sample``,
``ddim_reverse_sample_loop``), ``eval_6d.py`` / ``eval_1d.py`` (which statistics each variant uses), and
``configs/*_model_config.yaml`` (``clip_denoised: True``).

Timesteps: DiffPath sets ``timestep_respacing = f"ddim{K}"``; improved-diffusion's ``space_timesteps(T, "ddimK")``
takes the smallest integer stride s with len(range(0, T, s)) == K, so t_k = k * s: 0, 100, ..., 900 for K = 10
(``diffpath_timesteps``; a K with no such stride is refused, as improved-diffusion does). The respaced process has
alpha-bars abar_k = alphas_cumprod[t_k], and its ``alphas_cumprod_next`` appends 0.0, so the last step goes to
abar = 0 (pure noise). ``_WrappedModel`` maps respaced indices back to the original timesteps, so the network is
called with t_k on the 1000-step schedule (DiffPath's models use 4000 steps: 0, 400, ..., 3600; ours 1000).

Inversion (``ddim_reverse_sample``, eta = 0), from x_0 = the input image taken as the state at t_0, for k = 0..K-1::

    eps_k   = eps_fn(x_k, t_k)
    x0_pred = x_k / sqrt(abar_k) - sqrt(1 / abar_k - 1) eps_k
    x_{k+1} = sqrt(abar_{k+1}) x0_pred + sqrt(1 - abar_{k+1}) eps_k       (abar_K = 0)

K network calls per image (each call one batch). The collected eps are the K eps_k.

Clipping: DiffPath runs with ``clip_denoised=True`` (both configs), i.e. x0_pred is clamped to [-1, 1], its data
range (its loaders normalise images to [-1, 1]), and eps_k is then re-derived from the clamped x0_pred,
eps_k = (x_k / sqrt(abar_k) - x0_pred) / sqrt(1 / abar_k - 1); both the step and the statistics use that eps_k.
Our model space is not [-1, 1]: pixel models see images in [0, 1] times b_scale, VQ-VAE latents are unbounded. So
the clip range is a setting, ``DiffPathSettings.clip``: DiffPath's rule carried over is "clip to the model's data
range" (``ScoreContext.data_range``: (0, b_scale) for this project's pixel models, (-1, 1) for published ones) and
no clipping for VQ-VAE latents, which have no range to clip to (``--diffpath_clip=0`` turns it off anywhere).

What the clip does at the edge of the range: a pixel at the range's end (a black background pixel at 0) whose x0
prediction overshoots is pinned back to that end at every step, and the re-derived eps_k is exactly the noise that
explains x_k from the pinned value; so where the network predicts a slightly negative background the clip removes
that error from both the path and the statistics, and the eps statistics of background-heavy images (MNIST) come
from the foreground alone more than without the clip. Measured both ways in docs/score-families.md.

Statistics (``save_test_statistics.py``): with eps (K, B, ...) and deps_k = (eps_{k+1} - eps_k) * K for
k = 0..K-2 (``np.diff(eps, axis=1) * n_ddim_steps``, n_ddim_steps = K: the difference divided by dt = 1 / K)::

    diffpath6d = [sum eps, sum eps^2, sum eps^3, sum deps, sum deps^2, sum deps^3]   (eval_6d.py's columns)
    diffpath1d = sqrt(sum deps^2)                                                   (eval_1d.py's deps_dt_sq_sqrt)

sums over the steps and all non-batch elements. Differences from the code, all numerical: sums are accumulated in
float64 here (float32 numpy there), step by step (only two eps are held, not K, which matters for 3D volumes).
DiffPath's densities (a GMM grid with 50 or 100 components for 6D, a KDE with bandwidth 5 on raw values for 1D)
are replaced by ``families.density.FeatureDensity`` (chosen by cross-validation on standardised features).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_ood.errors import UserError
from ddpm_ood.families.base import (
    NUM_TRAIN_TIMESTEPS,
    CallGroup,
    EpsFn,
    ScoreContext,
    ScoreFamily,
    ScoreOptions,
    check_batch,
    per_image,
)

DIFFPATH6D = "diffpath6d"
DIFFPATH1D = "diffpath1d"
COLUMNS_6D = ["eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb"]
COLUMNS_1D = ["deps_dt_sq_sqrt"]


def diffpath_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """improved-diffusion's ``space_timesteps(T, f"ddim{steps}")``, ascending: 0, s, ..., (steps - 1) s with s the
    smallest integer stride giving exactly ``steps`` timesteps (0, 100, ..., 900 for 10 of 1000)."""
    for stride in range(1, num_train_timesteps):
        if len(range(0, num_train_timesteps, stride)) == steps:
            return list(range(0, num_train_timesteps, stride))
    possible = sorted({len(range(0, num_train_timesteps, s)) for s in range(1, num_train_timesteps)})
    nearby = [n for n in possible if abs(n - steps) <= max(2, steps // 10)] or possible[:10]
    raise UserError(f"cannot take exactly {steps} DiffPath steps of {num_train_timesteps} with an integer stride "
                    f"(improved-diffusion's ddim spacing); nearby step counts that work: {nearby}")


@dataclass(frozen=True)
class DiffPathSettings:
    """DiffPath's settings: K inversion steps (>= 2: the rate-of-change statistics need two), and the (low, high)
    its x0 predictions are clipped to, or None (module docstring)."""

    steps: int = 10
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 2 <= int(self.steps) <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"DiffPath steps must be between 2 and {NUM_TRAIN_TIMESTEPS}, got {self.steps}")
        object.__setattr__(self, "steps", int(self.steps))
        if self.clip is not None:
            low, high = (float(v) for v in self.clip)
            if not low < high:
                raise UserError(f"DiffPath's clip must be (low, high) with low < high, got {self.clip}")
            object.__setattr__(self, "clip", (low, high))


def diffpath_settings(options: ScoreOptions, context: ScoreContext) -> DiffPathSettings:
    """K from the options; the clip to the model's data range when asked for (none where the model has no range)."""
    clip = context.data_range if options.diffpath_clip else None
    return DiffPathSettings(steps=options.diffpath_steps, clip=clip)


def ddim_inversion_steps(eps_fn: EpsFn, x0: torch.Tensor, acp: torch.Tensor, timesteps: Sequence[int],
                         clip: tuple[float, float] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (eps_k, x_{k+1}) for k = 0..K-1 of the deterministic DDIM inversion of ``x0`` (module docstring).

    x0: (B, C, *spatial) float32, the state at timesteps[0]; acp: (1000,) alphas_cumprod; timesteps: ascending
    t_0..t_{K-1}; the step after the last goes to abar = 0. One eps_fn call of B samples per step. The coefficients
    are computed in float64 and applied in x0's dtype.
    """
    abars = [float(acp[t]) for t in timesteps] + [0.0]
    x = x0
    batch = x0.shape[0]
    for k, t in enumerate(timesteps):
        abar, abar_next = abars[k], abars[k + 1]
        eps = eps_fn(x, torch.full((batch,), int(t), dtype=torch.long, device=x0.device))
        recip, recipm1 = (1.0 / abar) ** 0.5, (1.0 / abar - 1.0) ** 0.5
        x0_pred = recip * x - recipm1 * eps
        if clip is not None:
            x0_pred = x0_pred.clamp(*clip)
            eps = (recip * x - x0_pred) / recipm1
        x = abar_next**0.5 * x0_pred + (1.0 - abar_next) ** 0.5 * eps
        yield eps, x


def ddim_inversion(eps_fn: EpsFn, x0: torch.Tensor, acp: torch.Tensor, timesteps: Sequence[int],
                   clip: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole inversion held in memory: eps (K, B, ...) and the path x (K + 1, B, ...), x[0] = x0, x[k + 1] the
    state at t_{k+1} (at abar = 0 for k = K - 1). For inspection and tests; the features stream the steps."""
    eps, path = [], [x0]
    with torch.no_grad():
        for e, x in ddim_inversion_steps(eps_fn, x0, acp, timesteps, clip):
            eps.append(e)
            path.append(x)
    return torch.stack(eps), torch.stack(path)


def diffpath_features(eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                      settings: DiffPathSettings) -> dict[str, np.ndarray]:
    """{"diffpath6d": (B, 6), "diffpath1d": (B, 1)} float64 from one K-step inversion (module docstring).

    ``keys`` are not used (the inversion draws no noise); they are taken for the common family signature.
    """
    check_batch(x0, keys)
    steps = settings.steps
    timesteps = diffpath_timesteps(steps, len(acp))
    sums = torch.zeros((6, x0.shape[0]), dtype=torch.float64, device=x0.device)
    previous = None
    with torch.no_grad():
        for eps, _ in ddim_inversion_steps(eps_fn, x0, acp, timesteps, settings.clip):
            e = per_image(eps)
            sums[0:3] += torch.stack([e.sum(1), e.square().sum(1), e.pow(3).sum(1)])
            if previous is not None:
                d = (e - previous) * steps
                sums[3:6] += torch.stack([d.sum(1), d.square().sum(1), d.pow(3).sum(1)])
            previous = e
    six = sums.T.cpu().numpy()
    return {DIFFPATH6D: six, DIFFPATH1D: np.sqrt(six[:, 4:5])}


DIFFPATH_GROUP = CallGroup("diffpath", nfe=lambda settings: settings.steps, run=diffpath_features)

DIFFPATH6D_FAMILY = ScoreFamily(
    DIFFPATH6D, "DiffPath-6D: sums of eps, eps^2, eps^3 and of their rates of change along the DDIM inversion",
    DiffPathSettings, diffpath_settings, lambda settings: list(COLUMNS_6D), DIFFPATH_GROUP)
# diffpath1d is one column of diffpath6d (the root of its deps_dt_sq): in the ensemble it would count DiffPath twice.
DIFFPATH1D_FAMILY = ScoreFamily(
    DIFFPATH1D, "DiffPath-1D: root of the summed squared rate of change of eps along the DDIM inversion",
    DiffPathSettings, diffpath_settings, lambda settings: list(COLUMNS_1D), DIFFPATH_GROUP, in_ensemble=False)
