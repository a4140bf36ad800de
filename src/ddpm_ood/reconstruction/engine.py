"""The reconstruction engine: noise each sample to every start t, denoise with PLMS, return the denoised samples.

Two paths with the same numbers:
- ``reconstruct_reference``: the plain loop, one start point after another, MONAI's ``PNDMScheduler`` driven with the
  repeated second timestep (upstream's algorithm with the PLMS history reset per start point). Kept as the oracle.
- ``reconstruct_batched`` (default): the (image, start t) trajectories of a batch share network calls (ticks) with
  per-sample timesteps, each trajectory with its own PLMS history and warm-up (plms.py). B images x S start points
  cost max(calls per trajectory) network calls of about sum(calls)/max(calls) samples each (balanced ticks) instead
  of sum(calls) calls of B samples; ``model_eps_fn`` chunks a call to ``max_batch`` samples.

Conventions: the engine works in model space (``autoencoder``): inputs ``x0`` (B, C, *spatial) are encoded samples
(pixel space: images in [0, 1] times b_scale), outputs (S, B, C, *spatial) are denoised samples, NOT clamped, S =
len(start_ts) in the order given; ``pipeline.py`` decodes and clamps. t indexes the 1000-step training schedule. The
noise of (image, t), Gaussian or simplex (``diffusion.noise``), is seeded from (seed, the image's noise key, t) (``seeding``), so the noise does not depend on batch size, order, resuming or the number of
processes, and, a file's key being its stem (``noise_key``), not on where the data sits either. Batch composition
still moves results by float rounding: the network's kernels round differently for other batch sizes (about 1e-6 in
fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion import plms
from ddpm_ood.diffusion.eps import EpsFn
from ddpm_ood.diffusion.noise import row_noise_batch
from ddpm_ood.diffusion.schedule import alphas_cumprod, make_pndm_scheduler
from ddpm_ood.diffusion.timesteps import denoising_timesteps
from ddpm_ood.errors import ParameterError
from ddpm_ood.reconstruction.plan import ReconstructionPlan


def trajectory_timesteps(
    start_t: int, num_inference_steps: int, recon_steps: int | None = None, num_train_timesteps: int = 1000
) -> list[int]:
    """Descending timesteps one trajectory visits: the full grid from ``start_t`` down to the smallest grid point,
    or, with ``recon_steps`` = N, at most N of them spread evenly (start and end always kept)."""
    full = denoising_timesteps(start_t, num_inference_steps, num_train_timesteps)
    if recon_steps is None or len(full) <= recon_steps:
        return full
    if recon_steps < 1:
        raise ParameterError(f"recon_steps must be >= 1, got {recon_steps}", "recon_steps")
    keep = np.unique(np.linspace(0, len(full) - 1, recon_steps).round().astype(int))
    return [full[i] for i in keep]


def calls_per_trajectory(timesteps: Sequence[int]) -> int:
    """Network calls to walk ``timesteps``: one per timestep, plus the PLMS warm-up's repeated second timestep."""
    return len(timesteps) + 1 if len(timesteps) > 1 else len(timesteps)


def calls_per_start(
    start_ts: Sequence[int], num_inference_steps: int, recon_steps: int | None = None, num_train_timesteps: int = 1000
) -> list[int]:
    """Network calls of one image's trajectory from each start t, in the order of ``start_ts``."""
    return [
        calls_per_trajectory(trajectory_timesteps(t, num_inference_steps, recon_steps, num_train_timesteps))
        for t in start_ts
    ]


def evaluations_per_image(
    start_ts: Sequence[int], num_inference_steps: int, recon_steps: int | None = None, num_train_timesteps: int = 1000
) -> int:
    """Network evaluations to reconstruct one image from every start t (both engines make exactly these)."""
    return sum(calls_per_start(start_ts, num_inference_steps, recon_steps, num_train_timesteps))


