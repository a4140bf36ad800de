"""upstream/weights.py: UNet weights under our, DDP-prefixed and MONAI Generative (upstream's) key names, and the
flags an upstream checkpoint's weights need."""

from __future__ import annotations

import pytest
import torch
from tiny_run import to_upstream_keys

from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset
from ddpm_ood.errors import UserError
from ddpm_ood.upstream.weights import guess_model_flags, load_unet_state


def _random_model(config, seed: int):
    torch.manual_seed(seed)
    return build_unet(config)


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


def test_weights_no_preset_builds_name_no_flags():
    tiny = build_unet(model_config_from_preset("tiny", 2, 1)).state_dict()
    assert guess_model_flags({k: v for k, v in tiny.items() if k != "out.2.conv.bias"}) is None
    assert guess_model_flags({"conv_in.conv.weight": torch.zeros(8, 2, 3, 3)}) is None  # 2 input channels
    assert guess_model_flags({}) is None

