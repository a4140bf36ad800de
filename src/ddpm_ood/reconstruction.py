"""The reconstruction engine: noise each image to every start t, denoise with PLMS, return the reconstructions.

Two paths with the same numbers:
- ``reconstruct_reference``: the plain loop, one start point after another, MONAI's ``PNDMScheduler`` driven with the
  repeated second timestep (upstream's algorithm with the PLMS history reset per start point). Kept as the oracle.
- ``reconstruct_batched`` (default): every (image, start t) trajectory of a batch advances together, one network call
  per tick on the stacked trajectories with per-sample timesteps, each trajectory with its own PLMS history and
  warm-up (plms.py). B images x S start points cost max(calls per trajectory) network calls of up to S*B samples
  instead of sum(calls) calls of B samples; the stack is chunked to ``max_batch`` samples per call.

Conventions: images (B, C, *spatial) in [0, 1]; reconstructions (S, B, C, *spatial) in [0, 1], S = len(start_ts) in
the order given; t indexes the 1000-step training schedule. The noise of (image, t) comes from a generator seeded from
(seed, absolute image path, t), so no number depends on batch size, order, resuming or the number of processes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from ddpm_ood import plms
from ddpm_ood.config import ScheduleConfig
from ddpm_ood.errors import UserError
from ddpm_ood.noise_schedule import alphas_cumprod, make_pndm_scheduler, to_epsilon
from ddpm_ood.start_timesteps import denoising_timesteps

# eps_fn(x_t: (N, C, *spatial) float32, t: (N,) long) -> noise estimate (N, C, *spatial) float32
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def row_seed(seed: int, path: str, t: int) -> int:
    """A 63-bit generator seed for the noise of one (image, t) row."""
    key = f"{seed}|{os.path.abspath(path)}|{int(t)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def row_noise(seed: int, path: str, t: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (shape) for one (image, t), drawn on the CPU so every device gets the same numbers."""
    generator = torch.Generator().manual_seed(row_seed(seed, path, t))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_batch(seed: int, paths: Sequence[str], start_ts: Sequence[int], image_shape: Sequence[int]) -> torch.Tensor:
    """(S, B, *image_shape) noise, row (s, b) seeded from (seed, paths[b], start_ts[s])."""
    return torch.stack(
        [torch.stack([row_noise(seed, p, t, image_shape) for p in paths]) for t in start_ts]
    )


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


def trajectory_timesteps(
    start_t: int, num_inference_steps: int, recon_steps: int | None = None, num_train_timesteps: int = 1000
) -> list[int]:
    """Descending timesteps one trajectory visits: the full grid from ``start_t`` down to the smallest grid point,
    or, with ``recon_steps`` = N, at most N of them spread evenly (start and end always kept)."""
    full = denoising_timesteps(start_t, num_inference_steps, num_train_timesteps)
    if recon_steps is None or len(full) <= recon_steps:
        return full
    if recon_steps < 1:
        raise UserError(f"--recon_steps must be >= 1, got {recon_steps}")
    keep = np.unique(np.linspace(0, len(full) - 1, recon_steps).round().astype(int))
    return [full[i] for i in keep]


def _noised(x0: torch.Tensor, noise: torch.Tensor, a_t: torch.Tensor, b_scale: float) -> torch.Tensor:
    """x_t = sqrt(a_t) * (b_scale x0) + sqrt(1 - a_t) * noise, as MONAI's add_noise computes it."""
    return a_t**0.5 * (x0 * b_scale) + (1 - a_t) ** 0.5 * noise


def _to_image(x: torch.Tensor, b_scale: float) -> torch.Tensor:
    return (x / b_scale).clamp(0.0, 1.0)


def reconstruct_reference(
    eps_fn: EpsFn,
    schedule: ScheduleConfig,
    images: torch.Tensor,
    paths: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
) -> torch.Tensor:
    """One start point after another with a fresh MONAI PNDMScheduler each (history reset). -> (S, B, ...)."""
    noise = noise_batch(seed, paths, start_ts, images.shape[1:]).to(images.device)
    recons = []
    for s, start_t in enumerate(start_ts):
        scheduler = make_pndm_scheduler(schedule, num_inference_steps)
        grid = denoising_timesteps(start_t, num_inference_steps, schedule.num_train_timesteps)
        # MONAI's PNDM omits the repeated second timestep of PLMS without PRK steps; drive it with t0, t1, t1, t2, ...
        calls = grid[:1] + [t for t in grid[1:2] for _ in range(2)] + grid[2:]
        t_tensor = torch.full((images.shape[0],), start_t, dtype=torch.long, device=images.device)
        x = scheduler.add_noise(images * schedule.b_scale, noise[s], t_tensor)
        for t in calls:
            eps = eps_fn(x, torch.full_like(t_tensor, t))
            x, _ = scheduler.step(eps, t, x)
        recons.append(_to_image(x, schedule.b_scale))
    return torch.stack(recons)


