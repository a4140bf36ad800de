"""src/data/get_decathlon_datasets.py: upstream's script and flag (--data_root: the download folder).

The ten Medical Segmentation Decathlon tasks through MONAI's DecathlonDataset (BraTS in distribution, the
other nine out); the NIfTI volumes are listed as they are, split as MONAI splits them.
The same stage as ``get_datasets.py --datasets=Decathlon`` (cli/get_datasets.py, data/sources).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.get_datasets import family_main, family_parser

WHAT = (
    "The ten Medical Segmentation Decathlon tasks through MONAI's DecathlonDataset (BraTS in distribution, the "
    "other nine out); the NIfTI volumes are listed as they are, split as MONAI splits them"
)


def build_parser() -> argparse.ArgumentParser:
    return family_parser("get_decathlon_datasets.py", "Decathlon", WHAT)


def main(argv: Sequence[str] | None = None) -> int:
    return family_main(build_parser(), argv)
