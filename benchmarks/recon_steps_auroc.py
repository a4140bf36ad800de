"""What ``--recon_steps`` costs in AUROC and saves in time, on the quickstart's trained model.

For each N (and ``full``: the paper's whole PLMS path from every start t) this runs the entry scripts exactly as a
user would, ``reconstruct.py`` (validation, Fashion-MNIST test, MNIST test) then ``ood_detection.py``, on the
quickstart's checkpoint and settings (skip factor 16, the first 200 images of each set, --amp=1), and prints per N (and
per noise seed, ``--seeds``): the network evaluations per image, the reconstruction wall time, and the
FashionMNIST-vs-MNIST AUROC of each score. With 200 images per set the AUROC moves between noise seeds; compare N
with the full path at the same seed, and look at the spread over seeds before reading much into a difference.

Each N works in its own model directory under ``--work_dir`` (the checkpoint is hard-linked or copied there) and
starts from an empty ``ood/`` folder, so every time is a whole run, never a resumed one.

Usage (repository root, venv active, after ``bash scripts/quickstart.sh``)::

    python benchmarks/recon_steps_auroc.py                        # N = 5, 10, 20 and full: ~20 min on 2 cores
    python benchmarks/recon_steps_auroc.py --recon_steps 10 --seeds 3,4,5,6      # the spread over noise draws
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.reconstruction.engine import evaluations_per_image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The quickstart's schedule and reconstruction settings (scripts/quickstart.sh).
SCHEDULE_FLAGS = ["--beta_schedule=scaled_linear_beta", "--beta_start=0.0015", "--beta_end=0.0195"]
NUM_INFERENCE_STEPS = 100
SCORES = ("mse+perceptual", "mse", "perceptual")


def parse_seeds(text: str) -> list[int]:
    """'2,3' -> [2, 3]."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds: {text!r} is not a comma-separated list of integers") from None


def parse_steps(text: str) -> list[int | None]:
    """'5,10,full' -> [5, 10, None]; None is the full path."""
    steps: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "full":
            steps.append(None)
        elif item.isdigit() and int(item) >= 1:
            steps.append(int(item))
        else:
            raise UserError(f"--recon_steps: {item!r} is neither a positive integer nor 'full'")
    return steps


def prepare_model_dir(checkpoint: Path, work_dir: Path, name: str) -> None:
    """<work_dir>/<name>/checkpoint.pth (hard link, or a copy across file systems) and no ood/ results yet."""
    model_dir = work_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / "checkpoint.pth"
    if not target.exists():
        try:
            os.link(checkpoint, target)
        except OSError:
            shutil.copy2(checkpoint, target)
    shutil.rmtree(model_dir / "ood", ignore_errors=True)


