"""Features at fixed noise levels: ``eps_norm`` and ``denoising_error``, sharing their network calls.

For each level t_l of ``settings.levels`` (l = 1..L), each image b and each draw m = 0..M-1::

    n      = the noise of level t_l: "shared" (default): one draw per (seed, t_l, m), the same for every image;
             "per_image": the row noise of (seed, keys[b], t_l)       (diffusion.noise.row_noise_batch)
    x_t    = sqrt(a_t) x0 + sqrt(1 - a_t) n                         (a_t = alphas_cumprod[t_l])
    e      = eps_fn(x_t, t_l)
    eps_norm[b, l]        = mean over m of || e ||_2          over all non-batch elements (channels and space)
    denoising_error[b, l] = mean over m of the mean over elements of (e - n)^2

Why shared noise: with a fresh draw per image the norm of the predicted noise is dominated by the norm of the
image's own draw (||n|| = 28 +- 0.7 for 784 pixels), which is independent of the image, so ``eps_norm`` carries no
signal and ``denoising_error`` loses most of its. One draw per level shared by every image (common random numbers)
makes each feature a deterministic function of the image: differences between images come from the images alone,
and the same image gets the same feature whatever else is scored. The draw is part of the settings (seed, M).

``eps_norm`` is the shared-noise variant of a per-level noise-estimate norm; MSMA as published (Mahmood et al.,
ICLR 2021), which evaluates the score at the clean input, is ``families.msma``. ``denoising_error`` is the DDPM
training loss of the image at t_l. One eps_fn call per level and draw for the whole batch: nfe = L x M, shared by
both families. Under "per_image" the row noise of (key, t) is the same row the reconstruction engine uses as its
start noise at start point t. Reductions are in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_ood.config import check_noise_type
from ddpm_ood.diffusion.noise import row_noise_batch
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
from ddpm_ood.seeding import DEFAULT_SEED, NOISE_PROTOCOLS, protocol_keys

EPS_NORM = "eps_norm"
DENOISING_ERROR = "denoising_error"


@dataclass(frozen=True)
class NoiseLevelSettings:
    """The settings of ``eps_norm`` and ``denoising_error`` (module docstring): levels t_1..t_L, the noise protocol
    (``seeding.NOISE_PROTOCOLS``) with its number of draws M, the seed and the noise type of the draws."""

    levels: tuple[int, ...]
    noise: str = "shared"
    draws: int = 1
    seed: int = DEFAULT_SEED
    noise_type: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", check_levels(self.levels, "score levels"))
        if self.noise not in NOISE_PROTOCOLS:
            raise UserError(f"unknown noise protocol {self.noise!r}; accepted: {', '.join(NOISE_PROTOCOLS)}")
        if int(self.draws) < 1 or (self.noise == "per_image" and int(self.draws) != 1):
            raise UserError(f"noise draws must be >= 1 (exactly 1 for per-image noise), got {self.draws}")
        object.__setattr__(self, "draws", int(self.draws))
        object.__setattr__(self, "seed", int(self.seed))
        check_noise_type(self.noise_type)


def noise_level_settings(options: ScoreOptions, context: ScoreContext) -> NoiseLevelSettings:
    return NoiseLevelSettings(levels=options.score_levels, noise=options.score_noise, draws=options.score_noise_draws,
                              seed=context.seed, noise_type=context.noise_type)


def level_columns(prefix: str, settings: NoiseLevelSettings) -> list[str]:
    """Column names ``<prefix>_t<t>`` for every level, in the levels' order."""
    return [f"{prefix}_t{t}" for t in settings.levels]


def level_noise(settings: NoiseLevelSettings, keys: Sequence[str], t: int, draw: int,
                sample_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, *sample_shape) noise of level ``t`` and draw ``draw`` for the images keyed ``keys``: one row per image
    (per_image), or one shared row repeated (shared: drawn once, so the images get the very same numbers)."""
    draw_keys = protocol_keys(keys, settings.noise, draw)
    if settings.noise == "shared":
        row = row_noise_batch(settings.noise_type, settings.seed, draw_keys[:1], [t], sample_shape, device)[0]
        return row.to(device).expand(len(keys), *row.shape[1:])
    return row_noise_batch(settings.noise_type, settings.seed, draw_keys, [t], sample_shape, device)[0].to(device)


def noise_level_features(eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                         settings: NoiseLevelSettings) -> dict[str, np.ndarray]:
    """{"eps_norm": (B, L), "denoising_error": (B, L)} float64 for the B images ``x0`` (module docstring).

    x0: (B, C, *spatial) float32 in model space; keys: B noise keys; acp: (1000,) alphas_cumprod. L x M eps_fn
    calls of B samples each.
    """
    check_batch(x0, keys)
    batch, levels = x0.shape[0], settings.levels
    acp = acp.to(device=x0.device, dtype=torch.float32)
    norms = np.zeros((batch, len(levels)), dtype=np.float64)
    errors = np.zeros((batch, len(levels)), dtype=np.float64)
    with torch.no_grad():
        for i, t in enumerate(levels):
            for draw in range(settings.draws):
                n = level_noise(settings, keys, t, draw, x0.shape[1:], x0.device)
                a_t = acp[t]
                x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * n
                e = per_image(eps_fn(x_t, torch.full((batch,), t, dtype=torch.long, device=x0.device)))
                norms[:, i] += e.square().sum(dim=1).sqrt().cpu().numpy()
                errors[:, i] += (e - per_image(n)).square().mean(dim=1).cpu().numpy()
    if settings.draws > 1:
        norms /= settings.draws
        errors /= settings.draws
    return {EPS_NORM: norms, DENOISING_ERROR: errors}


NOISE_LEVEL_GROUP = CallGroup("noise_levels", nfe=lambda settings: len(settings.levels) * settings.draws,
                              run=noise_level_features)

EPS_NORM_FAMILY = ScoreFamily(
    EPS_NORM, "L2 norm of the predicted noise at noised inputs, one per level", NoiseLevelSettings,
    noise_level_settings, lambda settings: level_columns(EPS_NORM, settings), NOISE_LEVEL_GROUP)
DENOISING_ERROR_FAMILY = ScoreFamily(
    DENOISING_ERROR, "mean squared error of the predicted noise at each level", NoiseLevelSettings,
    noise_level_settings, lambda settings: level_columns(DENOISING_ERROR, settings), NOISE_LEVEL_GROUP)
