"""Checkpoint files (our format): names, reading, atomic writing, config round trip, which weights infer.
Upstream's weights and flags: tests/upstream/; flags against a stored config: test_run_flags.py."""

from __future__ import annotations

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
from ddpm_ood.diffusion.unet import build_unet
from ddpm_ood.errors import UserError


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
