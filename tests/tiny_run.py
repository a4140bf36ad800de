"""Shared test helpers: small .npy image sets, a tiny random-weight checkpoint, and the LPIPS-weights skip mark."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_ood.checkpoint import save_checkpoint
from ddpm_ood.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig, VQVAEConfig
from ddpm_ood.diffusion.unet import build_unet, randomize_zero_init_convs

# The repository root (tests live one or two folders below it).
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ModelConfig("test", 2, 1, (8, 16, 16), (False, False, True), 1, 16, 8)
TINY_SCHEDULE = ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195)
# A 2-level VQ-VAE (8/16 channels, 16 codes of 3 dims): 28x28 images -> 7x7 latents.
TINY_VQ_2D = VQVAEConfig(spatial_dims=2, channels=(8, 16), num_res_channels=(8, 16), num_res_layers=1,
                         downsample_parameters=((2, 4, 1, 1),) * 2, upsample_parameters=((2, 4, 1, 1, 0),) * 2,
                         num_embeddings=16, embedding_dim=3)
# How far a metric or z-score may move when the same images are batched differently (fp32): the network's kernels
# round differently for other batch compositions (about 1e-6 here); anything larger is a real difference.
FLOAT_ROUNDING = 1e-5


def lpips_installed() -> bool:
    from ddpm_ood.perceptual.lpips import build_lpips

    try:
        build_lpips("cpu")
    except Exception:
        return False
    return True


needs_lpips = pytest.mark.skipif(
    not lpips_installed(), reason="LPIPS AlexNet weights not installed: run `python -m ddpm_ood.cli.lpips_weights`"
)


def write_npy_images(folder: Path, prefix: str, n: int, seed: int, shape=(8, 8)) -> list[str]:
    """n random uint8 images ``<folder>/<prefix>_<i>.npy`` (seeded); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}_{i}.npy"
        np.save(p, rng.integers(0, 256, size=shape, dtype=np.uint8))
        paths.append(str(p))
    return paths


def save_tiny_checkpoint(path: Path, epoch: int = 1, seed: int = 0) -> RunConfig:
    """A ddpm-ood checkpoint of an untrained 8/16-channel UNet for 1x8x8 grayscale images; returns its config.

    MONAI zero-initialises the output conv and the last conv of every residual block, so an untrained UNet predicts
    exactly 0 for every input: tests on it would never exercise the network. Those convs get a seeded random init.
    """
    torch.manual_seed(seed)
    run = RunConfig(TINY_MODEL, TINY_SCHEDULE, DataConfig(is_grayscale=True), (1, 8, 8))
    model = randomize_zero_init_convs(build_unet(TINY_MODEL))
    save_checkpoint(path, {"epoch": epoch, "model_state_dict": model.state_dict(), "config": run.to_dict()})
    return run


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, tiny networks run several times faster than with more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