def reconstruct_batched(
    eps_fn: EpsFn,
    schedule: ScheduleConfig,
    images: torch.Tensor,
    paths: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
    recon_steps: int | None = None,
) -> torch.Tensor:
    """All (start t, image) trajectories advance together, one eps_fn call per tick. -> (S, B, ...)."""
    device = images.device
    n_starts, batch = len(start_ts), images.shape[0]
    n = n_starts * batch
    acp = alphas_cumprod(schedule).to(device)
    one = torch.ones((), device=device)

    grids = [
        trajectory_timesteps(t, num_inference_steps, recon_steps, schedule.num_train_timesteps) for t in start_ts
    ]
    # Per trajectory (s-major, then image): padded timestep table, -1 past the end (alpha 1 = clean image).
    length = max(len(g) for g in grids)
    table = torch.full((n_starts, length + 1), -1, dtype=torch.long)
    for s, g in enumerate(grids):
        table[s, : len(g)] = torch.tensor(g)
    table = table.repeat_interleave(batch, dim=0).to(device)  # (N, length + 1)
    steps = torch.tensor([len(g) for g in grids]).repeat_interleave(batch).to(device)  # (N,)
    # Calls per trajectory: one per timestep, plus the warm-up's repeated second timestep.
    total_calls = torch.where(steps > 1, steps + 1, steps)

    def alpha(t_idx: torch.Tensor) -> torch.Tensor:
        return torch.where(t_idx >= 0, acp[t_idx.clamp(min=0)], one)

    spatial = (1,) * (images.ndim - 1)
    noise = noise_batch(seed, paths, start_ts, images.shape[1:]).to(device).reshape((n,) + images.shape[1:])
    x0 = images.repeat(n_starts, *([1] * (images.ndim - 1)))
    x = _noised(x0, noise, alpha(table[:, 0]).reshape((-1,) + spatial), schedule.b_scale)
    history = torch.zeros((n, plms.HISTORY) + images.shape[1:], device=device)
    n_history = torch.zeros(n, dtype=torch.long, device=device)
    first_sample = torch.zeros_like(x)

    for call in range(int(total_calls.max())):
        active = (total_calls > call).nonzero().squeeze(1)
        # Position on the trajectory's grid: calls 0, 1, 2, 3, ... evaluate grid points 0, 1, 1, 2, ...
        pos = torch.full_like(active, max(call - 1, 0)) if call >= 2 else torch.full_like(active, call)
        t_now = table[active, pos]
        eps = eps_fn(x[active], t_now)
        if call == 0:
            # Euler step from the start; remember where it started for the correction.
            first_sample[active] = x[active]
            history[active, 0] = eps
            n_history[active] = 1
            a_t, a_prev = alpha(t_now), alpha(table[active, 1])
            x[active] = plms.prev_sample(x[active], eps, a_t.reshape((-1,) + spatial), a_prev.reshape((-1,) + spatial))
        elif call == 1:
            # Correction: redo the first step with the mean of the two noise estimates (history not extended).
            a_t, a_prev = alpha(table[active, 0]), alpha(t_now)
            eps_mean = (eps + history[active, 0]) / 2
            x[active] = plms.prev_sample(
                first_sample[active], eps_mean, a_t.reshape((-1,) + spatial), a_prev.reshape((-1,) + spatial)
            )
        else:
            h = history[active]
            history[active] = torch.cat([eps.unsqueeze(1), h[:, :-1]], dim=1)
            n_history[active] = (n_history[active] + 1).clamp(max=plms.HISTORY)
            eps_ms = plms.multistep_eps(history[active], n_history[active])
            a_t, a_prev = alpha(t_now), alpha(table[active, pos + 1])
            x[active] = plms.prev_sample(
                x[active], eps_ms, a_t.reshape((-1,) + spatial), a_prev.reshape((-1,) + spatial)
            )
    return _to_image(x, schedule.b_scale).reshape((n_starts, batch) + images.shape[1:])
