"""score.py: score new images with a trained model; flag those above a threshold calibrated on validation data.

Each input gets the chosen score exactly as reconstruct.py + ood_detection.py would give it (settings from the
validation files' sidecars; higher = more OOD): the reconstruction scores (default, the paper's mse+perceptual)
reconstruct it from every start t; a feature family computes only its own features, with no reconstruction; the
ensemble computes what its members need. Writes <out_csv> with the columns
path,score,is_ood,mse_score,perceptual_score,error (one row per input; error is empty when scored; the two
reconstruction columns are NaN where the score needs no reconstruction) and <out_csv>.json with the threshold and
its expected false-positive rate.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.options import (
    add_max_batch_option,
    add_precision_options,
    add_pretrained_options,
    checked_number,
    compute_options,
    field_default,
    optional_path,
    positive_int,
)
from ddpm_ood.families import score_names
from ddpm_ood.ood.stage import ScoringJob, run_scoring

_val_keep = checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The checkpoint, EMA choice, seed, --num_inference_steps, --inference_skip_factor, --recon_steps, "
        "the noise protocols and every family's settings come from the validation files' sidecars "
        "(<output_dir>/<model_name>/ood/results_val.json, <family>/features_val.json, written by reconstruct.py "
        "--run_val=1), so the scores are comparable with the validation results.",
    )

    def default(name: str):
        return field_default(ScoringJob, name)

    compute = default("compute")

    p.add_argument("--output_dir", type=str, required=True, help="root of all runs")
    p.add_argument("--model_name", type=str, required=True, help="run name: reads <output_dir>/<model_name>/")
    p.add_argument("--inputs", type=str, required=True,
                   help="a folder (its .png .jpg .jpeg .npy .nii .nii.gz files, sorted), a split CSV, or image "
                   "files separated by commas")
    p.add_argument("--out_csv", type=str, required=True,
                   help="where to write the scores; the threshold goes to <out_csv>.json")
    p.add_argument("--score", choices=score_names(), default=default("score"),
                   help="the score that flags inputs: the paper's reconstruction scores, a score family (needs "
                   "reconstruct.py --run_val=1 --scores=<family> first) or ensemble (default "
                   f"{default('score')})")
    p.add_argument("--val_keep", type=_val_keep, default=default("val_keep"),
                   help="flag inputs scoring above this quantile of the validation scores: about 1 - val_keep of "
                   f"in-distribution inputs are flagged (default {default('val_keep')})")
    p.add_argument("--batch_size", type=positive_int, default=compute.batch_size,
                   help=f"images reconstructed together (default {compute.batch_size})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=compute.device,
                   help="auto = cuda if available, else cpu")
    p.add_argument("--vqvae_checkpoint", type=optional_path, default=default("vqvae_checkpoint"),
                   help="latent models: where their VQ-VAE is now (default: the path recorded in the checkpoint; "
                   "its weights must be the recorded ones)")
    add_precision_options(p, amp_default=compute.amp)
    add_max_batch_option(p, compute)
    add_pretrained_options(p, ScoringJob, scoring=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    compute = compute_options(args)
    run_scoring(ScoringJob(output_dir=args.output_dir, model_name=args.model_name, inputs=args.inputs,
                           out_csv=args.out_csv, score=args.score, val_keep=args.val_keep,
                           vqvae_checkpoint=args.vqvae_checkpoint, pretrained=args.pretrained,
                           pretrained_flags=args.pretrained_flags, compute=compute))
    return 0
