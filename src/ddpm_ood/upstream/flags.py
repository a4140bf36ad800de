"""The reference code's flags: the model an upstream checkpoint (no stored configuration) is, built from the flags
with upstream's defaults, upstream's simplex noise, and upstream's spellings of "not given"."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.noise import UPSTREAM_SIMPLEX
from ddpm_ood.diffusion.unet import model_config_from_preset
from ddpm_ood.run_flags import RunFlags

# How the reference code's scripts write "no value" for an optional path (its argparse defaults are the string
# "None"; shells pass "" for an unset variable).
NONE_SPELLINGS = ("", "None")


def given_path(value: str | os.PathLike | None) -> str | None:
    """An optional path flag as given, with upstream's spellings of "not given" read as None."""
    if value is None or str(value) in NONE_SPELLINGS:
        return None
    return os.fspath(value)


def noise_type_for_flags(simplex_noise: bool, *, upstream_checkpoint: bool) -> str:
    """The noise type ``--simplex_noise`` selects: Gaussian, simplex, or for a checkpoint trained by upstream
    ddpm-ood (no stored configuration) upstream's raw simplex sum."""
    if not simplex_noise:
        return "gaussian"
    return UPSTREAM_SIMPLEX if upstream_checkpoint else "simplex"


def run_config_from_flags(flags: RunFlags, image_shape: Sequence[int]) -> RunConfig:
    """For upstream checkpoints: the model defined by the flags (upstream defaults otherwise)."""
    data = data_config_for_upstream(flags)
    schedule = ScheduleConfig(
        beta_schedule=flags.beta_schedule or "linear_beta",
        beta_start=flags.beta_start,
        beta_end=flags.beta_end,
        prediction_type=flags.prediction_type or "epsilon",
        b_scale=flags.b_scale if flags.b_scale is not None else 1.0,
        snr_shift=flags.snr_shift if flags.snr_shift is not None else 1.0,
        noise_type=noise_type_for_flags(bool(flags.simplex_noise), upstream_checkpoint=True),
    )
    model = model_config_from_preset(flags.model_type or "small", data.spatial_dims, data.channels)
    return RunConfig(model=model, schedule=schedule, data=data, image_shape=tuple(image_shape))


def data_config_for_upstream(flags: RunFlags) -> DataConfig:
    """How an upstream checkpoint's images are read: the data flags given, upstream's defaults for the rest."""
    return DataConfig(
        is_grayscale=bool(flags.is_grayscale),
        spatial_dims=flags.spatial_dims or 2,
        image_size=flags.image_size,
        image_roi=flags.image_roi,
        channel=flags.channel or 0,
    )
