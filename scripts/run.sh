#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: build the tiny config and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dsv3_jax.demo "$@"
