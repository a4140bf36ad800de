"""upstream/flags.py: the model an upstream checkpoint (no stored configuration) is, from the flags with upstream's
defaults; its simplex noise; upstream's spellings of "not given"."""

from __future__ import annotations

from ddpm_ood.config import DataConfig, ScheduleConfig
from ddpm_ood.diffusion.noise import UPSTREAM_SIMPLEX
from ddpm_ood.diffusion.unet import model_config_from_preset
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.upstream.flags import data_config_for_upstream, given_path, run_config_from_flags


def test_no_flags_give_upstreams_defaults():
    run = run_config_from_flags(RunFlags(), (3, 32, 32))
    assert run.model == model_config_from_preset("small", 2, 3)
    assert run.schedule == ScheduleConfig()  # linear_beta, epsilon, b_scale 1, snr_shift 1, Gaussian noise
    assert run.data == DataConfig(is_grayscale=False) == data_config_for_upstream(RunFlags())
    assert run.image_shape == (3, 32, 32) and run.latent is None


def test_the_flags_given_define_the_model_schedule_and_data():
    flags = RunFlags(model_type="tiny", is_grayscale=True, spatial_dims=3, image_size=16, image_roi=(20, 20, 20),
                     channel=2, beta_schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
                     prediction_type="sample", b_scale=0.5, snr_shift=2.0)
    run = run_config_from_flags(flags, [1, 16, 16, 16])
    assert run.model == model_config_from_preset("tiny", 3, 1)
    assert run.schedule == ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195, "sample", b_scale=0.5, snr_shift=2.0)
    assert run.data == DataConfig(is_grayscale=True, spatial_dims=3, image_size=16, image_roi=(20, 20, 20), channel=2)
    assert run.image_shape == (1, 16, 16, 16)


def test_an_upstream_checkpoints_simplex_flag_means_upstreams_raw_simplex_noise():
    # An upstream checkpoint (no config): the flag says which noise it was trained with, upstream's unscaled simplex.
    assert run_config_from_flags(RunFlags(simplex_noise=True), (1, 8, 8)).schedule.noise_type == "simplex_upstream"
    assert UPSTREAM_SIMPLEX == "simplex_upstream"
    assert run_config_from_flags(RunFlags(), (1, 8, 8)).schedule.noise_type == "gaussian"
    assert run_config_from_flags(RunFlags(simplex_noise=False), (1, 8, 8)).schedule.noise_type == "gaussian"


def test_upstreams_spellings_of_no_path_are_none():
    assert given_path(None) is None and given_path("None") is None and given_path("") is None
    assert given_path("runs/vq/checkpoint.pth") == "runs/vq/checkpoint.pth"
    assert given_path("none") == "none"  # only upstream's exact spellings
