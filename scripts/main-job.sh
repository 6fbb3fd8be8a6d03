#!/usr/bin/env bash
# The main job (issue 3): set up (scripts/setup.sh), then train a Pfeiffer adapter on SST-2 with
# all-MiniLM-L6-v2 and print the trainable share, the test accuracy and the adapter's size.
# About 5-6 minutes on 2 shared CPU cores (see docs/training.md for the measurements).
#   SST2_DIR  data folder (default: ../shared/data/sst2)      OUT  run folder (default: runs/sst2)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ADAPTERKIT_VENV:-.venv}
DATA=${SST2_DIR:-../shared/data/sst2}
OUT=${OUT:-runs/sst2}
set -x
"$VENV/bin/adapterkit" train --model minilm --train "$DATA/train.tsv" --eval "$DATA/dev.tsv" --test "$DATA/test.tsv" \
  --epochs 1 --max-train-rows 30000 --max-eval-rows 2000 --out "$OUT" --overwrite
