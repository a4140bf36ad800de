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


def _shared_toy_run(tmp_path_factory, variant: str):
    """The toy run of ``variant`` (tiny_run.build_toy_run), built once per session; at the session's end every
    file in it must be as built: a test that writes into it would change what other tests see."""
    from tiny_run import build_toy_run, folder_digest

    run = build_toy_run(tmp_path_factory.mktemp(f"toy_{variant}"), variant)
    before = folder_digest(run.root)
    yield run
    assert folder_digest(run.root) == before, f"a test changed the shared toy run {run.root}: copy_to(tmp_path) first"


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """The toy split and an untrained tiny UNet's checkpoint (run "toy"): read only, ``copy_to`` to write."""
    yield from _shared_toy_run(tmp_path_factory, "random")


@pytest.fixture(scope="session")
def simplex_toy_run(tmp_path_factory):
    """The toy split and a tiny UNet trained by train_ddpm.py --simplex_noise=1 (run "simplex"): read only."""
    yield from _shared_toy_run(tmp_path_factory, "simplex")
