"""A run's settings under the command-line flags that set them, and the one comparison of flags against a stored
configuration (training resume, reconstruction, a VQ-VAE's data flags).

Leaf module: it knows the configuration dataclasses and nothing that builds a model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddpm_ood.config import DataConfig, RunConfig, canonical_schedule_name
from ddpm_ood.errors import UserError


@dataclass(frozen=True)
class RunFlags:
    """The run settings given explicitly as flags (model, schedule and data; None = not given).

    With a ddpm-ood checkpoint they must agree with its stored config; with an upstream checkpoint (no config) they
    define the model, upstream's defaults filling the rest.
    """

    model_type: str | None = None
    is_grayscale: bool | None = None
    spatial_dims: int | None = None
    image_size: int | None = None
    image_roi: tuple[int, ...] | None = None
    channel: int | None = None
    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    prediction_type: str | None = None
    b_scale: float | None = None
    snr_shift: float | None = None
    simplex_noise: bool | None = None


def data_flag_values(data: DataConfig) -> dict[str, Any]:
    """How images are read and preprocessed, under the flags that set it (``--is_grayscale`` as 0/1)."""
    return {
        "--spatial_dimension": data.spatial_dims,
        "--is_grayscale": int(data.is_grayscale),
        "--image_size": data.image_size,
        "--image_roi": None if data.image_roi is None else tuple(data.image_roi),
        "--channel": data.channel,
    }


def flag_values(run: RunConfig) -> dict[str, Any]:
    """A run's settings under the command-line flags that set them (``--is_grayscale`` as 0/1)."""
    return {
        "--model_type": run.model.preset,
        **data_flag_values(run.data),
        "--beta_schedule": run.schedule.beta_schedule,
        "--beta_start": run.schedule.beta_start,
        "--beta_end": run.schedule.beta_end,
        "--prediction_type": run.schedule.prediction_type,
        "--b_scale": run.schedule.b_scale,
        "--snr_shift": run.schedule.snr_shift,
        "--simplex_noise": int(run.schedule.noise_type != "gaussian"),
    }


def flag_conflicts(stored: Mapping[str, Any], given: Mapping[str, Any], *,
                   skip_not_given: bool) -> list[tuple[str, Any, Any]]:
    """(flag, stored value, given value) for every flag in ``given`` whose value differs from ``stored`` (floats
    within a relative 1e-12). The one comparison of flags against a checkpoint's configuration, used when training
    resumes (every setting compared: None is a value, e.g. no --image_roi) and when reconstruction reads a
    checkpoint (``skip_not_given``: None = the flag was not given, the checkpoint decides)."""
    out = []
    for flag, value in given.items():
        if value is None and skip_not_given:
            continue
        want = stored[flag]
        if isinstance(want, float) and isinstance(value, (int, float)):
            same = abs(value - want) <= 1e-12 * max(1.0, abs(want))
        else:
            same = value == want
        if not same:
            out.append((flag, want, value))
    return out


def config_conflicts(saved: RunConfig, given: RunConfig, *, compare_image_shape: bool = True) -> list[str]:
    """Human-readable differences between a checkpoint's config and the one the flags build.

    Each entry names the flag and both values, e.g. ``--model_type: checkpoint tiny, flags small``.
    """
    stored, wanted = flag_values(saved), flag_values(given)
    wanted["model architecture"] = given.model.to_dict()
    stored["model architecture"] = saved.model.to_dict() if saved.model.preset == given.model.preset else None
    wanted["num_train_timesteps"] = given.schedule.num_train_timesteps
    stored["num_train_timesteps"] = saved.schedule.num_train_timesteps
    wanted["--vqvae_checkpoint (VQ-VAE weights)"] = _latent_identity(given)
    stored["--vqvae_checkpoint (VQ-VAE weights)"] = _latent_identity(saved)
    if compare_image_shape:
        wanted["image shape (C, *spatial)"] = tuple(given.image_shape)
        stored["image shape (C, *spatial)"] = tuple(saved.image_shape)
    if stored["model architecture"] is None:
        del wanted["model architecture"]  # another preset: --model_type already says so
    return [f"{flag}: checkpoint {a}, flags {b}" for flag, a, b in flag_conflicts(stored, wanted, skip_not_given=False)]


def _latent_identity(run: RunConfig) -> str:
    """How a run's autoencoder is named in a config conflict: pixel space, or its VQ-VAE's weights and latents."""
    if run.latent is None:
        return "none (pixel space)"
    return (f"VQ-VAE sha256 {run.latent.weights_sha256[:12]}, latent {'x'.join(map(str, run.latent.latent_shape))}"
            f", --latent_pad={list(run.latent.latent_pad)}")


def check_flags(run: RunConfig, flags: RunFlags, source: str | os.PathLike) -> None:
    """UserError naming the first flag given in ``flags`` that contradicts ``run`` (a checkpoint's stored config,
    ``source`` names it); flags not given (None) are not compared."""
    given = {("--spatial_dimension" if name == "spatial_dims" else f"--{name}"): value
             for name, value in dataclasses.asdict(flags).items()}
    if flags.beta_schedule is not None:
        given["--beta_schedule"] = canonical_schedule_name(flags.beta_schedule)
    if flags.image_roi is not None:
        given["--image_roi"] = tuple(flags.image_roi)
    if flags.is_grayscale is not None:
        given["--is_grayscale"] = int(flags.is_grayscale)
    if flags.simplex_noise is not None:
        given["--simplex_noise"] = int(flags.simplex_noise)
    conflicts = flag_conflicts(flag_values(run), given, skip_not_given=True)
    if conflicts:
        flag, want, value = conflicts[0]
        raise UserError(f"{flag}={value} contradicts {source} which was trained with {want}; drop the flag")
