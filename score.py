#!/usr/bin/env python
"""Score new inputs with a trained model and a threshold calibrated on validation data."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ddpm_ood.cli.runner import run_cli  # noqa: E402
from ddpm_ood.cli.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
