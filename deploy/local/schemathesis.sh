#!/usr/bin/env bash
# Prints the path of schemathesis's `st` (the REST API's property-based test, run by `make
# test`): $SCHEMATHESIS_BIN if set, else one installed from PyPI into .tools/ of the checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
version=4.32.5
if [ -n "${SCHEMATHESIS_BIN:-}" ]; then
  echo "$SCHEMATHESIS_BIN"; exit 0
fi
venv="$root/.tools/schemathesis"
if [ -x "$venv/bin/st" ] && "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
  echo "$venv/bin/st"; exit 0
fi
echo "installing schemathesis $version from PyPI into $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version" >&2
echo "$venv/bin/st"
