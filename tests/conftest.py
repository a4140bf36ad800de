"""Shared fixtures: tiny configs that make every test fast on a 2-core CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_model_config():
    """An 8/16-channel UNet for 1-channel 2D images (spatial size divisible by 4)."""
    from ddpm_ood.config import ModelConfig

    return ModelConfig(
        preset="test",
        spatial_dims=2,
        in_channels=1,
        channels=(8, 16, 16),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        num_head_channels=16,
        norm_num_groups=8,
    )
