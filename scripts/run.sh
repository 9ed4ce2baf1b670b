#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: train the tiny config on the Python
# standard library's sources (about 10 minutes on 2 CPU cores), then generate from the result.
# Extra arguments go to train.py (e.g. --steps 200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --resume: a second run continues the first (or, when it finished, only regenerates)
.venv/bin/python train.py --out runs/default --resume "$@"
exec .venv/bin/python serve.py --checkpoint runs/default --prompt "def main(" --max-new-tokens 48
