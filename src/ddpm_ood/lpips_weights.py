"""``python -m ddpm_ood.lpips_weights``, the documented command: runs ``ddpm_ood.cli.lpips_weights``."""

import sys

if __name__ == "__main__":
    from ddpm_ood.cli.lpips_weights import main
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
