#!/usr/bin/env bash
# Starts a local callapi stack: NATS (if none is reachable), the OpenSIPS emulator (unless
# OPENSIPS_MI names a real node's mi_datagram address), the four services; then runs an example
# call through the CLI and keeps everything running until Ctrl-C.
#
#   OPENSIPS_MI=udp:10.0.0.5:8080  ./deploy/local/run.sh   # drive a real OpenSIPS over mi_datagram
#   (a real OpenSIPS must be able to send event_datagram notifications to 127.0.0.1:9099)
#   NATS_URL=nats://10.0.0.6:4222        ./deploy/local/run.sh   # use an existing NATS (2.11+, JetStream)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
run_dir="$root/.run"
mkdir -p "$run_dir/logs"
nats_url=${NATS_URL:-}
pids=()

cleanup() {
  echo
  echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "==> building"
cargo build --workspace --bins --quiet
bin="$root/target/debug"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Whether the NATS server on $1:$2 is 2.11 or later with JetStream (its INFO line says).
nats_usable() {
  local info version major minor
  info=$( (exec 3<>"/dev/tcp/$1/$2" && timeout 2 head -c 4096 <&3 | head -1) 2>/dev/null) || return 1
  echo "$info" | grep -q '"jetstream":true' || return 1
  version=$(echo "$info" | grep -oE '"version":"[0-9]+\.[0-9]+' | grep -oE '[0-9]+\.[0-9]+') || return 1
  major=${version%%.*}; minor=${version#*.}
  [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 11 ]; }
}

if [ -z "$nats_url" ]; then
  # The usual local server if it will do (2.11+, JetStream), else our own on 4223.
  if nats_usable 127.0.0.1 4222; then nats_url=nats://127.0.0.1:4222; else nats_url=nats://127.0.0.1:4223; fi
fi
nats_host=$(echo "$nats_url" | sed -E 's#^nats://##; s#:.*##')
nats_port=$(echo "$nats_url" | sed -E 's#^.*:([0-9]+)$#\1#')
if port_open "$nats_host" "$nats_port"; then
  echo "==> using the NATS server at $nats_url"
  nats_usable "$nats_host" "$nats_port" || echo "!! $nats_url is not nats-server 2.11+ with JetStream: the session store will not work"
else
  nats_server=$("$root/deploy/local/nats-server.sh")
  echo "==> starting $("$nats_server" --version) on $nats_host:$nats_port"
  "$nats_server" -a "$nats_host" -p "$nats_port" -js -sd "$run_dir/jetstream" >"$run_dir/logs/nats-server.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do port_open "$nats_host" "$nats_port" && break; sleep 0.1; done
fi
export CALLAPI_NATS__URL="$nats_url"
# The gateway's token signing key (deploy/local/gateway.toml), and where its tenants are.
export CALLAPI_SIGNING_KEY="${CALLAPI_SIGNING_KEY:-$(head -c 48 /dev/urandom | base64 | tr -d '\n')}"
export CALLAPI_AUTH__TENANTS_FILE="$root/deploy/local/tenants.toml"
export CALLAPI_TENANTS_FILE="$root/deploy/local/tenants.toml"

# start NAME LOGFILE CMD... : starts a process and waits for its READY line.
start() {
  local name=$1; shift
  local out="$run_dir/logs/$name.out"
  "$@" >"$out" 2>"$run_dir/logs/$name.log" &
  pids+=($!)
  for _ in $(seq 200); do
    if grep -q '^READY' "$out" 2>/dev/null; then
      echo "==> $name $(grep '^READY' "$out" | head -1)"
      return 0
    fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "!! $name exited; its log:"; cat "$run_dir/logs/$name.log"; exit 1
    fi
    sleep 0.1
  done
  echo "!! $name did not start; see $run_dir/logs/$name.log"; exit 1
}

connector_config="$root/deploy/local/proxy-connector.toml"
if [ -n "${OPENSIPS_MI:-}" ]; then
  echo "==> driving the OpenSIPS node at $OPENSIPS_MI"
  connector_config="$run_dir/proxy-connector.toml"
  case "$OPENSIPS_MI" in
    http://*) echo "!! OPENSIPS_MI must be udp:HOST:PORT (mi_datagram): mi_http answers t_uac_dlg only every 500 ms"; exit 1 ;;
  esac
  printf '[[nodes]]\nid = "opensips1"\nmi = "%s"\n' "$OPENSIPS_MI" >"$connector_config"
else
  start opensips-emulator "$bin/opensips-emulator" --mi-udp 127.0.0.1:8080 --mi-http 127.0.0.1:8888 --opensips-version 3.6 --answer-delay-ms 300 --extra-phones eve,frank
fi
start proxy-connector "$bin/proxy-connector" --config "$connector_config"
sed -E 's/\x1b\[[0-9;]*m//g' "$run_dir/logs/proxy-connector.log" | grep -o 'serving MI requests: .*' | sed -E 's/ node=.*//; s/^/==> /' | head -1 || true
start event-ingest "$bin/event-ingest" --config "$root/deploy/local/event-ingest.toml"
start commands "$bin/commands" --config "$root/deploy/local/commands.toml"
# One host runs the whole stack: the gateway takes one worker thread, as the other services do
# by default (docs/performance.md, section 8); CALLAPI_GATEWAY_WORKERS=0 gives it one per core.
gateway_workers="${CALLAPI_GATEWAY_WORKERS:-1}"
if [ "$gateway_workers" = 0 ]; then
  start gateway "$bin/gateway" --config "$root/deploy/local/gateway.toml"
else
  start gateway env TOKIO_WORKER_THREADS="$gateway_workers" "$bin/gateway" --config "$root/deploy/local/gateway.toml"
fi

# The CLI signs in as acme's CRM (an API client of deploy/local/tenants.toml).
export CALLAPI_CLIENT_ID=crm CALLAPI_CLIENT_SECRET=acme-crm-secret

cat <<TXT

callapi is running.
  WebSocket JSON-RPC:  ws://127.0.0.1:5059/call-api
  REST:                http://127.0.0.1:5059/api/sessions  (OpenAPI: /api/openapi.json, /api/docs)
  sign in:             curl -d grant_type=client_credentials -d client_id=crm -d client_secret=acme-crm-secret http://127.0.0.1:5059/api/login/oauth/token
  logs:                $run_dir/logs/
  CLI:                 CALLAPI_CLIENT_ID=crm CALLAPI_CLIENT_SECRET=acme-crm-secret $bin/callapi CallStart '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}'

Example: a click-to-dial call from alice to bob, the active calls, then hold, unhold and end it.
TXT
sleep 1
cli="$bin/callapi"
out=$("$cli" CallStart '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}' || true)
echo "$out"
callid=$(echo "$out" | grep '"CALL_START"' | sed -E 's/.*"callid":"([^"]+)".*/\1/' | head -1)
if [ -n "$callid" ]; then
  "$cli" CallList '{}' || true
  "$cli" CallHold "{\"callid\":\"$callid\"}" || true
  "$cli" CallUnHold "{\"callid\":\"$callid\"}" || true
  "$cli" CallEnd "{\"callid\":\"$callid\"}" || true
fi
echo
echo "Stack still running; press Ctrl-C to stop."
wait
