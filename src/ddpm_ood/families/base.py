"""The score-family interface: settings, the family record, and groups of shared network calls.

A *score family* turns a model and an input into a feature vector (DESIGN.md 3): ``features(eps_fn, x0, keys,
acp, settings)`` -> (B, D) float64 per image. Families whose features come from the same network calls belong
to one ``CallGroup`` (``eps_norm`` and ``denoising_error`` share their L noised inputs; ``diffpath6d`` and
``diffpath1d`` share one DDIM inversion): the group runs its calls once and returns every member's features, and
its calls count once in ``nfe`` (network evaluations per image).

Conventions (all families): ``x0`` (B, C, *spatial), 2D or 3D, float32, already in model space (pixel images in
[0, 1] times b_scale, or VQ-VAE latents); ``keys`` the B images' noise keys (``seeding.noise_key``), which seed
any noise row by row so batch size and order never change a number; ``acp`` the (1000,) alphas_cumprod of the
run's schedule (``diffusion.schedule.alphas_cumprod``); t always indexes the 1000-step training schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_ood.config import DEFAULT_NOISE_TYPE, NUM_TRAIN_TIMESTEPS, check_noise_type
from ddpm_ood.diffusion.eps import EpsFn
from ddpm_ood.errors import UserError


def even_levels(count: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """``count`` noise levels spread evenly over the schedule, the middles of ``count`` equal bins (rounded
    down to whole t): 10 -> 50, 150, ..., 950; 5 -> 100, 300, ..., 900; 3 -> 166, 500, 833."""
    if not 1 <= count <= num_train_timesteps:
        raise UserError(f"--score_levels: the number of levels must be between 1 and {num_train_timesteps}, "
                        f"got {count}")
    return tuple(int((2 * i + 1) * num_train_timesteps // (2 * count)) for i in range(count))


# Ten levels spread evenly over the schedule: 50, 150, ..., 950.
DEFAULT_LEVELS: tuple[int, ...] = even_levels(10)
DEFAULT_DIFFPATH_STEPS = 10  # DiffPath's default (--n_ddim_steps 10)
DEFAULT_SEED = 2  # the project's default --seed


@dataclass(frozen=True)
class FamilySettings:
    """What the feature families need besides the model and the data.

    levels: the noise levels t_1..t_L (1000-step schedule) of ``eps_norm`` and ``denoising_error``, in the order
    their feature columns take. diffpath_steps: K, the DDIM inversion steps of DiffPath (>= 2: its rate-of-change
    statistics need two steps). seed, noise_type: the per-row noise of the noised levels (``diffusion.noise``).
    diffpath_clip: (low, high) to clip DiffPath's x0 predictions to, or None (see ``families.diffpath``).
    """

    levels: tuple[int, ...] = DEFAULT_LEVELS
    diffpath_steps: int = DEFAULT_DIFFPATH_STEPS
    seed: int = DEFAULT_SEED
    noise_type: str = DEFAULT_NOISE_TYPE
    diffpath_clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        levels = tuple(int(t) for t in self.levels)
        object.__setattr__(self, "levels", levels)
        if not levels:
            raise UserError("score families need at least one noise level")
        bad = [t for t in levels if not 0 <= t < NUM_TRAIN_TIMESTEPS]
        if bad:
            raise UserError(f"noise levels must be in [0, {NUM_TRAIN_TIMESTEPS}), got {bad}")
        if len(set(levels)) != len(levels):
            raise UserError(f"noise levels must be distinct, got {list(levels)}")
        if not 2 <= int(self.diffpath_steps) <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"DiffPath steps must be between 2 and {NUM_TRAIN_TIMESTEPS}, got {self.diffpath_steps}")
        object.__setattr__(self, "diffpath_steps", int(self.diffpath_steps))
        check_noise_type(self.noise_type)
        if self.diffpath_clip is not None:
            low, high = (float(v) for v in self.diffpath_clip)
            if not low < high:
                raise UserError(f"diffpath_clip must be (low, high) with low < high, got {self.diffpath_clip}")
            object.__setattr__(self, "diffpath_clip", (low, high))


# A group's computation: every member family's (B, D) float64 features, by family name.
GroupRun = Callable[[EpsFn, torch.Tensor, Sequence[str], torch.Tensor, FamilySettings], dict[str, np.ndarray]]


@dataclass(frozen=True)
class CallGroup:
    """Network calls shared by several families: ``run`` makes them once and returns all members' features."""

    name: str
    nfe: Callable[[FamilySettings], int]
    run: GroupRun


@dataclass(frozen=True)
class ScoreFamily:
    """One score family: a name, its feature columns, and the call group that computes it."""

    name: str
    description: str
    group: CallGroup
    columns: Callable[[FamilySettings], list[str]]

    def feature_names(self, settings: FamilySettings) -> list[str]:
        """The D column names of this family's features, in order."""
        return self.columns(settings)

    def nfe(self, settings: FamilySettings) -> int:
        """Network evaluations per image (shared with the other families of its group)."""
        return self.group.nfe(settings)

    def features(self, eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                 settings: FamilySettings) -> np.ndarray:
        """(B, D) float64 features of the B images ``x0`` (module docstring for the conventions)."""
        return self.group.run(eps_fn, x0, keys, acp, settings)[self.name]


def check_batch(x0: torch.Tensor, keys: Sequence[str]) -> None:
    """x0 must be (B, C, *spatial) with one key per image."""
    if x0.ndim < 3:
        raise ValueError(f"x0 must be (B, C, *spatial), got shape {tuple(x0.shape)}")
    if len(keys) != x0.shape[0]:
        raise ValueError(f"{x0.shape[0]} images but {len(keys)} noise keys")


def per_image(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, n) float64: every non-batch element of each image, for float64 reductions."""
    return x.reshape(x.shape[0], -1).double()
