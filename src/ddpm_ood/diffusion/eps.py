"""A trained network as the noise estimate eps(x_t, t): the function every sampler, inversion and score family
calls, whatever the network predicts (``prediction_type``) and however it is chunked or autocast.

``t`` indexes the 1000-step training schedule; samples are in model space (``autoencoder``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.schedule import alphas_cumprod, to_epsilon

# eps_fn(x_t: (N, C, *spatial) float32, t: (N,) long) -> noise estimate (N, C, *spatial) float32
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_eps_fn(
    model: torch.nn.Module,
    schedule: ScheduleConfig,
    *,
    max_batch: int | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> EpsFn:
    """Wrap a UNet as an EpsFn: chunked to ``max_batch`` samples, optional autocast, output converted to eps (fp32)."""
    acp = alphas_cumprod(schedule)
    autocast = autocast or nullcontext

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        chunk = max_batch or x.shape[0]
        outs = []
        for i in range(0, x.shape[0], chunk):
            xs, ts = x[i : i + chunk], t[i : i + chunk]
            with torch.inference_mode(), autocast():
                out = model(xs, timesteps=ts)
            out = out.float()
            alpha = acp.to(x.device)[ts].reshape((-1,) + (1,) * (x.ndim - 1))
            outs.append(to_epsilon(out, xs, alpha, schedule.prediction_type))
        return torch.cat(outs)

    return eps_fn