def balanced_tick_size(calls: Sequence[int]) -> int:
    """Trajectories per network call so that ``calls`` (per trajectory) finish in max(calls) ticks: the fewest."""
    return -(-sum(calls) // max(calls))


def _noised(x0: torch.Tensor, noise: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, as MONAI's add_noise computes it."""
    return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise


def reconstruct_reference(
    eps_fn: EpsFn,
    schedule: ScheduleConfig,
    x0: torch.Tensor,
    keys: Sequence[str],
    plan: ReconstructionPlan,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One start point after another with a fresh MONAI PNDMScheduler each (history reset). -> (S, B, ...).
    ``keys``: the images' noise keys (the plan's protocol applied here). ``noise``: the (S, B, ...) start noise if
    already drawn (``diffusion.noise.row_noise_batch``), else drawn here. The plan's ``recon_steps`` must be None."""
    start_ts, num_inference_steps = plan.starts, plan.num_inference_steps
    noise = _start_noise(noise, schedule.noise_type, plan, keys, x0).to(x0.device)
    recons = []
    for s, start_t in enumerate(start_ts):
        scheduler = make_pndm_scheduler(schedule, num_inference_steps)
        grid = denoising_timesteps(start_t, num_inference_steps, schedule.num_train_timesteps)
        # MONAI's PNDM omits the repeated second timestep of PLMS without PRK steps; drive it with t0, t1, t1, t2, ...
        calls = grid[:1] + [t for t in grid[1:2] for _ in range(2)] + grid[2:]
        t_tensor = torch.full((x0.shape[0],), start_t, dtype=torch.long, device=x0.device)
        x = scheduler.add_noise(x0, noise[s], t_tensor)
        for t in calls:
            eps = eps_fn(x, torch.full_like(t_tensor, t))
            x, _ = scheduler.step(eps, t, x)
        recons.append(x)
    return torch.stack(recons)


def reconstruct_batched(
    eps_fn: EpsFn,
    schedule: ScheduleConfig,
    x0: torch.Tensor,
    keys: Sequence[str],
    plan: ReconstructionPlan,
    *,
    balanced: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every (start t, image) trajectory advances in shared network calls (ticks). -> (S, B, ...).

    Each tick advances the trajectories with the most calls left (critical path first: the longest trajectory is
    never held back, so the number of ticks stays at its length) by one call each. ``balanced`` sizes the ticks to
    ceil(all calls / longest trajectory's calls), so every call has about the same number of samples instead of
    S*B at first and a handful at the end: the largest call halves (memory), the speed on a CPU is the same within
    run-to-run noise (benchmarks/README.md); ``balanced=False`` advances every unfinished trajectory at each tick.
    ``keys``: the images' noise keys (the plan's protocol applied here). ``noise``: the (S, B, ...) start noise if
    already drawn (reconstruct.py draws it one batch ahead with ``diffusion.noise.row_noise_batch``, overlapping the
    network), else drawn here. A memory budget (``max_batch``) is the eps_fn's business (``model_eps_fn`` chunks
    each call). Each trajectory's steps and PLMS history are its own, so grouping changes results only by the
    network's float rounding."""
    device = x0.device
    start_ts, num_inference_steps, recon_steps = plan.starts, plan.num_inference_steps, plan.recon_steps
    n_starts, batch = len(start_ts), x0.shape[0]
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
    total_calls = torch.tensor([calls_per_trajectory(g) for g in grids]).repeat_interleave(batch)  # (N,)
    tick_size = balanced_tick_size(total_calls.tolist()) if balanced else n

    spatial = (1,) * (x0.ndim - 1)

    def alpha(t_idx: torch.Tensor) -> torch.Tensor:
        return torch.where(t_idx >= 0, acp[t_idx.clamp(min=0)], one).reshape((-1,) + spatial)

    noise = _start_noise(noise, schedule.noise_type, plan, keys, x0)
    if device.type == "cuda" and noise.device.type == "cpu" and not noise.is_pinned():
        noise = noise.pin_memory()  # copied without a host wait
    noise = noise.to(device, non_blocking=True).reshape((n,) + x0.shape[1:])
    x = _noised(x0.repeat(n_starts, *([1] * (x0.ndim - 1))), noise, alpha(table[:, 0]))
    history = torch.zeros((n, plms.HISTORY) + x0.shape[1:], device=device)
    n_history = torch.zeros(n, dtype=torch.long, device=device)
    first_sample = torch.zeros_like(x)
    plan = _TickPlan(tick_schedule(total_calls.tolist(), tick_size), device)

    for tick in range(plan.n_ticks):
        idx, pos = plan.get("idx", tick), plan.get("pos", tick)
        eps = eps_fn(x[idx], table[idx, pos])
        # Euler step from the start; remember where it started for the correction.
        if plan.has("euler", tick):
            sel, i = plan.get("euler", tick), plan.get("euler_idx", tick)
            first_sample[i] = x[i]
            history[i, 0] = eps[sel]
            n_history[i] = 1
            x[i] = plms.prev_sample(x[i], eps[sel], alpha(table[i, 0]), alpha(table[i, 1]))
        # Correction: redo the first step with the mean of the two noise estimates (history not extended).
        if plan.has("correction", tick):
            sel, i = plan.get("correction", tick), plan.get("correction_idx", tick)
            eps_mean = (eps[sel] + history[i, 0]) / 2
            x[i] = plms.prev_sample(first_sample[i], eps_mean, alpha(table[i, 0]), alpha(table[i, 1]))
        if plan.has("multistep", tick):
            sel, i = plan.get("multistep", tick), plan.get("multistep_idx", tick)
            p = pos[sel]
            history[i] = torch.cat([eps[sel].unsqueeze(1), history[i, :-1]], dim=1)
            n_history[i] = (n_history[i] + 1).clamp(max=plms.HISTORY)
            eps_ms = plms.multistep_eps(history[i], n_history[i])
            x[i] = plms.prev_sample(x[i], eps_ms, alpha(table[i, p]), alpha(table[i, p + 1]))
    return x.reshape((n_starts, batch) + x0.shape[1:])


def _start_noise(noise: torch.Tensor | None, noise_type: str, plan: ReconstructionPlan, keys: Sequence[str],
                 x0: torch.Tensor) -> torch.Tensor:
    """The (S, B, *sample shape) start noise: as given (checked), or drawn (``row_noise_batch``: Gaussian on the
    CPU, the same numbers on every device; simplex on the samples' device) under the plan's protocol."""
    if noise is None:
        return row_noise_batch(noise_type, plan.seed, plan.noise_keys(keys), plan.starts, x0.shape[1:], x0.device)
    want = (len(plan.starts), x0.shape[0], *x0.shape[1:])
    if tuple(noise.shape) != want:
        raise ValueError(f"start noise has shape {tuple(noise.shape)}, the samples need {want}")
    return noise


def tick_schedule(total_calls: Sequence[int], tick_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batched engine's schedule, on the CPU: per network call (tick), (the trajectories it advances (k,) long,
    the calls each of them has made before it (k,) long). Each tick takes the ``tick_size`` trajectories with the
    most calls left (ties in trajectory order: deterministic), so there are max(total_calls) ticks."""
    total = torch.tensor(list(total_calls), dtype=torch.long)
    calls_done = torch.zeros_like(total)
    ticks = []
    while True:
        left = total - calls_done
        active = int((left > 0).sum())
        if active == 0:
            return ticks
        chosen = torch.argsort(-left, stable=True)[: min(tick_size, active)]
        ticks.append((chosen, calls_done[chosen].clone()))
        calls_done[chosen] += 1


class _TickPlan:
    """Every tick's indices, computed once per batch on the CPU and uploaded in one go per kind, so the tick loop
    only slices device tensors: no host synchronisation per tick (boolean masks would need one to count).

    Per tick: ``idx`` (trajectories), ``pos`` (grid position evaluated: 0, 1, 1, 2, ... as the warm-up repeats the
    second timestep) and, per PLMS phase (euler: first call, correction: second, multistep: later), the positions
    within the call (``<phase>``) and the trajectories (``<phase>_idx``)."""

    _PHASES = {"euler": lambda d: d == 0, "correction": lambda d: d == 1, "multistep": lambda d: d >= 2}

    def __init__(self, ticks: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        parts: dict[str, list[torch.Tensor]] = {"idx": [], "pos": []}
        for name in self._PHASES:
            parts[name], parts[f"{name}_idx"] = [], []
        for chosen, done in ticks:
            parts["idx"].append(chosen)
            parts["pos"].append(torch.where(done >= 2, done - 1, done))
            for name, test in self._PHASES.items():
                local = torch.nonzero(test(done)).flatten()
                parts[name].append(local)
                parts[f"{name}_idx"].append(chosen[local])
        self.n_ticks = len(ticks)
        self._offsets = {k: [0, *torch.tensor([len(t) for t in v]).cumsum(0).tolist()] for k, v in parts.items()}
        self._flat = {k: torch.cat(v).to(device) if v else torch.zeros(0, dtype=torch.long, device=device)
                      for k, v in parts.items()}

    def has(self, kind: str, tick: int) -> bool:
        return self._offsets[kind][tick + 1] > self._offsets[kind][tick]

    def get(self, kind: str, tick: int) -> torch.Tensor:
        return self._flat[kind][self._offsets[kind][tick] : self._offsets[kind][tick + 1]]
