"""score.py: score new images with a trained model; flag those above a threshold calibrated on validation data.

Each input is reconstructed exactly as reconstruct.py would (settings from results_val.json) and given the default
mse+perceptual score against results_val.csv (higher = more OOD). Writes <out_csv> with the columns
path,score,is_ood,mse_score,perceptual_score,error (one row per input; error is empty when scored) and
<out_csv>.json with the threshold and its expected false-positive rate.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ddpm_ood.cli.options import (
    add_max_batch_option,
    add_precision_options,
    checked_number,
    optional_path,
    positive_int,
)

_val_keep = checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The checkpoint, EMA choice, seed, --num_inference_steps, --inference_skip_factor and --recon_steps "
        "come from <output_dir>/<model_name>/ood/results_val.json (written by reconstruct.py --run_val=1), "
        "so the scores are comparable with the validation results.",
    )
    p.add_argument("--output_dir", type=str, required=True, help="root of all runs")
    p.add_argument("--model_name", type=str, required=True, help="run name: reads <output_dir>/<model_name>/")
    p.add_argument("--inputs", type=str, required=True,
                   help="a folder (its .png .jpg .jpeg .npy .nii .nii.gz files, sorted), a split CSV, or image "
                   "files separated by commas")
    p.add_argument("--out_csv", type=str, required=True,
                   help="where to write the scores; the threshold goes to <out_csv>.json")
    p.add_argument("--val_keep", type=_val_keep, default=0.95,
                   help="flag inputs scoring above this quantile of the validation scores: about 1 - val_keep of "
                   "in-distribution inputs are flagged (default 0.95)")
    p.add_argument("--batch_size", type=positive_int, default=64,
                   help="images reconstructed together (default 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available, else cpu")
    p.add_argument("--vqvae_checkpoint", type=optional_path, default=None,
                   help="latent models: where their VQ-VAE is now (default: the path recorded in the checkpoint; "
                   "its weights must be the recorded ones)")
    add_precision_options(p, amp_default=None)
    add_max_batch_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ddpm_ood.devices import describe_device
    from ddpm_ood.errors import UserError
    from ddpm_ood.io import atomic_write_csv, atomic_write_text, check_output_dir
    from ddpm_ood.ood.scorer import OODScorer, collect_inputs
    from ddpm_ood.ood.zscore import DEFAULT_SCORE
    from ddpm_ood.results.schema import VAL_NAME, results_path

    args = build_parser().parse_args(argv)
    out_csv = Path(args.out_csv)
    if out_csv.is_dir():
        raise UserError(f"--out_csv: {out_csv} is a folder; give a file name such as {out_csv / 'scores.csv'}")
    check_output_dir(out_csv.parent, "--out_csv")  # created if missing, as every stage's output folder
    inputs = collect_inputs(args.inputs)
    scorer = OODScorer.from_run(
        args.output_dir, args.model_name, device=args.device, val_keep=args.val_keep,
        batch_size=args.batch_size, amp=args.amp, precision=args.precision, max_batch=args.max_batch,
        vqvae_checkpoint=args.vqvae_checkpoint,
    )
    cal = scorer.calibration
    val_path = results_path(args.output_dir, args.model_name, VAL_NAME)
    print(f"device: {describe_device(scorer.device)}; precision: {scorer.settings.precision} (as {val_path.name})")
    print(
        f"threshold {cal.threshold:.6g}: the {cal.val_keep:.1%} quantile of the {DEFAULT_SCORE} score over "
        f"{cal.n_val} validation images; expected false-positive rate {cal.expected_fpr:.1%} "
        f"(validation images above it: {cal.val_fpr:.1%})"
    )
    result = scorer.score(inputs, progress=True)

    n_failed = int((result["error"] != "").sum())
    n_scored = len(result) - n_failed
    n_flagged = int(result["is_ood"].fillna(False).sum())
    atomic_write_csv(result, out_csv)
    summary = {
        **cal.to_dict(),
        "score": DEFAULT_SCORE,
        "validation_results": str(val_path.resolve()),
        "reconstruction": scorer.settings.to_dict(),
        "precision": scorer.settings.precision,
        "inputs": args.inputs,
        "n_inputs": len(result),
        "n_scored": n_scored,
        "n_flagged": n_flagged,
        "n_failed": n_failed,
    }
    atomic_write_text(Path(f"{out_csv}.json"), json.dumps(summary, indent=2))
    print(f"{n_flagged} of {n_scored} scored inputs flagged as OOD, {n_failed} failed; wrote {out_csv}")
    return 0
