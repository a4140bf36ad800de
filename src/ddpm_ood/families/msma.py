"""MSMA as published: norms of the score at the CLEAN input, at noise scales from 1 down to 0.01 (``msma``).

Mahmood, Lopez & Fairbanks, "Multiscale Score Matching for Out-of-Distribution Detection" (ICLR 2021): a noise
conditional score network s(x, sigma) is evaluated at the unperturbed input x for L scales sigma_1 > ... > sigma_L
(geometric, from sigma_high = 1 down to sigma_low = 0.01, in units of images in [0, 1]), and the L-vector of
L2 norms ||s(x, sigma_l)|| is the image's feature; a density fitted on in-distribution features scores it.

On a variance-preserving DDPM, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n is the variance-exploding x0 + sigma_t n scaled
by sqrt(a_t), with sigma_t = sqrt((1 - a_t) / a_t) in model-space units. So scale sigma (image units) is the
level t whose sigma_t / data_scale is nearest to sigma in log scale (``msma_levels``; ``ScoreContext.data_scale``:
b_scale in pixel space, 2 for models of [-1, 1] data, 1 for VQ-VAE latents, whose scales are then in latent
units). Levels that several scales map to are merged (each t is evaluated once), so a schedule that starts above
sigma 0.01 gives fewer levels than scales: the quickstart's (scaled_linear, beta 0.0015..0.0195, sigma_0 = 0.039)
maps the 10 scales to 8 levels,
0, 1, 3, 10, 27, 67, 143, 254: the three smallest all to t = 0. The clean input at level t is sqrt(a_t) x0, where the model's score is
-eps(sqrt(a_t) x0, t) / sqrt(1 - a_t). MSMA's statistic is the sigma-weighted norm || sigma s_VE(x0, sigma) ||
(its code: ``model([x, sigma_idx]) * sigma``, then the L2 norm over all pixels and channels), and with
s_VE(x0, sigma_t) = sqrt(a_t) s_VP(sqrt(a_t) x0) that is exactly::

    msma[b, l] = || eps(sqrt(a_{t_l}) x0_b, t_l) ||_2        over all non-batch elements

in model-space units. No noise is drawn: nfe = the number of distinct levels. Reductions in float64. MSMA fits a
cross-validated Gaussian mixture (and a flow, and a KD-tree) to these norms; here the family's density is the
project's cross-validated mixture (``families.density``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_ood.errors import UserError
from ddpm_ood.families.base import (
    CallGroup,
    EpsFn,
    ScoreContext,
    ScoreFamily,
    ScoreOptions,
    check_batch,
    check_levels,
    per_image,
)

MSMA = "msma"
# MSMA's scales: geometric from SIGMA_HIGH down to SIGMA_LOW (NCSN's CIFAR-10 sigmas, which MSMA uses), images in [0, 1].
SIGMA_HIGH = 1.0
SIGMA_LOW = 0.01
NUM_SCALES = 10


def msma_sigmas(num_scales: int = NUM_SCALES, high: float = SIGMA_HIGH, low: float = SIGMA_LOW) -> tuple[float, ...]:
    """The ``num_scales`` geometric scales from ``high`` down to ``low`` (both included)."""
    if num_scales < 2 or not 0 < low < high:
        raise UserError(f"MSMA scales: need at least 2 scales and 0 < low < high, got {num_scales}, {low}, {high}")
    return tuple(float(v) for v in np.geomspace(high, low, num_scales))


def level_sigmas(acp: torch.Tensor, data_scale: float) -> np.ndarray:
    """(T,) sigma_t / data_scale = sqrt((1 - a_t) / a_t) / data_scale: each level's variance-exploding noise scale
    in image units."""
    a = acp.double().cpu().numpy()
    return np.sqrt((1.0 - a) / a) / float(data_scale)


def msma_levels(sigmas: Sequence[float], acp: torch.Tensor, data_scale: float) -> tuple[int, ...]:
    """The levels t nearest (in log sigma) to each scale, ascending, repeats merged (module docstring)."""
    log_level = np.log(level_sigmas(acp, data_scale))
    levels = {int(np.argmin(np.abs(log_level - math.log(s)))) for s in sigmas}
    return tuple(sorted(levels))


@dataclass(frozen=True)
class MSMASettings:
    """MSMA's scales (image units, descending), the data scale they were converted with, and the levels t they map
    to (ascending, distinct: the feature's columns)."""

    sigmas: tuple[float, ...]
    data_scale: float
    levels: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "data_scale", float(self.data_scale))
        object.__setattr__(self, "levels", check_levels(self.levels, "MSMA levels"))


def msma_settings(options: ScoreOptions, context: ScoreContext) -> MSMASettings:
    if context.acp is None:
        raise ValueError("MSMA needs the model's alphas_cumprod to place its scales")
    sigmas = msma_sigmas()
    return MSMASettings(sigmas, context.data_scale, msma_levels(sigmas, context.acp, context.data_scale))


def msma_columns(settings: MSMASettings) -> list[str]:
    return [f"{MSMA}_t{t}" for t in settings.levels]


def msma_features(eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                  settings: MSMASettings) -> dict[str, np.ndarray]:
    """{"msma": (B, L)} float64: ||eps(sqrt(a_t) x0, t)|| at every level (module docstring). ``keys`` are not used
    (nothing is drawn). One eps_fn call of B samples per level."""
    check_batch(x0, keys)
    acp = acp.to(device=x0.device, dtype=torch.float32)
    norms = np.empty((x0.shape[0], len(settings.levels)), dtype=np.float64)
    with torch.no_grad():
        for i, t in enumerate(settings.levels):
            x_t = acp[t].sqrt() * x0
            e = per_image(eps_fn(x_t, torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)))
            norms[:, i] = e.square().sum(dim=1).sqrt().cpu().numpy()
    return {MSMA: norms}


MSMA_GROUP = CallGroup(MSMA, nfe=lambda settings: len(settings.levels), run=msma_features)
MSMA_FAMILY = ScoreFamily(
    MSMA, "MSMA (Mahmood et al. 2021): norm of the score at the clean input, scales 1 down to 0.01", MSMASettings,
    msma_settings, msma_columns, MSMA_GROUP)
