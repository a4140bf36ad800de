"""Checkpoint files: reading, atomic writing, config round trip, our and upstream's (MONAI Generative) weights."""

from __future__ import annotations

import re

import pytest
import torch

from ddpm_ood import fileio as ddpm_io
from ddpm_ood.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    inference_state_dict,
    load_checkpoint,
    periodic_checkpoint_name,
    run_config_of,
    save_checkpoint,
)
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset
from ddpm_ood.errors import UserError
from ddpm_ood.run_flags import RunFlags, check_flags, config_conflicts
from ddpm_ood.upstream.flags import run_config_from_flags
from ddpm_ood.upstream.weights import guess_model_flags, load_unet_state


def to_upstream_keys(state_dict: dict) -> dict:
    """Invert the key mapping of MONAI's ``DiffusionModelUNet.load_old_state_dict``: core names -> MONAI
    Generative names (attention projections lose their ``attn.`` level, ``out_proj`` was ``proj_attn``, the
    upsampler's ``postconv`` was ``conv``)."""
    old = {}
    for k, v in state_dict.items():
        k2 = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", r".\1.", k)
        k2 = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", k2)
        k2 = k2.replace("postconv", "conv")
        old[k2] = v.clone()
    return old


def _random_model(config, seed: int):
    torch.manual_seed(seed)
    return build_unet(config)


def test_names():
    assert BEST_CHECKPOINT == "checkpoint.pth"
    assert LAST_CHECKPOINT == "checkpoint_last.pth"
    assert periodic_checkpoint_name(100) == "checkpoint_100.pth"


def test_save_and_load_round_trip_weights_only(tmp_path, tiny_model_config):
    model = _random_model(tiny_model_config, 0)
    run_config = RunConfig(tiny_model_config, ScheduleConfig(beta_schedule="cosine", beta_start=None, beta_end=None),
                           DataConfig(is_grayscale=True), (1, 8, 8))
    path = tmp_path / "sub" / "c.pth"
    save_checkpoint(path, {"epoch": 3, "model_state_dict": model.state_dict(), "config": run_config.to_dict()})
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3
    assert run_config_of(ckpt) == run_config
    assert not list(path.parent.glob(".*.tmp"))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.pth: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a zip or pickle" * 10)
    with pytest.raises(UserError, match=r"corrupt\.pth: not a readable checkpoint"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(UserError, match=r"truncated\.pth: not a readable checkpoint"):
        load_checkpoint(truncated)
    not_ckpt = tmp_path / "list.pth"
    torch.save([1, 2], not_ckpt)
    with pytest.raises(UserError, match=r"list\.pth: not a ddpm checkpoint"):
        load_checkpoint(not_ckpt)


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(path, {"epoch": 1, "model_state_dict": {}})
    before = path.read_bytes()

    def exploding_save(obj, f, *a, **k):
        f.write(b"half")  # torch.save is given the open temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError) as err:
        save_checkpoint(path, {"epoch": 2, "model_state_dict": {}})
    assert err.value.filename == str(path)  # named after the checkpoint, not the temporary file
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth"]
    assert ddpm_io  # the atomic write lives in ddpm_ood.fileio


def test_inference_state_dict_prefers_ema():
    raw, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert inference_state_dict({"model_state_dict": raw, "ema_state_dict": ema}) is ema
    assert inference_state_dict({"model_state_dict": raw, "ema_state_dict": ema}, use_ema=False) is raw
    assert inference_state_dict({"model_state_dict": raw, "ema_state_dict": None}) is raw
    assert inference_state_dict({"model_state_dict": raw}) is raw  # upstream checkpoint


def test_run_config_of_upstream_checkpoint_is_none():
    assert run_config_of({"model_state_dict": {}, "epoch": 1}) is None


def test_load_unet_state_native_and_ddp_prefixed(tiny_model_config):
    source = _random_model(tiny_model_config, 1)
    for sd in (source.state_dict(), {f"module.{k}": v for k, v in source.state_dict().items()}):
        target = _random_model(tiny_model_config, 2)
        load_unet_state(target, sd, "x.pth")
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v)


def test_upstream_key_names_load(tiny_model_config):
    source = _random_model(tiny_model_config, 1)
    old = to_upstream_keys(source.state_dict())
    assert any(".proj_attn." in k for k in old) and not any("postconv" in k for k in old)
    assert set(old) != set(source.state_dict())
    target = _random_model(tiny_model_config, 2)
    load_unet_state(target, old, "upstream.pth")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert len(old) == len(source.state_dict())  # the caller's dict is not consumed


def test_upstream_weights_missing_a_tensor_are_refused(tiny_model_config):
    old = to_upstream_keys(_random_model(tiny_model_config, 1).state_dict())
    old.pop(next(k for k in old if ".proj_attn." in k))
    old["extra.weight"] = torch.zeros(1)  # same count, but one tensor is not the model's
    with pytest.raises(UserError, match=r"upstream\.pth: weights do not fit"):
        load_unet_state(_random_model(tiny_model_config, 2), old, "upstream.pth")


def test_weights_of_another_preset_name_the_flags_they_need():
    tiny = build_unet(model_config_from_preset("tiny", 2, 1)).state_dict()
    assert guess_model_flags(tiny) == "--model_type=tiny --is_grayscale=1 --spatial_dimension=2"
    assert guess_model_flags(to_upstream_keys(tiny)) == "--model_type=tiny --is_grayscale=1 --spatial_dimension=2"
    rgb_tiny = model_config_from_preset("tiny", 2, 3)
    with pytest.raises(UserError, match=r"run/checkpoint\.pth: .*seems to need --model_type=tiny --is_grayscale=1"):
        load_unet_state(build_unet(rgb_tiny), tiny, "run/checkpoint.pth")
    with pytest.raises(UserError, match=r"seems to need --model_type=tiny"):
        load_unet_state(build_unet(rgb_tiny), to_upstream_keys(tiny), "run/checkpoint.pth")


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
    from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
    from ddpm_ood.diffusion.unet import model_config_from_preset

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
    # An upstream checkpoint (no config): the flag says which noise it was trained with, upstream's unscaled simplex.
    assert run_config_from_flags(RunFlags(simplex_noise=True), (1, 8, 8)).schedule.noise_type == "simplex_upstream"
    assert run_config_from_flags(RunFlags(), (1, 8, 8)).schedule.noise_type == "gaussian"


def _resolve(ckpt: dict, flags: RunFlags, source) -> RunConfig:
    """A checkpoint's stored configuration checked against explicit flags, as ``runs.open_run`` does it."""
    run = run_config_of(ckpt, source)
    check_flags(run, flags, source)
    return run
