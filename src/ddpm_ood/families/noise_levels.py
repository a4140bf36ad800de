"""Features at fixed noise levels: ``eps_norm`` (MSMA-style) and ``denoising_error``, sharing their network calls.

For each level t_l of ``settings.levels`` (l = 1..L) and each image b::

    n      = the row noise of (settings.seed, keys[b], t_l)   (diffusion.noise.row_noise_batch, Gaussian or simplex)
    x_t    = sqrt(a_t) x0 + sqrt(1 - a_t) n                     (a_t = alphas_cumprod[t_l])
    e      = eps_fn(x_t, t_l)
    eps_norm[b, l]        = || e ||_2                  over all non-batch elements (channels and space)
    denoising_error[b, l] = mean over elements of (e - n)^2

``eps_norm`` follows the per-scale score norms of Mahmood et al., "Multiscale Score Matching for
Out-of-Distribution Detection" (MSMA, ICLR 2021): an L-vector of L2 norms of the model's score at L noise scales,
to which a density is fitted on in-distribution data. Two differences, both forced by the model: the DDPM's noise
estimate eps stands in for the score (score = -eps / sqrt(1 - a_t), a factor that is the same for every image, so
it changes no density fitted on standardised columns); and MSMA evaluates its (variance-exploding) NCSN at the
unperturbed input, whereas a variance-preserving DDPM only ever saw inputs scaled by sqrt(a_t) and mixed with
noise at t, so the input here is the forward-process sample x_t.
``denoising_error`` is the DDPM training loss of the image at t_l (the same noised inputs, so no extra calls).

One eps_fn call per level for the whole batch: nfe = L, shared by both families. The row noise for (key, t) is
the same row the reconstruction engine uses as its start noise at start point t (the same seed derivation), so at
a level that is also a start point both methods see the same x_t. Reductions are in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ddpm_ood.diffusion.noise import row_noise_batch
from ddpm_ood.families.base import CallGroup, EpsFn, FamilySettings, check_batch, per_image

EPS_NORM = "eps_norm"
DENOISING_ERROR = "denoising_error"


def level_columns(prefix: str, settings: FamilySettings) -> list[str]:
    """Column names ``<prefix>_t<t>`` for every level, in the levels' order."""
    return [f"{prefix}_t{t}" for t in settings.levels]


def noise_level_features(eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                         settings: FamilySettings) -> dict[str, np.ndarray]:
    """{"eps_norm": (B, L), "denoising_error": (B, L)} float64 for the B images ``x0`` (module docstring).

    x0: (B, C, *spatial) float32 in model space; keys: B noise keys; acp: (1000,) alphas_cumprod. L eps_fn calls
    of B samples each.
    """
    check_batch(x0, keys)
    batch, levels = x0.shape[0], settings.levels
    acp = acp.to(device=x0.device, dtype=torch.float32)
    norms = np.empty((batch, len(levels)), dtype=np.float64)
    errors = np.empty((batch, len(levels)), dtype=np.float64)
    with torch.no_grad():
        for i, t in enumerate(levels):
            # one level's noise at a time (the same rows as all at once: each row is seeded on its own)
            n = row_noise_batch(settings.noise_type, settings.seed, keys, [t], x0.shape[1:], x0.device)[0]
            n = n.to(x0.device)
            a_t = acp[t]
            x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * n
            e = per_image(eps_fn(x_t, torch.full((batch,), t, dtype=torch.long, device=x0.device)))
            norms[:, i] = e.square().sum(dim=1).sqrt().cpu().numpy()
            errors[:, i] = (e - per_image(n)).square().mean(dim=1).cpu().numpy()
    return {EPS_NORM: norms, DENOISING_ERROR: errors}


NOISE_LEVEL_GROUP = CallGroup("noise_levels", nfe=lambda settings: len(settings.levels), run=noise_level_features)
