"""What periodic mid-epoch checkpoints (``--checkpoint_every_minutes``) cost: the same DDPM training, timed without
mid-epoch checkpoints, with the default interval, and with a short interval (``--short_minutes``) that makes them
happen during this short run, alternating in one process; the ratios of the wall times, the size of one checkpoint
and how long rank 0 takes to write it (``checkpoint_mb``, ``write_s``), and the share that write takes of the
default interval (``write_share_of_default``: the cost of the default on any run longer than it).

Each run is ``ddpm_ood.training.ddpm.train`` (the loop of train_ddpm.py: steps, validation, checkpoints) on seeded
random images in memory, one process, in a temporary folder; a run shorter than the default interval writes no
mid-epoch checkpoint at the default, so there the ratio measures only the per-step stop/checkpoint check.
Mid-epoch checkpoints are spaced at least 50x their write time (``training.loop.MAX_CHECKPOINT_SHARE``), so even
the short interval may not cost more than 2%.

The wall-time ratios carry the run-to-run noise of the machine (other jobs); ``mid_epoch_share_<setting>`` is measured
inside each run instead: the seconds spent writing mid-epoch checkpoints over the run's wall time (median of the
runs), which is their cost.

Printed to stdout: one line per run, then ``key: value`` lines ending with ``ratio_default_vs_none``.

Usage (repository root, venv active)::

    python benchmarks/checkpoint_cost.py --threads=1           # tiny preset, 28x28, ~2-3 min on 2 cores
    python benchmarks/checkpoint_cost.py --preset=small --train_images=64 --repeats=1   # the small preset's state
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ddpm_ood.checkpoint import MID_EPOCH_CHECKPOINT  # noqa: E402
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig  # noqa: E402
from ddpm_ood.diffusion.unet import model_config_from_preset  # noqa: E402
from ddpm_ood.training import loop  # noqa: E402
from ddpm_ood.training.ddpm import train  # noqa: E402
from ddpm_ood.training.loop import DEFAULT_CHECKPOINT_MINUTES, TrainConfig  # noqa: E402


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand((n, 1, size, size), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}


def timed_run(run_config: RunConfig, cfg: TrainConfig, train_set, val_set) -> float:
    """Wall seconds of one training run."""
    started = time.perf_counter()
    train(run_config, cfg, train_set, val_set)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="UNet preset (default tiny)")
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--train_images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternating (default 3)")
    p.add_argument("--short_minutes", type=float, default=0.05,
                   help="the short interval, in minutes, that makes mid-epoch checkpoints happen (default 0.05)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_config_from_preset(args.preset, 2, 1)
    run_config = RunConfig(model, ScheduleConfig(), DataConfig(is_grayscale=True), (1, args.image_size, args.image_size))
    train_set = RandomImages(args.train_images, args.image_size, 0)
    val_set = RandomImages(max(args.batch_size, 4), args.image_size, 1)

    writes: list[tuple[str, float, int]] = []
    real_save = loop.save_checkpoint

    def recorded_save(path, payload):
        started = time.perf_counter()
        real_save(path, payload)
        writes.append((Path(path).name, time.perf_counter() - started, Path(path).stat().st_size))

    loop.save_checkpoint = recorded_save
    settings = {"none": 0.0, "default": DEFAULT_CHECKPOINT_MINUTES, "short": args.short_minutes}
    times: dict[str, list[float]] = {name: [] for name in settings}
    mid_counts: dict[str, list[int]] = {name: [] for name in settings}
    mid_shares: dict[str, list[float]] = {name: [] for name in settings}
    print(f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads; preset {args.preset}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.train_images} images x {args.epochs} epochs", flush=True)
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as tmp:
        # Untimed warm-up (oneDNN primitives, allocator, lazy imports), then the timed runs, alternating.
        timed_run(run_config, TrainConfig(run_dir=str(Path(tmp) / "warmup"), n_epochs=1, eval_freq=1,
                                          checkpoint_every=0, batch_size=args.batch_size, num_workers=0,
                                          sample_steps=0, checkpoint_every_minutes=0), train_set, val_set)
        writes.clear()
        for repeat in range(args.repeats):
            for name, minutes in settings.items():
                cfg = TrainConfig(run_dir=str(Path(tmp) / f"{name}{repeat}"), n_epochs=args.epochs, eval_freq=1,
                                  checkpoint_every=0, batch_size=args.batch_size, num_workers=0, seed=0,
                                  ema_decay=0.999, sample_steps=0, checkpoint_every_minutes=minutes)
                before = len(writes)
                seconds = timed_run(run_config, cfg, train_set, val_set)
                mid_writes = [w for n, w, _ in writes[before:] if n == MID_EPOCH_CHECKPOINT]
                times[name].append(seconds)
                mid_counts[name].append(len(mid_writes))
                mid_shares[name].append(sum(mid_writes) / seconds)
                print(f"run {repeat + 1} {name} ({minutes:g} min): {seconds:.2f} s, {len(mid_writes)} mid-epoch "
                      f"checkpoint(s) written in {sum(mid_writes):.3f} s", flush=True)
    loop.save_checkpoint = real_save
    median = {name: statistics.median(values) for name, values in times.items()}
    write_s = statistics.median(s for _, s, _ in writes)
    size_mb = statistics.median(b for _, _, b in writes) / 1e6
    print(f"checkpoint_mb: {size_mb:.1f}")
    print(f"write_s: {write_s:.3f}")
    print(f"write_share_of_default: {write_s / (60 * DEFAULT_CHECKPOINT_MINUTES):.5f}")
    print(f"mid_epoch_checkpoints_short: {statistics.median(mid_counts['short']):g}")
    print(f"mid_epoch_share_short: {statistics.median(mid_shares['short']):.5f}")
    print(f"mid_epoch_share_default: {statistics.median(mid_shares['default']):.5f}")
    print(f"ratio_short_vs_none: {median['short'] / median['none']:.4f}")
    print(f"ratio_default_vs_none: {median['default'] / median['none']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
