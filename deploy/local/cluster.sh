#!/usr/bin/env bash
# Starts callapi as a cluster on this one machine, every part a separate process, for demos and
# tests (`make cluster`):
#   - 3 nats-servers forming a JetStream cluster (free ports; nats-server 2.11+ found or
#     installed by deploy/local/nats-server.sh),
#   - the OpenSIPS emulator, 1 proxy-connector, 1 event-ingest, 2 commands replicas and
#     2 gateways (configs: deploy/local/cluster/*.toml; every service is given all three NATS
#     URLs, and the streams and buckets whose replicas can be configured are made with 3);
# waits for each one's READY line and /readyz, prints a table of them, runs a demo call through
# both gateways (CallStart alice -> bob on gateway 1, CallList and CallEnd on gateway 2) and shows
# the call's events from its tenant's JetStream stream; then stays up until Ctrl-C, which stops
# everything (gateways and services first, NATS last).
#
#   CALLAPI_BIN_DIR=target/debug ./deploy/local/cluster.sh   # binaries (default target/release)
#   CLUSTER_DEMO_ONLY=1 ./deploy/local/cluster.sh            # stop after the demo (CI, tests):
#                                                            # exit status 0 only if it worked
#   CLUSTER_KEEP=1 ./deploy/local/cluster.sh                 # keep the JetStream data at exit
#
# State and logs go to a new temporary directory (printed; logs are kept after exit). Every port
# is a free one: the nats-servers' ports are picked (and checked free) here, the services bind
# port 0 and their READY lines say where they are.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
cfg="$root/deploy/local/cluster"
bin_dir=${CALLAPI_BIN_DIR:-target/release}
case "$bin_dir" in /*) ;; *) bin_dir="$root/$bin_dir" ;; esac
demo_only=${CLUSTER_DEMO_ONLY:-0}

die() { echo "!! $*" >&2; exit 1; }

for b in nats-server.sh; do [ -x "$root/deploy/local/$b" ] || die "deploy/local/$b is missing"; done
for b in opensips-emulator proxy-connector event-ingest commands gateway callapi callapi-calls; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it (\`cargo build --release --workspace --bins\`, which \`make cluster\` runs) or set CALLAPI_BIN_DIR"
done
for tool in curl ps; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is needed (readiness checks, process checks)"
done
nats_server=$("$root/deploy/local/nats-server.sh") || die "no nats-server 2.11 or later (deploy/local/nats-server.sh failed)"

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/callapi-cluster.XXXXXX")
logs="$run_dir/logs"
mkdir -p "$logs"
echo "==> state and logs in $run_dir"
echo "==> binaries from $bin_dir; $("$nats_server" --version)"

# The processes started, in start order: name, pid, log, whether NATS, address(es), readiness URL.
names=() pids=() logfiles=() is_nats=() addrs=() ready_urls=()
events_pid=""   # the demo's callapi-calls
reported=" "    # indexes of the processes whose end was reported already

# Runs children in their own session (setsid) when possible, so a Ctrl-C reaches only this
# script, which then stops them in order: services first, NATS last.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)

alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}

# Waits up to $1 seconds for the pids that follow to be gone; 1 if some are not.
wait_gone() {
  local until=$((SECONDS + $1)) pid left
  shift
  while :; do
    left=0
    for pid in "$@"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && return 0
    [ "$SECONDS" -lt "$until" ] || return 1
    sleep 0.1
  done
}

log_tail() { # LOG [LINES]
  echo "---- last ${2:-30} lines of $1 ----" >&2
  tail -n "${2:-30}" "$1" 2>/dev/null | sed -E 's/\x1b\[[0-9;]*m//g' >&2 || true
  echo "----" >&2
}

# fail NAME LOG MESSAGE: the error, naming the process, with the tail of its log; then exit.
fail() {
  echo "!! $1: $3" >&2
  [ -n "$2" ] && log_tail "$2"
  exit 1
}

cleanup() {
  local status=$?
  set +e
  trap - INT TERM
  echo
  echo "==> stopping the cluster"
  [ -n "$events_pid" ] && kill "$events_pid" 2>/dev/null
  local i services=() servers=()
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    if [ "${is_nats[$i]}" = 1 ]; then servers+=("${pids[$i]}"); else services+=("${pids[$i]}"); fi
  done
  # Services first (gateways drain, commands hand over), while NATS is still there.
  [ ${#services[@]} -gt 0 ] && kill -TERM "${services[@]}" 2>/dev/null
  [ ${#services[@]} -gt 0 ] && ! wait_gone 15 "${services[@]}" && echo "!! services still running after 15 s: killed"
  [ ${#servers[@]} -gt 0 ] && kill -TERM "${servers[@]}" 2>/dev/null
  [ ${#servers[@]} -gt 0 ] && ! wait_gone 10 "${servers[@]}" && echo "!! nats-servers still running after 10 s: killed"
  for i in "${pids[@]}" $events_pid; do alive "$i" && kill -KILL "$i" 2>/dev/null; done
  # How each one ended: a non-zero status or a panic at shutdown is worth knowing.
  local code
  for i in "${!pids[@]}"; do
    case "$reported" in *" $i "*) continue ;; esac
    code=0
    wait "${pids[$i]}" 2>/dev/null || code=$?
    # nats-servers stopped by SIGTERM may report it; a callapi service must exit 0.
    if [ "$code" != 0 ] && [ "${is_nats[$i]}" != 1 ]; then
      echo "!! ${names[$i]} (pid ${pids[$i]}) exited with status $code"
      [ "$status" = 0 ] && [ "${CLUSTER_DEMO_ONLY:-0}" = 1 ] && status=1
    fi
    if grep -q 'panicked at' "${logfiles[$i]}" 2>/dev/null; then
      echo "!! ${names[$i]} panicked: $(grep -m1 -A1 'panicked at' "${logfiles[$i]}" | tr '\n' ' ') (${logfiles[$i]})"
      [ "$status" = 0 ] && [ "${CLUSTER_DEMO_ONLY:-0}" = 1 ] && status=1
    fi
  done
  wait 2>/dev/null
  if [ "${CLUSTER_KEEP:-0}" != 1 ]; then rm -rf "$run_dir/jetstream"; fi
  echo "==> stopped; logs in $logs"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# free_port: sets PORT to a TCP port on 127.0.0.1 nobody uses (nor any port picked before).
picked=" "
free_port() {
  local p
  for _ in $(seq 500); do
    # Below Linux's ephemeral range (32768 and up), where outgoing connections take theirs.
    p=$((20000 + RANDOM % 12000))
    case "$picked" in *" $p "*) continue ;; esac
    port_open 127.0.0.1 "$p" && continue
    if command -v ss >/dev/null 2>&1 && [ -n "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]; then continue; fi
    picked+="$p "
    PORT=$p
    return 0
  done
  die "found no free TCP port on 127.0.0.1"
}

# spawn NAME NATS(0/1) OUT LOG CMD...: starts a process in the background and records it.
spawn() {
  local name=$1 nats=$2 out=$3 log=$4
  shift 4
  "${detach[@]}" "$@" </dev/null >"$out" 2>"$log" &
  names+=("$name") pids+=($!) logfiles+=("$log") is_nats+=("$nats") addrs+=("") ready_urls+=("")
}

# field LINE KEY: the value of KEY=value in a READY line.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -1; }

# start NAME CMD...: starts a service, waits (30 s at most) for its READY line, which it leaves
# in READY_LINE.
start() {
  local name=$1
  shift
  local out="$logs/$name.out" log="$logs/$name.log"
  spawn "$name" 0 "$out" "$log" "$@"
  local pid=${pids[-1]} until=$((SECONDS + 30)) status
  while :; do
    READY_LINE=$(grep -m1 '^READY' "$out" 2>/dev/null || true)
    if [ -n "$READY_LINE" ]; then
      READY_LINE=${READY_LINE#READY }
      printf '==> %-18s pid %-7s READY %s\n' "$name" "$pid" "$READY_LINE"
      return 0
    fi
    if ! alive "$pid"; then
      status=0
      wait "$pid" 2>/dev/null || status=$?
      reported+="$((${#pids[@]} - 1)) "
      fail "$name (pid $pid)" "$log" "exited with status $status before it was ready"
    fi
    [ "$SECONDS" -lt "$until" ] || fail "$name (pid $pid)" "$log" "printed no READY line within 30 s"
    sleep 0.1
  done
}

# ---------------------------------------------------------------------------------------------
# 1. Three nats-servers, one JetStream cluster.
client_ports=() cluster_ports=() monitor_ports=()
for i in 1 2 3; do
  free_port; client_ports+=("$PORT")
  free_port; cluster_ports+=("$PORT")
  free_port; monitor_ports+=("$PORT")
done
routes=$(printf 'nats://127.0.0.1:%s,' "${cluster_ports[@]}"); routes=${routes%,}
nats_urls=$(printf 'nats://127.0.0.1:%s,' "${client_ports[@]}"); nats_urls=${nats_urls%,}
for i in 0 1 2; do
  n=$((i + 1))
  mkdir -p "$run_dir/jetstream/n$n"
  spawn "nats-$n" 1 /dev/null "$logs/nats-$n.log" \
    "$nats_server" --server_name "n$n" --cluster_name callapi-local \
    -a 127.0.0.1 -p "${client_ports[$i]}" -m "${monitor_ports[$i]}" \
    --cluster "nats://127.0.0.1:${cluster_ports[$i]}" --routes "$routes" \
    -js -sd "$run_dir/jetstream/n$n"
  addrs[-1]="nats://127.0.0.1:${client_ports[$i]} cluster=127.0.0.1:${cluster_ports[$i]}"
  ready_urls[-1]="http://127.0.0.1:${monitor_ports[$i]}/healthz"
done
echo "==> nats-servers n1 n2 n3: $nats_urls"

# Each answers on its client port...
until=$((SECONDS + 20))
for i in 0 1 2; do
  until port_open 127.0.0.1 "${client_ports[$i]}"; do
    alive "${pids[$i]}" || fail "nats-$((i + 1)) (pid ${pids[$i]})" "${logfiles[$i]}" "exited at start"
    [ "$SECONDS" -lt "$until" ] || fail "nats-$((i + 1)) (pid ${pids[$i]})" "${logfiles[$i]}" "does not listen on 127.0.0.1:${client_ports[$i]} after 20 s"
    sleep 0.1
  done
done
# ...then JetStream: the services stop at start if it does not answer (they create their
# streams and buckets then), so wait for the cluster's meta leader and every server's /healthz
# (which answers 200 only once its JetStream is current).
until=$((SECONDS + 60))
while :; do
  ok=1 leader=""
  for i in 0 1 2; do
    alive "${pids[$i]}" || fail "nats-$((i + 1)) (pid ${pids[$i]})" "${logfiles[$i]}" "exited while the cluster formed"
    curl -fsS -m 2 -o /dev/null "http://127.0.0.1:${monitor_ports[$i]}/healthz" 2>/dev/null || ok=0
    jsz=$(curl -fsS -m 2 "http://127.0.0.1:${monitor_ports[$i]}/jsz" 2>/dev/null || true)
    l=$(tr -d ' \n' <<<"$jsz" | grep -oE '"meta_cluster":\{[^}]*"leader":"[^"]+"' | grep -oE '"leader":"[^"]+"' | cut -d'"' -f4 || true)
    [ -n "$l" ] && leader=$l || ok=0
  done
  if [ "$ok" = 1 ] && command -v nats >/dev/null 2>&1; then
    nats --server "$nats_urls" account info >/dev/null 2>&1 || ok=0
  fi
  [ "$ok" = 1 ] && break
  if [ "$SECONDS" -ge "$until" ]; then
    for i in 0 1 2; do log_tail "${logfiles[$i]}" 10; done
    die "the JetStream cluster did not form within 60 s (no meta leader, or /healthz not ok)"
  fi
  sleep 0.2
done
echo "==> JetStream cluster up: meta leader $leader"

# ---------------------------------------------------------------------------------------------
# 2. The emulator and the services, each given all three NATS URLs.
export CALLAPI_NATS__URL="$nats_urls"
# The gateways' token signing key (one for both: a token one signs, the other accepts).
export CALLAPI_SIGNING_KEY="${CALLAPI_SIGNING_KEY:-$(head -c 48 /dev/urandom | base64 | tr -d '\n')}"
export CALLAPI_AUTH__TENANTS_FILE="$root/deploy/local/tenants.toml"
export CALLAPI_TENANTS_FILE="$root/deploy/local/tenants.toml"

start opensips-emulator "$bin_dir/opensips-emulator" --mi-udp 127.0.0.1:0 --mi-http 127.0.0.1:0 \
  --opensips-version 3.6 --answer-delay-ms 300 --extra-phones eve,frank
mi_udp=$(field "$READY_LINE" mi_udp)
mi_http=$(field "$READY_LINE" mi_http)
[ -n "$mi_udp" ] || fail opensips-emulator "${logfiles[-1]}" "its READY line names no mi_udp"
addrs[-1]="mi_udp=$mi_udp mi_http=$mi_http"

sed "s/@MI_UDP@/$mi_udp/" "$cfg/proxy-connector.toml" >"$run_dir/proxy-connector.toml"
start proxy-connector "$bin_dir/proxy-connector" --config "$run_dir/proxy-connector.toml"
ops=$(field "$READY_LINE" ops)
addrs[-1]="ops=$ops node opensips1=udp:$mi_udp"
ready_urls[-1]="http://$ops/readyz"

start event-ingest "$bin_dir/event-ingest" --config "$cfg/event-ingest.toml"
ops=$(field "$READY_LINE" ops)
addrs[-1]="ops=$ops events=$(field "$READY_LINE" opensips1)"
ready_urls[-1]="http://$ops/readyz"

for n in 1 2; do
  start "commands-$n" "$bin_dir/commands" --config "$cfg/commands.toml"
  ops=$(field "$READY_LINE" ops)
  addrs[-1]="ops=$ops replica=$(field "$READY_LINE" replica)"
  ready_urls[-1]="http://$ops/readyz"
done

# One host runs everything: each gateway takes one worker thread, as in `make run`.
gateway_urls=()
for n in 1 2; do
  start "gateway-$n" env CALLAPI_GATEWAY_ID="gw$n" TOKIO_WORKER_THREADS="${CALLAPI_GATEWAY_WORKERS:-1}" \
    "$bin_dir/gateway" --config "$cfg/gateway.toml"
  listen=$(field "$READY_LINE" listen)
  addrs[-1]="ws://$listen/call-api http://$listen/api"
  ready_urls[-1]="http://$listen/readyz"
  gateway_urls+=("ws://$listen/call-api")
done

# ---------------------------------------------------------------------------------------------
# 3. Every /readyz answers 200 (event-ingest: the node has its event subscriptions;
#    proxy-connector: the node answers; all: NATS connected).
until=$((SECONDS + 30))
for i in "${!names[@]}"; do
  url=${ready_urls[$i]}
  [ -n "$url" ] || continue
  while :; do
    code=$(curl -s -m 2 -o "$run_dir/readyz.body" -w '%{http_code}' "$url" 2>/dev/null || true)
    [ "$code" = 200 ] && break
    alive "${pids[$i]}" || fail "${names[$i]} (pid ${pids[$i]})" "${logfiles[$i]}" "exited before it was ready"
    if [ "$SECONDS" -ge "$until" ]; then
      fail "${names[$i]} (pid ${pids[$i]})" "${logfiles[$i]}" "$url answers ${code:-nothing} after 30 s: $(head -c 300 "$run_dir/readyz.body" 2>/dev/null)"
    fi
    sleep 0.2
  done
done

echo
echo "callapi cluster is up (every readiness URL answers 200):"
printf '  %-18s %-8s %-58s %s\n' PROCESS PID 'ADDRESS(ES)' READINESS
for i in "${!names[@]}"; do
  printf '  %-18s %-8s %-58s %s\n' "${names[$i]}" "${pids[$i]}" "${addrs[$i]}" "${ready_urls[$i]:--}"
done

# The replicated streams and buckets, as the cluster reports them (jq needed to read /jsz).
if command -v jq >/dev/null 2>&1; then
  echo
  echo "JetStream streams (replicas, leader):"
  for i in 0 1 2; do
    curl -fsS -m 2 "http://127.0.0.1:${monitor_ports[$i]}/jsz?accounts=true&streams=true&config=true" 2>/dev/null || true
  done | jq -rs '[.[] | .account_details[]? | .stream_detail[]?
                  | {name, r: (.config.num_replicas // 1), leader: (.cluster.leader // "-")}]
                 | unique_by(.name)[] | "  \((.name + (" " * 30))[:30]) R\(.r)  leader=\(.leader)"' 2>/dev/null || true
  echo "  (R1: the gateway's buckets callapi_session_meta and callapi_auth_*, which no setting replicates)"
fi

# ---------------------------------------------------------------------------------------------
# 4. The demo: a call started through gateway 1, listed and ended through gateway 2; its call
#    events read from acme's stream CALLAPI_CALLS_acme on the third nats-server.
export CALLAPI_CLIENT_ID=crm CALLAPI_CLIENT_SECRET=acme-crm-secret   # acme's CRM (tenants.toml)
demo_ok=1
demo_fail() { echo "!! demo: $*" >&2; demo_ok=0; }

# The JetStream API of a server that just joined may not answer yet ("no responders"): the
# reader is started again until it stays up (callapi-calls runs until it is stopped).
"${detach[@]}" env CALLAPI_NATS__URL="nats://127.0.0.1:${client_ports[2]}" bash -c '
  trap "kill \$child 2>/dev/null; exit 0" TERM
  for _ in $(seq 40); do
    "$0" --tenant acme --all >>"$1" 2>>"$2" </dev/null & child=$!
    wait "$child" && exit 0
    sleep 0.25
  done' "$bin_dir/callapi-calls" "$logs/call-events.out" "$logs/call-events.log" &
events_pid=$!

echo
echo "==> demo 1/3: CallStart alice -> bob through gateway-1 (${gateway_urls[0]})"
out=$(CALLAPI_URL="${gateway_urls[0]}" "$bin_dir/callapi" --timeout 30 CallStart \
  '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}' 2>&1) || demo_fail "CallStart did not end cleanly"
echo "$out"
callid=$(grep '"CALL_START"' <<<"$out" | sed -E 's/.*"callid":"([^"]+)".*/\1/' | head -1 || true)

