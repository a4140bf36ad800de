"""ood_detection.py: score every image from its reconstruction errors and report how well OOD sets are detected.

Reads ``<output_dir>/<model_name>/ood/results_{val,in,<Name>}.csv`` and writes summary.csv, summary.json,
auroc_per_t.csv and three plots beside them; what is computed and how is ``ddpm_ood.ood.detection``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.options import field_default, positive_int
from ddpm_ood.families import score_names
from ddpm_ood.ood import stage
from ddpm_ood.ood.stage import OUTPUT_FILES, DetectionJob, run_detection

__all__ = ["OUTPUT_FILES", "build_parser", "main"]


def _name_list(value: str) -> list[str]:
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {value!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ood_detection.py",
        description=(__doc__.split("\n\n")[0] + "\n\n" + stage.__doc__.split("\n\n", 1)[1]).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    def default(name: str):
        return field_default(DetectionJob, name)

    p.add_argument("--seed", type=int, default=default("seed"),
                   help=f"seeds the only random draw here, the image sample of zscore_vs_t.png (default "
                   f"{default('seed')})")
    p.add_argument("--output_dir", type=str, required=True, help="root of all runs (as for reconstruct.py)")
    p.add_argument("--model_name", type=_name_list, required=True,
                   help="run name(s); a comma list is processed one after the other")
    p.add_argument("--max_t", type=int, default=default("max_t"),
                   help=f"use start points t < max_t only (strict; default {default('max_t')} = all)")
    p.add_argument("--min_t", type=int, default=default("min_t"),
                   help=f"use start points t > min_t only (strict; default {default('min_t')} = all)")
    p.add_argument("--t_skip", type=positive_int, default=default("t_skip"),
                   help="use every k-th validation start point, ascending from the first, before the t window "
                        f"(as reconstruct.py --inference_skip_factor=k would have run; default {default('t_skip')} = "
                        "all)")
    p.add_argument("--out_sets", type=_name_list, default=default("out_sets"),
                   help="comma list of out sets to evaluate (names of results_<Name>.csv); default: all present")
    p.add_argument("--score", choices=score_names(), default=default("score"),
                   help="score for the printed AUC lines and the ROC plot (every score found goes to summary.csv): "
                        f"{', '.join(score_names())} (default: the first of these present, the paper's "
                        "mse+perceptual when reconstruct.py computed it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_detection(DetectionJob(output_dir=args.output_dir, model_names=tuple(args.model_name), min_t=args.min_t,
                               max_t=args.max_t, t_skip=args.t_skip, out_sets=args.out_sets, score=args.score,
                               seed=args.seed))
    return 0
