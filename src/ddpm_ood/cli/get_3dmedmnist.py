"""src/data/get_3dmedmnist.py: upstream's script and flag (--data_root: the download folder).

The six 3D MedMNIST sets (28^3 volumes) from their .npz files, each volume saved as .npy, official splits.
The same stage as ``get_datasets.py --datasets=MedMNIST3D`` (cli/get_datasets.py, data/sources).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.get_datasets import family_main, family_parser

WHAT = (
    "The six 3D MedMNIST sets (28^3 volumes) from their .npz files, each volume saved as .npy, official splits"
)


def build_parser() -> argparse.ArgumentParser:
    return family_parser("get_3dmedmnist.py", "MedMNIST3D", WHAT)


def main(argv: Sequence[str] | None = None) -> int:
    return family_main(build_parser(), argv)
