"""Start points of the reconstruction: the one definition of which t each image is noised to.

Paper-era PLMS grid (docs/development.md, Decisions): with N inference steps of the 1000-step schedule and ``steps_offset=1`` the grid
is t = 1, 1 + r, ..., 1 + (N-1) r with r = 1000 // N (1, 11, ..., 991 for N=100). Start points are every k-th grid
point from the first, ascending, so their count is ceil(N / k): 100, 50, 34, 25, 20, 13, 7, 4, 2 for
k = 1, 2, 3, 4, 5, 8, 16, 32, 64 (the README table).
"""

from __future__ import annotations

from ddpm_ood.config import NUM_TRAIN_TIMESTEPS
from ddpm_ood.errors import UserError

STEPS_OFFSET = 1


def inference_timesteps(num_inference_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The PLMS grid, DESCENDING (991, 981, ..., 1 for 100 steps); equals MONAI PNDM's with steps_offset=1."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise UserError(
            f"--num_inference_steps must be between 1 and {num_train_timesteps}, got {num_inference_steps}"
        )
    ratio = num_train_timesteps // num_inference_steps
    return [i * ratio + STEPS_OFFSET for i in reversed(range(num_inference_steps))]


def start_timesteps(
    num_inference_steps: int = 100,
    inference_skip_factor: int = 1,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[int]:
    """Start points t, ASCENDING: every ``inference_skip_factor``-th grid point from the smallest."""
    if inference_skip_factor < 1:
        raise UserError(f"--inference_skip_factor must be >= 1, got {inference_skip_factor}")
    ascending = inference_timesteps(num_inference_steps, num_train_timesteps)[::-1]
    return ascending[::inference_skip_factor]


def denoising_timesteps(start_t: int, num_inference_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The grid points a trajectory started at ``start_t`` visits, descending from ``start_t`` to the smallest."""
    grid = inference_timesteps(num_inference_steps, num_train_timesteps)
    if start_t not in grid:
        raise UserError(f"start t={start_t} is not on the {num_inference_steps}-step grid")
    return grid[grid.index(start_t):]
