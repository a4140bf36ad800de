"""``python -m ddpm_ood.data.offline_mnist``, the documented command: runs ``ddpm_ood.cli.offline_mnist``."""

import sys

if __name__ == "__main__":
    from ddpm_ood.cli.offline_mnist import main
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
