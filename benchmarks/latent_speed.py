"""Side-by-side reconstruction speed: latent diffusion vs pixel-space diffusion, on the same images, start points and
PLMS steps, in ONE process.

Both run the whole per-batch path reconstruct.py runs (``pipeline.measure_batch``: encode -> batched engine ->
decode -> clamp -> MSE and LPIPS against the input image), at the precision ``--amp=1`` picks on this machine:

- pixel: the quickstart's ``tiny_fast`` UNet on 1x28x28 images;
- latent: the LDM quickstart's VQ-VAE (2 levels, 28x28 -> 7x7 latents of 3 channels, padded to 8x8) and the same
  ``tiny_fast`` UNet on its latents.

By default the networks are randomly initialised (speed does not depend on training: the same layers run on the same
shapes); ``--pixel_checkpoint`` / ``--latent_checkpoint`` time trained quickstart checkpoints instead. The images are
real Fashion-MNIST test images when ``--images_csv`` is given, else seeded random ones. Printed as ``key: value``
lines; the LAST line is ``latent_vs_pixel``: latent images/s / pixel images/s.

Usage (repository root, venv active)::

    python benchmarks/latent_speed.py                                   # ~1 min on 2 CPU cores
    python benchmarks/latent_speed.py --images_csv=runs/quickstart/data/data_splits/FashionMNIST_test.csv \\
        --pixel_checkpoint=runs/quickstart/output/fashionmnist_tiny_fast/checkpoint.pth \\
        --latent_checkpoint=runs/quickstart/output/fashionmnist_ldm_tiny_fast/checkpoint.pth
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig, VQVAEConfig
from ddpm_ood.devices import describe_device, resolve_precision
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset, randomize_zero_init_convs
from ddpm_ood.reconstruction.plan import ReconstructionPlan

QUICKSTART_VQVAE = VQVAEConfig(spatial_dims=2, channels=(32, 64), num_res_channels=(32, 64), num_res_layers=1,
                               downsample_parameters=((2, 4, 1, 1),) * 2, upsample_parameters=((2, 4, 1, 1, 0),) * 2,
                               num_embeddings=256, embedding_dim=3)
SCHEDULE = ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195)
DATA = DataConfig(is_grayscale=True)
IMAGE_SHAPE = (1, 28, 28)


def _untrained_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Checkpoints of randomly initialised pixel and latent models with the quickstart's architectures."""
    from ddpm_ood.autoencoder.vqvae import build_vqvae, latent_config, load_vqvae
    from ddpm_ood.checkpoint import save_checkpoint
    from ddpm_ood.training.vqvae import vqvae_checkpoint_config

    torch.manual_seed(0)
    vq_path = folder / "vqvae.pth"
    save_checkpoint(vq_path, {"epoch": 0, "model_state_dict": build_vqvae(QUICKSTART_VQVAE).state_dict(),
                              "config": vqvae_checkpoint_config(QUICKSTART_VQVAE, DATA, IMAGE_SHAPE)})
    paths = []
    for name, channels, latent in (("pixel", 1, None), ("latent", 3, True)):
        model_config = model_config_from_preset("tiny_fast", 2, channels)
        if latent:
            latent = latent_config(load_vqvae(vq_path), IMAGE_SHAPE, len(model_config.channels), None, "benchmark")
        run = RunConfig(model_config, SCHEDULE, DATA, IMAGE_SHAPE, latent=latent)
        unet = randomize_zero_init_convs(build_unet(model_config))
        path = folder / f"{name}.pth"
        save_checkpoint(path, {"epoch": 0, "model_state_dict": unet.state_dict(), "config": run.to_dict()})
        paths.append(path)
    return paths[0], paths[1]


def _images(csv: str | None, n: int) -> tuple[torch.Tensor, list[str]]:
    if csv is None:
        g = torch.Generator().manual_seed(0)
        return torch.rand((n, *IMAGE_SHAPE), generator=g), [f"bench_{i}" for i in range(n)]
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.fileio import image_stem

    ds = dataset_from_csv(csv, DATA, first_n=n)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), [image_stem(p) for p in ds.paths]


def time_model(checkpoint: Path, images: torch.Tensor, keys: list[str], args: argparse.Namespace,
               precision: str) -> tuple[float, str]:
    """(images/s over ``args.repeats`` timed batches after one warm-up batch, the model's one-line description)."""
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
    from ddpm_ood.reconstruction.pipeline import measure_batch
    from ddpm_ood.runs import load_run_model, open_run

    run = open_run(checkpoint)
    device = torch.device("cpu")
    model = load_run_model(run, device, precision=precision)
    metrics = ReconstructionMetrics(device)
    ts = start_timesteps(args.num_inference_steps, args.inference_skip_factor)

    def once() -> None:
        measure_batch(model, metrics, images, keys,
                      ReconstructionPlan.at(ts, args.num_inference_steps, 2, recon_steps=args.recon_steps))

    once()  # warm-up: first calls allocate and pick kernels
    started = time.perf_counter()
    for _ in range(args.repeats):
        once()
    elapsed = time.perf_counter() - started
    what = f"{'latent ' + 'x'.join(map(str, run.config.model_shape)) if run.config.latent else 'pixel'} ({checkpoint.name})"
    return args.repeats * len(images) / elapsed, what


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pixel_checkpoint", type=Path, default=None, help="a trained pixel-space checkpoint (1x28x28)")
    p.add_argument("--latent_checkpoint", type=Path, default=None, help="a trained latent checkpoint (1x28x28 images)")
    p.add_argument("--images_csv", type=str, default=None, help="split CSV of 28x28 grayscale images (default: random)")
    p.add_argument("--batch_size", type=int, default=50, help="images per batch (the quickstart's 50)")
    p.add_argument("--repeats", type=int, default=2, help="timed batches per model (default 2)")
    p.add_argument("--num_inference_steps", type=int, default=100)
    p.add_argument("--inference_skip_factor", type=int, default=16, help="the quickstart's 16 (7 start points)")
    p.add_argument("--recon_steps", type=int, default=5, help="the quickstart's 5")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: what --amp=1 picks on this machine")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cpu")
    precision = resolve_precision(device, precision=args.precision, amp=args.precision is None)
    print(f"device: {describe_device(device)}; cpu capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"precision: {precision}")
    images, keys = _images(args.images_csv, args.batch_size)
    print(f"images: {len(images)} x {'x'.join(map(str, images.shape[1:]))} "
          f"({args.images_csv or 'random'}); start points every {args.inference_skip_factor}-th of "
          f"{args.num_inference_steps}; recon_steps {args.recon_steps}")
    with tempfile.TemporaryDirectory() as tmp:
        pixel, latent = _untrained_checkpoints(Path(tmp))
        pixel = args.pixel_checkpoint or pixel
        latent = args.latent_checkpoint or latent
        pixel_speed, pixel_what = time_model(pixel, images, keys, args, precision)
        print(f"pixel_images_per_s: {pixel_speed:.2f}  [{pixel_what}]")
        latent_speed, latent_what = time_model(latent, images, keys, args, precision)
        print(f"latent_images_per_s: {latent_speed:.2f}  [{latent_what}]")
    print(f"latent_vs_pixel: {latent_speed / pixel_speed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
