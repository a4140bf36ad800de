"""get_datasets.py: FashionMNIST, MNIST, CIFAR10, SVHN and CelebA to .npy images and split CSVs.

Upstream's ``get_computer_vision_datasets.py`` (README name ``get_datasets.py``), same flags. A dataset that
can be neither found nor downloaded is reported in one line; the others are still prepared, and the exit
status is 1 at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ddpm_ood.cli.options import boolish, positive_float
from ddpm_ood.data.prepare import DATASETS, DOWNLOAD_TIMEOUT_S, DatasetUnavailable, prepare_dataset


def dataset_list(value: str) -> tuple[str, ...]:
    """"MNIST,CIFAR10" -> ("MNIST", "CIFAR10") (any case, duplicates dropped); unknown names are a parse error."""
    canonical = {n.lower(): n for n in DATASETS}
    names: list[str] = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() not in canonical:
            raise argparse.ArgumentTypeError(f"unknown dataset {part!r}; accepted: {', '.join(DATASETS)}")
        if canonical[part.lower()] not in names:
            names.append(canonical[part.lower()])
    if not names:
        raise argparse.ArgumentTypeError(f"no dataset named; accepted: {', '.join(DATASETS)}")
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="get_datasets.py",
        description="Download (or use raw files already present) and convert the computer-vision datasets to one "
        ".npy per image under <data_root>/<Name>/numpy/ and split CSVs under <data_root>/data_splits/. "
        "Re-running skips images already written.",
    )
    p.add_argument("--data_root", type=str, required=True,
                   help="root folder for raw files, .npy images and data_splits/ (relative paths are kept "
                   "relative in the CSVs, i.e. relative to the directory the later stages run from)")
    p.add_argument("--download_celeba", type=boolish, default=True,
                   help="1/0/true/false: prepare CelebA (Google-Drive download needs gdown and often hits quota; "
                   "raw files already in <data_root>/CelebA/raw/celeba are used without download). "
                   "False skips CelebA. Default true")
    p.add_argument("--datasets", type=dataset_list, default=DATASETS, metavar="NAMES",
                   help=f"comma-separated subset of {','.join(DATASETS)} (default: all)")
    p.add_argument("--download", type=boolish, default=True,
                   help="1/0: allow downloading raw files that are not present (default 1; 0 = offline only)")
    p.add_argument("--download_timeout", type=positive_float, default=DOWNLOAD_TIMEOUT_S,
                   help=f"network timeout in seconds for each download request (default {DOWNLOAD_TIMEOUT_S:g})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ddpm_ood.io import check_output_dir

    args = build_parser().parse_args(argv)
    check_output_dir(args.data_root, "--data_root")
    names = list(args.datasets)
    if "CelebA" in names and not args.download_celeba:
        names.remove("CelebA")
        print("CelebA: skipped (--download_celeba=False)", flush=True)
    failed: list[str] = []
    done: list[str] = []
    for name in names:
        start = time.perf_counter()
        try:
            counts = prepare_dataset(name, args.data_root, allow_download=args.download,
                                     timeout_s=args.download_timeout)
        except DatasetUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        done.append(name)
        sizes = "/".join(str(counts[s]) for s in ("train", "val", "test"))
        print(f"{name}: train/val/test = {sizes} images ({time.perf_counter() - start:.1f} s)", flush=True)
    if failed:
        kept = f"; prepared: {', '.join(done)}" if done else ""
        print(f"error: not prepared: {', '.join(failed)}{kept}", file=sys.stderr)
        return 1
    return 0
