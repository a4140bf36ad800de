"""The UNet builder: presets, fused attention (the CUDA path), and the fits-the-UNet check."""

from __future__ import annotations

import pytest
import torch

from ddpm_ood.diffusion.unet import (
    MODEL_PRESETS,
    build_unet,
    check_image_fits_unet,
    model_config_from_preset,
    randomize_zero_init_convs,
    wants_fused_attention,
)
from ddpm_ood.errors import UserError


def test_fused_attention_is_the_same_network():
    config = model_config_from_preset("tiny_fast", 2, 1)
    torch.manual_seed(0)
    plain = randomize_zero_init_convs(build_unet(config)).eval()
    fused = build_unet(config, fused_attention=True).eval()
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([1, 500, 999])
    with torch.no_grad():
        assert (plain(x, t) - fused(x, t)).abs().max() < 1e-5


def test_fused_attention_only_on_cuda():
    assert wants_fused_attention(torch.device("cuda", 0)) and not wants_fused_attention(torch.device("cpu"))


def test_every_preset_builds_and_unknown_ones_are_refused():
    for preset in MODEL_PRESETS:
        with torch.device("meta"):
            build_unet(model_config_from_preset(preset, 2, 1))
    with pytest.raises(UserError, match="accepted: small, big, tiny, tiny_fast"):
        model_config_from_preset("huge", 2, 1)
    check_image_fits_unet((1, 28, 28), model_config_from_preset("tiny_fast", 2, 1), "x.csv")