if [ -z "$callid" ]; then
  demo_fail "no CALL_START event, so no call to end"
else
  echo
  echo "==> demo 2/3: CallList through gateway-2 (${gateway_urls[1]}): the call, from the replicated session store"
  listed=""
  for _ in $(seq 20); do
    listed=$(CALLAPI_URL="${gateway_urls[1]}" "$bin_dir/callapi" --timeout 10 CallList '{}' 2>&1 || true)
    grep -qF -- "$callid" <<<"$listed" && break
    sleep 0.25
  done
  echo "$listed"
  grep -qF -- "$callid" <<<"$listed" || demo_fail "gateway-2's CallList does not show call $callid"

  echo
  echo "==> demo 3/3: CallEnd $callid through gateway-2"
  CALLAPI_URL="${gateway_urls[1]}" "$bin_dir/callapi" --timeout 30 CallEnd "{\"callid\":\"$callid\"}" \
    || demo_fail "CallEnd did not end cleanly"

  echo
  echo "==> call events of the session (alice's call, transferred to bob: $callid), from the stream"
  echo "    CALLAPI_CALLS_acme, read on nats-3 by callapi-calls:"
  seen=0
  for _ in $(seq 50); do
    if grep -F -- " callid=$callid " "$logs/call-events.out" 2>/dev/null | grep -q ' Ended '; then seen=1; break; fi
    alive "$events_pid" || break
    sleep 0.2
  done
  session=$(grep -F -- " callid=$callid " "$logs/call-events.out" 2>/dev/null | grep -oE ' session=[0-9]+ ' | head -1 || true)
  if [ -n "$session" ]; then
    grep -F -- "$session" "$logs/call-events.out" | sed 's/^/   /' || true
  fi
  if [ "$seen" = 0 ]; then
    alive "$events_pid" || log_tail "$logs/call-events.log" 10
    demo_fail "no Ended event of $callid in CALLAPI_CALLS_acme within 10 s"
  fi
