"""src/data/get_mednist_datasets.py: upstream's script and flag (--data_root: the download folder).

MONAI's MedNIST: each class (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT) an in-distribution set, the
other five its OOD sets; the 64x64 grayscale JPEGs are listed as they are, split 80/10/10 per class.
The same stage as ``get_datasets.py --datasets=MedNIST`` (cli/get_datasets.py, data/sources).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.get_datasets import family_main, family_parser

WHAT = (
    "MONAI's MedNIST: each class (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT) an in-distribution set, the "
    "other five its OOD sets; the 64x64 grayscale JPEGs are listed as they are, split 80/10/10 per class"
)


def build_parser() -> argparse.ArgumentParser:
    return family_parser("get_mednist_datasets.py", "MedNIST", WHAT)


def main(argv: Sequence[str] | None = None) -> int:
    return family_main(build_parser(), argv)
