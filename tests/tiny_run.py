"""Shared test helpers: small .npy image sets, a tiny random-weight checkpoint, the toy run (a toy split and a tiny
checkpoint, the ``toy_run`` fixtures of conftest.py), and the LPIPS-weights skip mark."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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


def to_upstream_keys(state_dict: dict) -> dict:
    """Invert the key mapping of MONAI's ``DiffusionModelUNet.load_old_state_dict``: core names -> MONAI
    Generative names (attention projections lose their ``attn.`` level, ``out_proj`` was ``proj_attn``, the
    upsampler's ``postconv`` was ``conv``): UNet weights as an upstream checkpoint holds them."""
    old = {}
    for k, v in state_dict.items():
        k2 = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", r".\1.", k)
        k2 = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", k2)
        k2 = k2.replace("postconv", "conv")
        old[k2] = v.clone()
    return old


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, tiny networks run several times faster than with more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------ toy run
# The toy split: (split CSV, image folder, file prefix, number of images, seed, image shape). 8x8 grayscale images
# but for Rgb_test (3 channels: a set a grayscale model must refuse).
TOY_SPLIT = (
    ("Toy_train.csv", "train", "Train", 8, 4, (8, 8)),
    ("Toy_val.csv", "val", "Toy", 3, 0, (8, 8)),
    ("Toy_test.csv", "test", "Toy", 4, 1, (8, 8)),
    ("Other_test.csv", "other", "Other", 3, 2, (8, 8)),
    ("Rgb_test.csv", "rgb", "Rgb", 2, 3, (3, 8, 8)),
)
# The checkpoint variants of the toy run: its model name (the run folder under ``out``).
TOY_RUN_VARIANTS = {"random": "toy", "simplex": "simplex"}


@dataclass(frozen=True)
class ToyRun:
    """The toy split and a run on it: image folders under ``root`` (``TOY_SPLIT``), the split CSVs in ``splits``,
    the run folder ``out / model_name``. Shared by many tests: a test that writes into a run folder works on
    ``copy_to(tmp_path)``."""

    root: Path
    splits: Path
    out: Path
    model_name: str

    @property
    def run_dir(self) -> Path:
        return self.out / self.model_name

    def copy_to(self, out: Path) -> Path:
        """The run folder (checkpoints and logs, no results) copied to ``out / model_name``; returns ``out``."""
        shutil.copytree(self.run_dir, out / self.model_name, ignore=shutil.ignore_patterns("ood"))
        return out


def write_toy_split(root: Path) -> Path:
    """The .npy images of ``TOY_SPLIT`` under ``root`` and their split CSVs in ``root / "data_splits"`` (returned)."""
    from ddpm_ood.data.splits import write_split_csv

    splits = root / "data_splits"
    for csv_name, folder, prefix, n, seed, shape in TOY_SPLIT:
        write_split_csv(splits / csv_name, write_npy_images(root / folder, prefix, n, seed, shape=shape))
    return splits


def build_toy_run(root: Path, variant: str = "random") -> ToyRun:
    """The toy split under ``root`` and a run on it (``TOY_RUN_VARIANTS``): "random", an untrained tiny UNet
    (``save_tiny_checkpoint``) as run "toy"; "simplex", train_ddpm.py --simplex_noise=1 on Toy_train (tiny
    preset, 2 quick epochs) as run "simplex"."""
    splits = write_toy_split(root)
    out = root / "out"
    model_name = TOY_RUN_VARIANTS[variant]
    if variant == "random":
        save_tiny_checkpoint(out / model_name / "checkpoint.pth")
    else:
        from ddpm_ood.cli import train_ddpm

        with one_torch_thread():
            assert train_ddpm.main([
                f"--output_dir={out}", f"--model_name={model_name}", f"--training_ids={splits / 'Toy_train.csv'}",
                f"--validation_ids={splits / 'Toy_val.csv'}", "--model_type=tiny", "--is_grayscale=1",
                "--batch_size=4", "--n_epochs=2", "--eval_freq=1", "--checkpoint_every=0", "--num_workers=0",
                "--sample_steps=2", "--simplex_noise=1", "--device=cpu",
            ]) == 0
    return ToyRun(root, splits, out, model_name)


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` by relative path: what a test may not change in a shared folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def benchmark_module(script: str, name: str | None = None) -> Iterator[object]:
    """``benchmarks/<script>`` imported as a module (registered in ``sys.modules`` while in use, for pickling and
    dataclasses), removed again afterwards."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name or Path(script).stem, REPO_ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
