"""Stand-in models for the score-family tests: no network, only closed forms (docs/development.md, Tests)."""

from __future__ import annotations

import numpy as np
import torch

# The linear beta schedule of DDPM (beta from 1e-4 to 2e-2 over 1000 steps), the project's default.
BETA_START, BETA_END, STEPS = 1e-4, 2e-2, 1000


def linear_acp() -> torch.Tensor:
    """(1000,) float32 alphas_cumprod of the linear schedule."""
    return torch.from_numpy(np.cumprod(1.0 - np.linspace(BETA_START, BETA_END, STEPS))).float()


def alpha_of(acp: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """alphas_cumprod[t] in float64, shaped to broadcast over (N, C, *spatial)."""
    return acp.double()[t].reshape(-1, *([1] * (ndim - 1)))


def gaussian_eps_fn(acp: torch.Tensor, mu: float, s: float):
    """The exact noise predictor for data N(mu, s^2) per element:
    E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t), evaluated in float64."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_of(acp, t, x.ndim)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * s * s + 1 - a)).float()

    return eps_fn


def wiggly_eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An arbitrary deterministic 'network': nonlinear, mixes neighbouring pixels and channels, depends on t, and
    treats each sample on its own (elementwise ops and rolls within a sample only)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    mixed = 0.7 * x + 0.3 * torch.roll(x, 1, dims=-1) - 0.2 * torch.roll(x, 1, dims=1)
    return torch.tanh(1.3 * mixed + torch.sin(5.0 * tt)) + 0.1 * x * tt


class CallRecorder:
    """Wraps an eps_fn and records (batch size, timesteps) of every call."""

    def __init__(self, eps_fn) -> None:
        self.eps_fn = eps_fn
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        self.calls.append((x.shape[0], t.tolist()))
        return self.eps_fn(x, t)
