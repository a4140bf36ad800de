"""What every published-model reader gives the stages: ``PretrainedModel``, a network on the 1000-step grid.

A published diffusion model (diffusers, improved-diffusion, guided-diffusion) is described by the same things as a
ddpm-ood checkpoint: a noise estimate, the schedule, the data range, the shape of one sample. The readers
(``diffusers_format``, ``openai_format``) turn the files on disk into a ``PretrainedModel``; ``runs.py`` opens it
beside our own checkpoints, so no stage asks which format it has.

Conventions:
- The grid: every stage indexes t on a 1000-step schedule. A model trained with T != 1000 steps is *respaced*
  (``grid_steps``): grid step k is the model's step s_k, the grid's alphas_cumprod are the model's at s_k, and
  its betas follow from them (1 - abar_k / abar_{k-1}; a repeated model step, for T < 1000, has beta 0). The
  network is always called with the model's own step s_k (times 1000 / T with ``rescale_timesteps``, as
  improved-diffusion's ``_WrappedModel`` does).
- The output: learned-sigma models output 2C channels; the first C are the prediction (eps, v or x0, by
  ``prediction_type``), which ``diffusion.eps.model_eps_fn`` turns into eps with the grid's alphas_cumprod.
- Untrusted files: weights are read from safetensors, or from ``.pt``/``.bin`` pickles with
  ``torch.load(weights_only=True)`` only (``load_weights``); nothing from a model folder is imported or run.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_ood.config import EXPLICIT_BETAS, NUM_TRAIN_TIMESTEPS, ScheduleConfig
from ddpm_ood.errors import UserError, one_line

# The data range of published pixel models: diffusers' and openai's loaders map images to [-1, 1].
SIGNED_UNIT_RANGE = (-1.0, 1.0)


def grid_steps(model_steps: int, grid: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The model step s_k of each grid step k = 0..grid-1 (ascending) for a model trained with ``model_steps``.

    - ``model_steps`` == grid: s_k = k.
    - a multiple of the grid: s_k = k * model_steps / grid (DiffPath's 10 steps on a 4000-step model are then
      exactly its authors' 0, 400, ..., 3600).
    - more steps otherwise: improved-diffusion's ``space_timesteps(T, [grid])`` rounding (a stride of
      (T - 1) / (grid - 1) accumulated from 0, each rounded to the nearest step, ties to even as Python rounds).
    - fewer steps: s_k = floor(k * T / grid), each model step repeated (its repeats get beta 0 on the grid).
    """
    if model_steps < 1:
        raise UserError(f"a diffusion model needs at least one training step, got {model_steps}")
    if model_steps == grid:
        return list(range(grid))
    if model_steps % grid == 0:
        return [k * (model_steps // grid) for k in range(grid)]
    if model_steps > grid:
        stride = (model_steps - 1) / (grid - 1)
        taken, position = [], 0.0
        for _ in range(grid):
            taken.append(round(position))
            position += stride
        return taken
    return [k * model_steps // grid for k in range(grid)]


def describe_respacing(model_steps: int, grid: int = NUM_TRAIN_TIMESTEPS) -> str | None:
    """One line for the sidecar saying how the model's steps map onto the grid (None when they are the grid)."""
    if model_steps == grid:
        return None
    if model_steps % grid == 0:
        rule = f"grid step k is model step {model_steps // grid}k"
    elif model_steps > grid:
        rule = "improved-diffusion's space_timesteps rounding"
    else:
        rule = "grid step k is model step floor(k * T / 1000), repeats with beta 0"
    return f"{model_steps} -> {grid} steps: {rule}"


def respaced_betas(model_alphas_cumprod: Sequence[float] | np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """(len(steps),) float64 betas of the grid whose alphas_cumprod are the model's at ``steps``:
    beta_k = 1 - abar(s_k) / abar(s_{k-1}), beta_0 = 1 - abar(s_0)."""
    acp = np.asarray(model_alphas_cumprod, dtype=np.float64)[list(steps)]
    previous = np.concatenate([[1.0], acp[:-1]])
    return 1.0 - acp / previous


def grid_schedule(model_betas: Sequence[float] | np.ndarray, prediction_type: str,
                  model_alphas_cumprod: np.ndarray | None = None) -> tuple[ScheduleConfig, list[int]]:
    """The 1000-step grid schedule (``EXPLICIT_BETAS``) of a model with ``model_betas`` (T,), and the model step
    of every grid step. ``model_alphas_cumprod``: the model's own (T,) cumulative products when its code computes
    them differently from float64 ``cumprod(1 - betas)`` (diffusers: float32)."""
    betas = np.asarray(model_betas, dtype=np.float64)
    steps = grid_steps(len(betas))
    if len(betas) == NUM_TRAIN_TIMESTEPS:
        grid = betas  # kept bit for bit: the schedule code derives alphas_cumprod from them as the model's code does
    else:
        acp = model_alphas_cumprod if model_alphas_cumprod is not None else np.cumprod(1.0 - betas)
        grid = respaced_betas(acp, steps)
    schedule = ScheduleConfig(beta_schedule=EXPLICIT_BETAS, beta_start=None, beta_end=None,
                              prediction_type=prediction_type, trained_betas=tuple(float(b) for b in grid))
    return schedule, steps


def cosine_alpha_bar_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021, eq. 17) as betas (float64): alpha_bar(t) =
    cos(((t / T) + 0.008) / 1.008 * pi / 2)^2, beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T),
    max_beta). Both improved-diffusion (``noise_schedule=cosine``) and diffusers (``squaredcos_cap_v2``) use it."""
    def alpha_bar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                    dtype=np.float64)


class GridNetwork(torch.nn.Module):
    """A published network as our stages call it: ``forward(x, timesteps=t)`` with t (N,) long on the 1000-step
    grid -> the model's prediction (N, C, H, W) (its first C output channels). The network sees the model step
    of t (``grid_steps``), times ``time_scale`` when not None (``rescale_timesteps``); ``call(network, x, t)``
    runs the wrapped network (diffusers returns an output object, openai a tensor)."""

    def __init__(self, network: torch.nn.Module, steps: Sequence[int], channels: int,
                 call: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 time_scale: float | None = None) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("steps", torch.tensor(list(steps), dtype=torch.long), persistent=False)
        self.channels = int(channels)
        self.call = call
        self.time_scale = time_scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = self.steps[timesteps.long()]
        t_in = t.float() * self.time_scale if self.time_scale is not None else t
        return self.call(self.network, x, t_in)[:, : self.channels]


@dataclass(frozen=True)
class PretrainedModel:
    """A published diffusion model read from disk, with its network loaded (CPU, eval mode).

    ``format``: ``diffusers``, ``improved-diffusion`` or ``guided-diffusion``. ``path``: what the user gave (a
    folder or a ``.pt``). ``weights_sha256``: hash of the weights file. ``flags``: the settings that define the
    model (openai: every model and diffusion flag, resolved with its codebase's defaults; diffusers: the scheduler
    settings read). ``model_steps``: T the model was trained with; ``respacing``: how T maps onto the grid (None
    for T = 1000). ``image_shape``: (C, H, W) of the images it takes. ``data_range``: (low, high) images in [0, 1]
    are mapped to ([-1, 1] for both formats). ``schedule``: the grid schedule (``EXPLICIT_BETAS``, the network's
    ``prediction_type``). ``network``: a ``GridNetwork``.
    """

    format: str
    path: Path
    weights_sha256: str
    flags: Mapping[str, Any]
    model_steps: int
    respacing: str | None
    image_shape: tuple[int, ...]
    data_range: tuple[float, float]
    schedule: ScheduleConfig
    network: GridNetwork = field(repr=False, compare=False)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def identity(self) -> dict[str, Any]:
        """The model's identity as the results and features sidecars record it (JSON-able): two files made with
        models whose identities differ are never mixed."""
        return {"format": self.format, "weights_sha256": self.weights_sha256, "flags": dict(self.flags),
                "model_steps": self.model_steps, "respacing": self.respacing,
                "prediction_type": self.prediction_type, "data_range": list(self.data_range),
                "image_shape": list(self.image_shape)}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from an untrusted file: safetensors (no code at all), or a pickle read with
    ``torch.load(weights_only=True)``, which refuses any pickle that would build something other than tensors and
    plain containers (a pickle that would run code is refused: UserError naming the file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a malformed file
            raise UserError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for code, others for a file that is no checkpoint
        raise UserError(f"{path}: refused: not a plain state dict readable with weights_only=True (a checkpoint "
                        f"from the internet is never unpickled with code; {one_line(exc)[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state`` into ``module`` with every key and shape matching; otherwise UserError naming ``source``
    and the first mismatch (missing key, other shape with both shapes, or unexpected key). ``what`` says where
    the module's layout came from (e.g. "the flags given")."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(f"{source}: does not match {what}: key {key} (shape {tuple(tensor.shape)}) is missing "
                            "from the file")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: does not match {what}: key {key} has shape {tuple(state[key].shape)} in "
                            f"the file, {tuple(tensor.shape)} from {what}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{source}: does not match {what}: unexpected key {extra[0]} (shape "
                        f"{tuple(state[extra[0]].shape)}) in the file")
    module.load_state_dict(state, strict=True)
