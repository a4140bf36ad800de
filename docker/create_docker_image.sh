#!/usr/bin/env bash
# Build the ddpm-ood image as "$USER:ddpm-ood" with the caller's uid/gid (works from any directory).
# Extra arguments go to `docker build` (e.g. --build-arg BASE_IMAGE=python:3.11-bookworm).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USER_NAME="${USER:-$(id -un)}"
docker build \
  --file "$REPO_ROOT/docker/Dockerfile" \
  --tag "${USER_NAME}:ddpm-ood" \
  --build-arg USER_ID="$(id -u)" \
  --build-arg GROUP_ID="$(id -g)" \
  --build-arg USER="$USER_NAME" \
  "$@" \
  "$REPO_ROOT"
