#!/usr/bin/env python
"""Stage 2a (latent diffusion): train the VQ-VAE on a split CSV (see README)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ddpm_ood.cli.runner import exit_process, run_cli  # noqa: E402
from ddpm_ood.cli.train_vqvae import main  # noqa: E402

if __name__ == "__main__":
    exit_process(run_cli(main))
