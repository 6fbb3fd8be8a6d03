#!/usr/bin/env bash
# Set up (scripts/setup.sh), build the docs site strictly, and run the whole test suite. Extra arguments go to pytest.
# pytest's exit code 5 ("no tests collected") is turned into a failure: a run that tests
# nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
VENV=${ADAPTERKIT_VENV:-.venv}
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
