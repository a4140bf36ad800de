#!/usr/bin/env python
"""Upstream's path for the MedMNIST3D data stage: ``python src/data/get_3dmedmnist.py --data_root=...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_ood.cli.get_3dmedmnist import main  # noqa: E402
from ddpm_ood.cli.runner import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
