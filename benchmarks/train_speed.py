"""Training throughput (images/s) of the UNet presets per precision (fp32 vs bf16 on CPU; fp32, tf32, bf16, fp16 on
CUDA), side by side in one run. The first line names the CPU kind: bf16 is native only with AVX512-BF16/AMX, and
20-30x slower than fp32 where it is emulated (AVX2), so figures hold for the CPU kind they were measured on.

Each row times ``ddpm_ood.training.ddpm.train_step`` - the exact step of train_ddpm.py: add_noise, forward under
autocast, fp32 MSE against the training target, backward, Adam step - on seeded random images of Fashion-MNIST's
shape (28x28x1; the 3-level presets downsample twice, 28 -> 14 -> 7, so 28 fits) with per-step seeded (t, noise).
Warm-up steps (oneDNN primitive creation, allocator growth) are not timed. Speed does not depend on the weights.

Printed to stdout: one line per setting, then a table (preset, precision, batch, s/step, images/s, vs fp32).

Usage (repository root, venv active)::

    python benchmarks/train_speed.py --quick          # tiny and small, batch 8, 3 timed steps (~1-2 min on 2 cores)
    python benchmarks/train_speed.py                  # batch 32, 10 timed steps
    python benchmarks/train_speed.py --presets=tiny --batch_size=64 --steps=20 --threads=2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ddpm_ood.cli.options import positive_int
from ddpm_ood.config import ScheduleConfig
from ddpm_ood.devices import (
    DEVICE_CHOICES,
    PRECISIONS,
    configure_precision,
    describe_device,
    make_grad_scaler,
    resolve_device,
)
from ddpm_ood.diffusion.schedule import make_ddpm_scheduler
from ddpm_ood.diffusion.unet import MODEL_PRESETS, build_unet, model_config_from_preset, wants_fused_attention
from ddpm_ood.training.ddpm import draw_train_noise, train_step

# The upstream README's Fashion-MNIST recipe; speed does not depend on it.
SCHEDULE = ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195)


def measure(preset: str, precision: str, batch_size: int, steps: int, warmup: int, image_size: int,
            device: torch.device, seed: int = 0) -> dict:
    """Time ``steps`` training steps after ``warmup`` untimed ones. Returns seconds per step (median) and images/s."""
    torch.manual_seed(seed)
    # As training builds it: fused attention and cuDNN autotuning on CUDA.
    model = build_unet(model_config_from_preset(preset, 2, 1), fused_attention=wants_fused_attention(device))
    model = model.to(device).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=2.5e-5)
    configure_precision(precision, device)
    scaler = make_grad_scaler(device, precision)
    scheduler = make_ddpm_scheduler(SCHEDULE)
    images = torch.rand((batch_size, 1, image_size, image_size), generator=torch.Generator().manual_seed(seed))
    images = images.to(device)
    times, losses = [], []
    for step in range(warmup + steps):
        timesteps, noise = draw_train_noise(seed, 0, step, 0, tuple(images.shape), SCHEDULE.num_train_timesteps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = train_step(model, optimizer, scheduler, images, timesteps.to(device), noise.to(device), SCHEDULE,
                          precision=precision, scaler=scaler)
        losses.append(float(loss))  # .item() synchronises, as the training loop's progress bar does
        if step >= warmup:
            times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    return {"preset": preset, "precision": precision,
            "batch": batch_size, "s_per_step": per_step, "images_per_s": batch_size / per_step,
            "mean_s_per_step": statistics.fmean(times), "final_loss": losses[-1],
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training throughput of the UNet presets per precision.")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up + 3 timed steps")
    parser.add_argument("--presets", type=str, default="tiny,small",
                        help=f"comma-separated presets out of {', '.join(MODEL_PRESETS)} (default tiny,small)")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="images per step (default 32; 8 quick)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 10; 3 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 quick)")
    parser.add_argument("--image_size", type=positive_int, default=28, help="square image side (default 28)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="default cpu")
    parser.add_argument("--precisions", type=str, default=None,
                        help=f"comma-separated, out of {', '.join(PRECISIONS)} (default fp32,bf16 on CPU; all four on "
                        "CUDA)")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in MODEL_PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; accepted: {', '.join(MODEL_PRESETS)}")
    batch = args.batch_size or (8 if args.quick else 32)
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precisions = [p.strip() for p in (args.precisions or ("fp32,bf16" if device.type == "cpu" else
                                                            ",".join(PRECISIONS))).split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions: accepted {', '.join(PRECISIONS)}")
    print(f"device: {describe_device(device)}")
    print(f"torch={torch.__version__} image=1x{args.image_size}x{args.image_size} batch={batch} "
          f"steps={steps} warmup={warmup}")
    rows = []
    for preset in presets:
        for precision in precisions:
            row = measure(preset, precision, batch, steps, warmup, args.image_size, device)
            rows.append(row)
            print(f"  {preset:>5} {row['precision']}: {row['s_per_step']:.3f} s/step, "
                  f"{row['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    print()
    header = f"{'preset':<10}{'params':>9}{'precision':>10}{'batch':>7}{'s/step':>9}{'images/s':>10}{'vs fp32':>9}"
    print(header)
    print("-" * len(header))
    fp32 = {r["preset"]: r["images_per_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        print(f"{r['preset']:<10}{r['params_M']:>8.2f}M{r['precision']:>10}{r['batch']:>7}{r['s_per_step']:>9.3f}"
              f"{r['images_per_s']:>10.1f}" + (f"{r['images_per_s'] / fp32[r['preset']]:>8.2f}x"
                                                 if r["preset"] in fp32 else f"{'-':>9}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
