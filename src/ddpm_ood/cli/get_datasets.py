"""get_datasets.py: the data stage for every registered dataset (data.sources): split CSVs under
``<data_root>/data_splits/``.

Upstream's ``get_computer_vision_datasets.py`` (README name ``get_datasets.py``), same flags; by default the five
computer-vision sets, ``--datasets=MedNIST,Decathlon,MedMNIST3D`` (or single names) for the medical families.
Upstream's per-family scripts (``src/data/get_mednist_datasets.py``, ``get_decathlon_datasets.py``,
``get_3dmedmnist.py``) run the same stage through ``family_parser``/``family_main``. A dataset that can be neither
found nor downloaded does not stop the others: each is named at the end in one line saying where its files were
expected, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from ddpm_ood.cli.options import boolish, field_default, positive_float
from ddpm_ood.data.sources import COMPUTER_VISION, family_of
from ddpm_ood.data.stage import (
    DATASETS,
    GROUPS,
    PreparationJob,
    run_preparation,
)


def dataset_list_type(accepted: Sequence[str], groups: dict[str, tuple[str, ...]]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: "MNIST,CIFAR10" -> ("MNIST", "CIFAR10") (any case, duplicates dropped), a group name
    (``GROUPS``) standing for its members; names outside ``accepted`` are a parse error listing the accepted ones."""
    canonical = {n.lower(): (n,) for n in accepted}
    canonical.update({g.lower(): members for g, members in groups.items() if set(members) <= set(accepted)})
    listed = ", ".join([*accepted, *(g for g in groups if g.lower() in canonical)])

    def parse(value: str) -> tuple[str, ...]:
        names: list[str] = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if part.lower() not in canonical:
                raise argparse.ArgumentTypeError(f"unknown dataset {part!r}; accepted: {listed}")
            names += [n for n in canonical[part.lower()] if n not in names]
        if not names:
            raise argparse.ArgumentTypeError(f"no dataset named; accepted: {listed}")
        return tuple(names)

    return parse


dataset_list = dataset_list_type(DATASETS, GROUPS)


def add_download_options(p: argparse.ArgumentParser) -> None:
    download, timeout = field_default(PreparationJob, "allow_download"), field_default(PreparationJob, "timeout_s")
    p.add_argument("--download", type=boolish, default=download,
                   help=f"1/0: allow downloading files that are not present (default {int(download)}; 0 = offline only)")
    p.add_argument("--download_timeout", type=positive_float, default=timeout,
                   help=f"network timeout in seconds for each download request (default {timeout:g})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="get_datasets.py",
        description="Download (or use files already present) and prepare datasets: the computer-vision sets become "
        "one .npy per image under <data_root>/<Name>/numpy/; the medical families are used in their libraries' "
        "layouts under <data_root> (MedNIST/, Decathlon/, MedMNIST3D/). Split CSVs go to <data_root>/data_splits/. "
        "Re-running skips finished work.",
    )
    p.add_argument("--data_root", type=str, required=True,
                   help="root folder for raw files, images and data_splits/ (relative paths are kept "
                   "relative in the CSVs, i.e. relative to the directory the later stages run from)")
    p.add_argument("--download_celeba", type=boolish, default=True,
                   help="1/0/true/false: prepare CelebA (Google-Drive download needs gdown and often hits quota; "
                   "raw files already in <data_root>/CelebA/raw/celeba are used without download). "
                   "False skips CelebA. Default true")
    p.add_argument("--datasets", type=dataset_list, default=COMPUTER_VISION, metavar="NAMES",
                   help=f"comma-separated dataset names or groups ({', '.join(GROUPS)}); default: the five "
                   f"computer-vision sets {','.join(COMPUTER_VISION)}. Accepted: {', '.join(DATASETS)}")
    add_download_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ddpm_ood.fileio import check_output_dir

    args = build_parser().parse_args(argv)
    check_output_dir(args.data_root, "--data_root")
    names = list(args.datasets)
    if "CelebA" in names and not args.download_celeba:
        names.remove("CelebA")
        print("CelebA: skipped (--download_celeba=False)", flush=True)
    return run_preparation(PreparationJob(tuple(names), args.data_root, allow_download=args.download,
                                          timeout_s=args.download_timeout))


# ---------------------------------------------------------------------------------------------------------------
# Upstream's per-family scripts: --data_root is the FAMILY's folder (the root_dir MONAI / medmnist download into).


def family_parser(prog: str, group: str, what: str) -> argparse.ArgumentParser:
    """The parser of upstream's script for one family (``group``, a key of ``GROUPS``); ``what`` describes it."""
    members = GROUPS[group]
    folder = family_of(members[0]).folder
    splits = "<parent of data_root>/data_splits" if folder else "<data_root>/data_splits"
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"{what}. Files already under --data_root in the library's own layout are used offline; "
        f"missing ones are downloaded. Split CSVs go to {splits}/ (as upstream). The same stage as "
        f"get_datasets.py --datasets={group}. Re-running skips finished work.",
    )
    p.add_argument("--data_root", type=str, required=True,
                   help=f"the folder the data are downloaded to / found in (get_datasets.py uses "
                   f"<data_root>/{folder or '.'})")
    p.add_argument("--datasets", type=dataset_list_type(members, {group: members}), default=members,
                   metavar="NAMES", help=f"comma-separated subset of {', '.join(members)} (default: all)")
    add_download_options(p)
    return p


def family_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Run an upstream per-family script: CSVs under the family folder's parent when the family has its own folder
    under the data root (Decathlon, MedMNIST3D), else under the folder itself (MedNIST), as upstream."""
    from ddpm_ood.fileio import check_output_dir

    args = parser.parse_args(argv)
    source_root = args.data_root
    check_output_dir(source_root, "--data_root")
    folder = family_of(args.datasets[0]).folder
    data_root = (os.path.dirname(os.path.normpath(source_root)) or ".") if folder else source_root
    return run_preparation(PreparationJob(tuple(args.datasets), data_root, allow_download=args.download,
                                          timeout_s=args.download_timeout, source_root=source_root))
