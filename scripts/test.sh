#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the import layers and the lint, build the docs site strictly,
# and run the whole test suite. Extra arguments go to pytest.
# pytest's exit code 5 ("no tests collected") is turned into a failure: a run that tests
# nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
# ADAPTERKIT_SKIP_SETUP=1: use the venv as it is (scripts/test-newest.sh brings its own)
[ "${ADAPTERKIT_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh || exit 1
VENV=${ADAPTERKIT_VENV:-.venv}
# The layers and the lint first (pyproject.toml: [tool.importlinter], [tool.ruff]): an upward
# import or an import hidden in a function fails the run before any test.
PYTHONPATH=src "$VENV/bin/lint-imports" || { echo "ERROR: import layers broken (lint-imports)" >&2; exit 1; }
"$VENV/bin/ruff" check src tests bench || { echo "ERROR: ruff check failed" >&2; exit 1; }
docs_out=$(mktemp -d)   # the docs site must build without a warning (mkdocs.yml)
NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict -q -d "$docs_out" || { rm -rf "$docs_out"; echo "ERROR: mkdocs build --strict failed" >&2; exit 1; }
rm -rf "$docs_out"
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
