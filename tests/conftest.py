"""Shared fixtures: tiny configs that make every test fast on a 2-core CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_model_config():
    """An 8/16-channel UNet for 1-channel 2D images (spatial size divisible by 4)."""
    from tiny_run import TINY_MODEL

    return TINY_MODEL


@pytest.fixture
def one_thread():
    from tiny_run import one_torch_thread

    with one_torch_thread():
        yield
