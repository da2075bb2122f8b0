#!/bin/sh
# Regenerate the images' lock files from pyproject.toml (run from the repository root after a
# dependency change; a test checks that every dependency of pyproject.toml is pinned).
# --universal: one file for amd64 and arm64 (environment markers); --generate-hashes: pip
# installs with --require-hashes, so a changed or substituted file fails the build.
set -eu
cd "$(dirname "$0")/../.."
for target in cpu cuda12 cuda13; do
  extra=""
  [ "$target" = cpu ] || extra="--extra $target"
  # shellcheck disable=SC2086
  uv pip compile pyproject.toml $extra --universal --python-version 3.12 --generate-hashes \
    --no-header --quiet -o "deploy/docker/requirements-$target.lock"
done
