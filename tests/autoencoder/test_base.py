"""The identity autoencoder: pixel space scaled by b_scale, the one place b_scale is applied."""

from __future__ import annotations

import pytest
import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder, autoencoder_for, to_image
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.unet import model_config_from_preset


@pytest.mark.parametrize("b_scale", [1.0, 2.0, 0.5])
def test_identity_encodes_by_b_scale_and_decodes_back(b_scale):
    x = torch.rand(3, 1, 8, 8)
    ae = IdentityAutoencoder(b_scale)
    assert torch.equal(ae.encode(x), x * b_scale)
    assert torch.allclose(ae.decode(ae.encode(x)), x, rtol=0, atol=1e-7)


def test_b_scale_must_be_positive():
    with pytest.raises(ValueError, match="b_scale"):
        IdentityAutoencoder(0.0)


def test_a_run_gets_the_pixel_autoencoder_of_its_schedule():
    run = RunConfig(model_config_from_preset("tiny", 2, 1), ScheduleConfig(b_scale=3.0), DataConfig(is_grayscale=True),
                    image_shape=(1, 8, 8))
    ae = autoencoder_for(run)
    assert isinstance(ae, IdentityAutoencoder) and ae.b_scale == 3.0


def test_to_image_clamps_to_the_unit_range():
    assert torch.equal(to_image(torch.tensor([-0.5, 0.25, 1.5])), torch.tensor([0.0, 0.25, 1.0]))