def run(cmd: list[str]) -> float:
    """Run an entry script (its output passes through); wall seconds. A failure stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise UserError(f"{Path(cmd[1]).name} failed with exit code {done.returncode}: {' '.join(cmd)}")
    return time.perf_counter() - started


def sweep_one(args: argparse.Namespace, recon_steps: int | None, seed: int) -> dict:
    label = "full" if recon_steps is None else str(recon_steps)
    name = f"{args.model_name}_recon_steps_{label}_seed_{seed}"
    prepare_model_dir(args.checkpoint, args.work_dir, name)
    splits = args.quickstart_dir / "data" / "data_splits"
    reconstruct = [
        sys.executable, "reconstruct.py", f"--output_dir={args.work_dir}", f"--model_name={name}",
        f"--validation_ids={splits / 'FashionMNIST_val.csv'}", f"--in_ids={splits / 'FashionMNIST_test.csv'}",
        f"--out_ids={splits / 'MNIST_test.csv'}", "--is_grayscale=1", *SCHEDULE_FLAGS,
        f"--num_inference_steps={NUM_INFERENCE_STEPS}", f"--inference_skip_factor={args.skip_factor}",
        f"--first_n_val={args.n}", f"--first_n={args.n}", f"--batch_size={args.batch_size}", "--num_workers=0",
        f"--amp={args.amp}", "--run_val=1", "--run_in=1", "--run_out=1", f"--seed={seed}",
    ]
    if recon_steps is not None:
        reconstruct.append(f"--recon_steps={recon_steps}")
    print(f"== recon_steps={label} seed={seed}", file=sys.stderr, flush=True)
    seconds = run(reconstruct)
    run([sys.executable, "ood_detection.py", f"--output_dir={args.work_dir}", f"--model_name={name}"])
    summary = json.loads((args.work_dir / name / "ood" / "summary.json").read_text())
    aurocs = {row["score"]: row["auroc"] for row in summary["summary"] if row["out_set"] == "MNIST"}
    return {
        "recon_steps": label,
        "seed": seed,
        "evaluations_per_image": evaluations_per_image(
            start_timesteps(NUM_INFERENCE_STEPS, args.skip_factor), NUM_INFERENCE_STEPS, recon_steps
        ),
        "reconstruct_s": seconds,
        "images": 3 * args.n,
        **{f"auroc_{score}": aurocs[score] for score in SCORES},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart_dir", type=Path, default=Path("runs/quickstart"),
                   help="the quickstart's run folder (data/ and output/; default runs/quickstart)")
    p.add_argument("--model_name", default="fashionmnist_tiny_fast",
                   help="the quickstart's model name (default fashionmnist_tiny_fast)")
    p.add_argument("--recon_steps", type=parse_steps, default=parse_steps("5,10,20,full"),
                   help="comma-separated N values and/or 'full' (default 5,10,20,full)")
    p.add_argument("--seeds", type=parse_seeds, default=[2],
                   help="comma-separated noise seeds (reconstruct.py --seed; default 2, its default)")
    p.add_argument("--n", type=int, default=200, help="images per set: validation, in, MNIST (default 200)")
    p.add_argument("--skip_factor", type=int, default=16, help="--inference_skip_factor (default 16, the quickstart's)")
    p.add_argument("--batch_size", type=int, default=50, help="reconstruct.py --batch_size (default 50)")
    p.add_argument("--amp", type=int, choices=(0, 1), default=1,
                   help="reconstruct.py --amp (default 1: bf16 on a CPU with native bf16, else fp32)")
    p.add_argument("--work_dir", type=Path, default=None,
                   help="where the per-N model folders go (default <quickstart_dir>/recon_steps_sweep)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quickstart_dir = args.quickstart_dir.resolve()
    args.checkpoint = args.quickstart_dir / "output" / args.model_name / "checkpoint.pth"
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: no checkpoint; run `bash scripts/quickstart.sh` first")
    if args.n < 1 or args.skip_factor < 1 or args.batch_size < 1:
        raise UserError("--n, --skip_factor and --batch_size must be >= 1")
    args.work_dir = (args.work_dir or args.quickstart_dir / "recon_steps_sweep").resolve()
    rows = [sweep_one(args, steps, seed) for seed in args.seeds for steps in args.recon_steps]
    full = {r["seed"]: r for r in rows if r["recon_steps"] == "full"}
    header = ["recon_steps", "seed", "evaluations_per_image", "reconstruct_s", "images_per_s",
              *[f"auroc_{s}" for s in SCORES]]
    if full:
        header += ["auroc_minus_full", "time_vs_full"]  # against the full path at the same seed
    print("\t".join(header))
    for r in rows:
        cells = [r["recon_steps"], str(r["seed"]), str(r["evaluations_per_image"]), f"{r['reconstruct_s']:.1f}",
                 f"{r['images'] / r['reconstruct_s']:.2f}", *[f"{r[f'auroc_{s}']:.4f}" for s in SCORES]]
        if full:
            ref = full.get(r["seed"])
            cells += [f"{r[f'auroc_{SCORES[0]}'] - ref[f'auroc_{SCORES[0]}']:+.4f}" if ref else "",
                      f"{r['reconstruct_s'] / ref['reconstruct_s']:.3f}" if ref else ""]
        print("\t".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