fi
kill "$events_pid" 2>/dev/null || true
wait "$events_pid" 2>/dev/null || true
events_pid=""

echo
if [ "$demo_ok" = 1 ]; then
  echo "==> demo OK: started on gateway-1, listed and ended on gateway-2, its events in JetStream"
else
  echo "!! the demo failed (above); logs in $logs"
fi
if [ "$demo_only" = 1 ]; then
  [ "$demo_ok" = 1 ] || exit 1
  exit 0
fi

pid_of() { local i; for i in "${!names[@]}"; do [ "${names[$i]}" = "$1" ] && echo "${pids[$i]}"; done; }
cat <<TXT

The cluster stays up; press Ctrl-C to stop it. Try:
  CALLAPI_URL=${gateway_urls[1]} CALLAPI_CLIENT_ID=crm CALLAPI_CLIENT_SECRET=acme-crm-secret \\
    $bin_dir/callapi CallStart '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}'
  CALLAPI_NATS__URL=nats://127.0.0.1:${client_ports[0]} $bin_dir/callapi-calls --tenant acme
  kill $(pid_of commands-2)   # stop a commands replica (or a nats-server): the rest carries on
  logs: $logs/
TXT

# Report processes that end meanwhile (once each); the others keep running.
while :; do
  for i in "${!pids[@]}"; do
    case "$reported" in *" $i "*) continue ;; esac
    if ! alive "${pids[$i]}"; then
      status=0
      wait "${pids[$i]}" 2>/dev/null || status=$?
      echo "!! ${names[$i]} (pid ${pids[$i]}) exited with status $status" >&2
      log_tail "${logfiles[$i]}" 10
      reported+="$i "
    fi
  done
  sleep 1
done
