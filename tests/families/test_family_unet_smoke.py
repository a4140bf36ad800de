"""The families with the real wrapper: a tiny random-weight UNet behind ``model_eps_fn`` (project imports here only)."""

from __future__ import annotations

import numpy as np
import torch
from tiny_run import FLOAT_ROUNDING, TINY_MODEL, TINY_SCHEDULE

from ddpm_ood.diffusion.eps import model_eps_fn
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.unet import build_unet, randomize_zero_init_convs
from ddpm_ood.families import (
    ScoreContext,
    ScoreOptions,
    compute_features,
    feature_family_names,
    make_settings,
)


def test_all_families_with_a_tiny_unet(one_thread):
    torch.manual_seed(0)
    model = randomize_zero_init_convs(build_unet(TINY_MODEL)).eval()
    eps_fn = model_eps_fn(model, TINY_SCHEDULE, max_batch=2)
    acp = alphas_cumprod(TINY_SCHEDULE)
    x0 = torch.rand((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    keys = ["a", "b", "c"]
    names = list(feature_family_names())
    settings = make_settings(names, ScoreOptions(score_levels=(50, 500, 950), diffpath_steps=4), ScoreContext(acp=acp))
    together = compute_features(names, eps_fn, x0, keys, acp, settings)
    alone = compute_features(names, eps_fn, x0[1:2], keys[1:2], acp, settings)
    n, k = x0[0].numel(), settings["diffpath6d"].steps
    for name in names:
        assert np.isfinite(together[name]).all()
        # The network's kernels round differently for other batch sizes (relative FLOAT_ROUNDING per element), so
        # a feature may move by FLOAT_ROUNDING times the size of its summands: its own size for the sums of even
        # powers, and for DiffPath's signed sums the bounds sum|e| <= sqrt(count * sum e^2), sum|e|^3 <= (sum e^2)^1.5.
        scale = np.abs(together[name][1])
        if name == "diffpath6d":
            s2, d2 = together[name][1, 1], together[name][1, 4]
            scale = np.array([np.sqrt(n * k * s2), s2, s2**1.5, np.sqrt(n * (k - 1) * d2), d2, d2**1.5])
        assert (np.abs(alone[name][0] - together[name][1]) <= FLOAT_ROUNDING * scale).all(), name
