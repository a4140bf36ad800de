"""run_flags.py: a run's settings under the flags that set them, and flags checked against a stored configuration."""

from __future__ import annotations

import pytest

from ddpm_ood.checkpoint import run_config_of
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.unet import model_config_from_preset
from ddpm_ood.errors import UserError
from ddpm_ood.run_flags import RunFlags, check_flags, config_conflicts, flag_values


def test_config_conflicts_name_both_values(tiny_model_config):
    data = DataConfig(is_grayscale=True)
    a = RunConfig(tiny_model_config, ScheduleConfig(), data, (1, 8, 8))
    assert config_conflicts(a, a) == []
    b = RunConfig(model_config_from_preset("small", 2, 1), ScheduleConfig(beta_schedule="cosine", beta_start=None,
                                                                           beta_end=None), data, (1, 16, 16))
    conflicts = config_conflicts(a, b)
    assert "--model_type: checkpoint test, flags small" in conflicts
    assert "--beta_schedule: checkpoint linear_beta, flags cosine" in conflicts
    assert "image shape (C, *spatial): checkpoint (1, 8, 8), flags (1, 16, 16)" in conflicts
    assert not any("image shape" in c for c in config_conflicts(a, b, compare_image_shape=False))


def test_a_setting_the_checkpoint_has_but_the_flags_leave_unset_is_a_conflict_on_resume():
    # Resuming without --image_roi must not silently train on uncropped images of the same final shape.
    model = model_config_from_preset("tiny", 2, 1)
    saved = RunConfig(model, ScheduleConfig(), DataConfig(is_grayscale=True, image_size=32, image_roi=(20, 20)),
                      image_shape=(1, 32, 32))
    given = RunConfig(model, ScheduleConfig(), DataConfig(is_grayscale=True, image_size=32), image_shape=(1, 32, 32))
    assert config_conflicts(saved, given) == ["--image_roi: checkpoint (20, 20), flags None"]
    assert config_conflicts(saved, saved) == []


def test_simplex_noise_is_a_stored_setting_refused_when_contradicted(tmp_path):
    model = model_config_from_preset("tiny", 2, 1)
    simplex = RunConfig(model, ScheduleConfig(noise_type="simplex"), DataConfig(is_grayscale=True), (1, 8, 8))
    gaussian = RunConfig(model, ScheduleConfig(), DataConfig(is_grayscale=True), (1, 8, 8))
    assert config_conflicts(simplex, gaussian) == ["--simplex_noise: checkpoint 1, flags 0"]
    ckpt = {"model_state_dict": {}, "config": simplex.to_dict()}
    assert _resolve(ckpt, RunFlags(simplex_noise=True), tmp_path / "c.pth") == simplex
    with pytest.raises(UserError, match=r"^--simplex_noise=0 contradicts .*c\.pth which was trained with 1; drop"):
        _resolve(ckpt, RunFlags(simplex_noise=False), tmp_path / "c.pth")
    legacy = gaussian.to_dict()
    del legacy["schedule"]["noise_type"]  # a checkpoint written before noise types existed
    assert _resolve({"config": legacy}, RunFlags(simplex_noise=False), tmp_path / "c.pth") == gaussian


def _resolve(ckpt: dict, flags: RunFlags, source) -> RunConfig:
    """A checkpoint's stored configuration checked against explicit flags, as ``runs.open_run`` does it."""
    run = run_config_of(ckpt, source)
    check_flags(run, flags, source)
    return run


def test_flags_not_given_are_not_compared_and_given_ones_in_any_accepted_spelling_agree():
    run = RunConfig(model_config_from_preset("tiny", 2, 1),
                    ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195), DataConfig(is_grayscale=True), (1, 8, 8))
    check_flags(run, RunFlags(), "c.pth")
    check_flags(run, RunFlags(model_type="tiny", is_grayscale=True, spatial_dims=2, beta_schedule="scaled_linear",
                              beta_start=0.0015 * (1 + 1e-13), beta_end=0.0195, simplex_noise=False), "c.pth")
    with pytest.raises(UserError, match=r"^--beta_end=0.02 contradicts c\.pth which was trained with 0.0195; drop"):
        check_flags(run, RunFlags(beta_end=0.02), "c.pth")
    with pytest.raises(UserError, match=r"^--is_grayscale=0 contradicts c\.pth which was trained with 1"):
        check_flags(run, RunFlags(is_grayscale=False), "c.pth")
    assert flag_values(run)["--model_type"] == "tiny" and flag_values(run)["--simplex_noise"] == 0

