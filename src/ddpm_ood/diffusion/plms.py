"""PLMS (pseudo linear multistep, crowsonkb / diffusers ``skip_prk_steps``) for many trajectories at once.

Each trajectory walks the descending grid from its own start t to the clean image. Per trajectory the network is
called at t0, t1, t1, t2, t3, ...: the second call corrects the first Euler step (Heun-like average of two noise
estimates, the history is not extended), the third call starts the multistep update from that same t1. The history
(``ets``) holds the last four noise estimates, newest first. MONAI's ``PNDMScheduler`` driven with that repeated
timestep gives the same numbers; it is the oracle in the tests.

All functions keep trajectories stacked on the first axis; ``a_t``/``a_prev`` are per-trajectory alphas_cumprod
broadcastable to the sample.
"""

from __future__ import annotations

import torch

# Adams-Bashforth coefficients for 1..4 noise estimates, newest first.
_MULTISTEP_COEFFICIENTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
HISTORY = 4


def prev_sample(sample: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """PNDM eq. (9): move ``sample`` from noise level a_t to a_prev given the noise estimate ``eps``.

    Written exactly as MONAI's ``PNDMScheduler._get_prev_sample`` so both agree to float rounding.
    """
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return sample_coeff * sample - (a_prev - a_t) * eps / denom


def multistep_eps(history: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Combine the newest ``n_valid`` (per trajectory, 1..4) noise estimates of ``history`` (N, 4, ...)."""
    coeffs = torch.zeros(n_valid.shape[0], HISTORY, dtype=history.dtype, device=history.device)
    for n, row in enumerate(_MULTISTEP_COEFFICIENTS, start=1):
        mask = n_valid == n
        if mask.any():
            coeffs[mask, :n] = torch.tensor(row, dtype=history.dtype, device=history.device)
    coeffs = coeffs.reshape(coeffs.shape + (1,) * (history.ndim - 2))
    return (coeffs * history).sum(dim=1)
