#!/usr/bin/env bash
# One side-by-side run on this machine: Tether, Mosquitto, rumqttd and the NATS server
# under the same three loads, each server started fresh for each load on loopback.
#
#   (a) idle: $CONNS connections (18,000) with a 30 s keepalive, measured over $WINDOW s
#       (120): server bytes per connection, server CPU per ping, ping RTT.
#   (b) latency: 1,000 publisher/subscriber pairs at 5,000 msg/s in total for 10 s.
#   (c) throughput: one pair, 200,000 messages.
#
# Tether is loaded by `tether bench load` (fsync and relaxed durability); the peers by
# `tether bench peer`, which drives them through rumqttc and async-nats. A last row, the
# floor, is `tether bench floor` under the idle load: a bare epoll echo server's CPU
# per keepalive on this machine, for reference. Every run's
# JSON, stderr and the load average before it go to $OUT (target/side-by-side); at the
# end $OUT/table.md is written and printed. A failed run shows as "failed: <reason>"
# in its cells and the others go on; the script exits non-zero if any run failed.
#
# Environment: OUT, CONNS, WINDOW (scale the idle run down), PAIRS, RATE, LAT_SECONDS,
# MESSAGES (the other loads; defaults are the published ones), ONLY (a subset of
# "tether mosquitto rumqttd nats floor"), TETHER (a tether binary to use instead of building).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${OUT:-target/side-by-side}
CONNS=${CONNS:-18000}
WINDOW=${WINDOW:-120}
KEEPALIVE=30
PAIRS=${PAIRS:-1000}
RATE=${RATE:-5000}
SECONDS_LAT=${LAT_SECONDS:-10}
MESSAGES=${MESSAGES:-200000}
ONLY=${ONLY:-tether mosquitto rumqttd nats floor}
PEERS_DIR=$ROOT/target/peers
MOSQUITTO_PORT=18830
RUMQTTD_PORT=18831
NATS_PORT=18832
FD_LIMIT=20000

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CONF=$(mktemp -d)
rm -f "$OUT"/*.json "$OUT"/*.failed "$OUT"/*.load "$OUT"/*.stderr "$OUT"/*.log "$OUT/rows.tsv"

declare -a STARTED=()   # process ids to stop on exit
declare -a FAILED=()    # run ids that failed
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$CONF"
}
trap cleanup EXIT

wanted() { [[ " $ONLY " == *" $1 "* ]]; }

# --- what the run needs ---------------------------------------------------------------

MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
need_pkgs=()
if wanted mosquitto && [ ! -x "$MOSQUITTO" ]; then need_pkgs+=(mosquitto); fi
if wanted nats && [ ! -x "$NATS_SERVER" ]; then need_pkgs+=(nats-server); fi
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
  echo "== installing ${need_pkgs[*]} (apt)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  # The packages' own services (default ports) play no part: every server here is
  # started by this script, on its own port, with its own config.
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
fi

RUMQTTD=$PEERS_DIR/bin/rumqttd
if wanted rumqttd && [ ! -x "$RUMQTTD" ]; then
  echo "== installing rumqttd into $PEERS_DIR (cargo install)"
  cargo install rumqttd --root "$PEERS_DIR" || echo "rumqttd: cargo install failed"
fi

if [ -z "${TETHER:-}" ]; then
  echo "== building tether (release)"
  cargo build --release -p tether
  TETHER=${CARGO_TARGET_DIR:-$ROOT/target}/release/tether
fi

# --- configs --------------------------------------------------------------------------

# Mosquitto 2.x: anonymous clients on one loopback listener, no persistence; Nagle off
# as the other servers have it; the outgoing QoS 1 window raised to the publisher's
# 1,000 and the per-client queue made large, so the throughput run is not throttled
# to 20 in flight or dropped past 1,000 queued.
cat >"$CONF/mosquitto.conf" <<EOF
listener $MOSQUITTO_PORT 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
set_tcp_nodelay true
max_inflight_messages 1000
max_queued_messages 1000000
log_dest stderr
log_type error
log_type warning
EOF

# rumqttd (fields as in its shipped rumqttd.toml): room for every connection, no delay
# between accepts (the shipped 1 ms would cap connects at 1,000/s), a QoS 1 window of
# 1,000 like Mosquitto's, no console, metrics or websocket listener.
cat >"$CONF/rumqttd.toml" <<EOF
id = 0

[router]
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$RUMQTTD_PORT"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 1000
    dynamic_filters = true
EOF

# NATS: clients drive the keepalive as MQTT and Tether clients do (async-nats pings
# every 30 s when idle). The server's own ping timer stays longer than that (2 m, its
# default), so it skips connections that pinged recently instead of doubling the pings.
cat >"$CONF/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
ping_interval: "2m"
ping_max: 2
max_connections: 65536
max_payload: 1MB
write_deadline: "10s"
EOF

# --- running --------------------------------------------------------------------------

PEER_PID=""
# start_peer NAME CMD...: starts a server with a raised fd limit, waits for its port.
start_peer() {
  local name=$1 port=$2; shift 2
  (
    ulimit -n "$FD_LIMIT" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    exec "$@"
  ) >"$OUT/$name-server.log" 2>&1 &
  PEER_PID=$!
  STARTED+=("$PEER_PID")
  local i
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$PEER_PID" 2>/dev/null; then
      echo "$name exited at start: $(tail -n 3 "$OUT/$name-server.log" | tr '\n' ' ')" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$name: port $port never accepted" >&2
  return 1
}

stop_peer() {
  if [ -n "$PEER_PID" ]; then
    kill "$PEER_PID" 2>/dev/null || true
    wait "$PEER_PID" 2>/dev/null || true
    PEER_PID=""
  fi
}

# fail ID REASON: records a failed run; its cells show the reason.
fail() {
  local id=$1 reason=$2
  echo "$reason" >"$OUT/$id.failed"
  FAILED+=("$id")
  echo "   FAILED: $reason"
}

# run_load ID JSON MODE CMD...: runs one load. MODE "stdout": the command prints its
# JSON; MODE "file": it writes JSON itself. Failure never stops the script.
run_load() {
  local id=$1 json=$2 mode=$3; shift 3
  local load waited=0
  # Let the machine settle (the last run's processes, or whatever ran before this
  # script): wait up to 90 s for a 1-minute load average below 1.
  while awk '{exit !($1 >= 1.0)}' /proc/loadavg && [ "$waited" -lt 90 ]; do
    sleep 5
    waited=$((waited + 5))
  done
  load="$(date -u +%FT%TZ) load $(uptime | sed 's/.*load average: //')"
  echo "$load" >"$OUT/$id.load"
  echo "== $id ($load)"
  local rc=0
  if [ "$mode" = stdout ]; then
    ( ulimit -n "$FD_LIMIT" 2>/dev/null || true; exec "$@" ) >"$json.tmp" 2>"$OUT/$id.stderr" || rc=$?
    [ "$rc" -ne 0 ] || mv "$json.tmp" "$json"
    rm -f "$json.tmp"
  else
    ( ulimit -n "$FD_LIMIT" 2>/dev/null || true; exec "$@" ) >"$OUT/$id.stderr" 2>&1 || rc=$?
  fi
  if [ "$rc" -ne 0 ]; then
    local why
    why=$(grep -v '^\s*$' "$OUT/$id.stderr" | tail -n 1 | cut -c1-200 || true)
    fail "$id" "${why:-exit $rc}"
  elif ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$json" 2>/dev/null; then
    fail "$id" "no JSON report"
  fi
  sleep 2 # sockets of the last run close before the next server starts
}

# peer_runs NAME PROTOCOL PORT CMD...: the three loads against one peer, each on a
# freshly started server.
peer_runs() {
  local name=$1 protocol=$2 port=$3; shift 3
  local addr=127.0.0.1:$port scenario
  for scenario in idle latency throughput; do
    local id=$name-$scenario
    if ! start_peer "$name" "$port" "$@"; then
      fail "$id" "$name did not start (see $name-server.log)"
      stop_peer
      continue
    fi
    local common=(bench peer --protocol "$protocol" --name "$name" --addr "$addr"
      --server-pid "$PEER_PID" --scenario "$scenario" --keepalive "$KEEPALIVE")
    case $scenario in
      idle) run_load "$id" "$OUT/$id.json" stdout "$TETHER" "${common[@]}" \
        --connections "$CONNS" --duration "$WINDOW" ;;
      latency) run_load "$id" "$OUT/$id.json" stdout "$TETHER" "${common[@]}" \
        --pairs "$PAIRS" --rate "$RATE" --duration "$SECONDS_LAT" ;;
      throughput) run_load "$id" "$OUT/$id.json" stdout "$TETHER" "${common[@]}" \
        --messages "$MESSAGES" ;;
    esac
    stop_peer
  done
}

version_of() { "$@" 2>&1 | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true; }

if [ ! -x "$TETHER" ]; then
  echo "no tether binary at $TETHER" >&2
  exit 1
fi


if wanted mosquitto; then
  peer_runs mosquitto mqtt "$MOSQUITTO_PORT" "$MOSQUITTO" -c "$CONF/mosquitto.conf"
  printf 'Mosquitto %s, MQTT QoS 1\tmosquitto-idle\tmosquitto-latency\tmosquitto-throughput\n' \
    "$(version_of "$MOSQUITTO" -h)" >>"$OUT/rows.tsv"
fi

if wanted rumqttd; then
  if [ -x "$RUMQTTD" ]; then
    peer_runs rumqttd mqtt "$RUMQTTD_PORT" "$RUMQTTD" -q -c "$CONF/rumqttd.toml"
  else
    for scenario in idle latency throughput; do
      fail "rumqttd-$scenario" "rumqttd not installed (cargo install rumqttd failed)"
    done
  fi
  printf 'rumqttd %s, MQTT QoS 1\trumqttd-idle\trumqttd-latency\trumqttd-throughput\n' \
    "$(version_of "$RUMQTTD" --version)" >>"$OUT/rows.tsv"
fi

if wanted nats; then
  peer_runs nats nats "$NATS_PORT" "$NATS_SERVER" -c "$CONF/nats.conf" -a 127.0.0.1 -p "$NATS_PORT"
  printf 'NATS %s, core (at most once)\tnats-idle\tnats-latency\tnats-throughput\n' \
    "$(version_of "$NATS_SERVER" --version)" >>"$OUT/rows.tsv"
fi

if wanted tether; then
  run_load tether-idle "$OUT/tether-idle.json" file "$TETHER" bench load --transport tcp \
    --connections "$CONNS" --heartbeat "$KEEPALIVE" --duration "$WINDOW" --json "$OUT/tether-idle.json"
  for durability in fsync relaxed; do
    run_load "tether-$durability-latency" "$OUT/tether-$durability-latency.json" file \
      "$TETHER" bench load --pattern pairs --pairs "$PAIRS" --rate "$RATE" \
      --duration "$SECONDS_LAT" --durability "$durability" \
      --json "$OUT/tether-$durability-latency.json"
    run_load "tether-$durability-throughput" "$OUT/tether-$durability-throughput.json" file \
      "$TETHER" bench load --pattern one-pair --messages "$MESSAGES" --durability "$durability" \
      --json "$OUT/tether-$durability-throughput.json"
  done
  printf 'Tether, fsync\ttether-idle\ttether-fsync-latency\ttether-fsync-throughput\n' >>"$OUT/rows.tsv"
  printf 'Tether, relaxed\ttether-idle\ttether-relaxed-latency\ttether-relaxed-throughput\n' >>"$OUT/rows.tsv"
fi

# The floor: a bare epoll echo server (no protocol, no sessions) under the idle load,
# for what any server's CPU per keepalive can come down to on this machine.
if wanted floor; then
  run_load floor-idle "$OUT/floor-idle.json" stdout "$TETHER" bench floor \
    --connections "$CONNS" --interval "$KEEPALIVE" --seconds "$WINDOW"
  printf 'Floor: bare epoll echo, no protocol (reference)\tfloor-idle\tnone\tnone\n' >>"$OUT/rows.tsv"
fi

# --- the table ------------------------------------------------------------------------

cp "$CONF"/mosquitto.conf "$CONF"/rumqttd.toml "$CONF"/nats.conf "$OUT"/
OUT="$OUT" CONNS="$CONNS" WINDOW="$WINDOW" KEEPALIVE="$KEEPALIVE" PAIRS="$PAIRS" RATE="$RATE" \
  SECONDS_LAT="$SECONDS_LAT" MESSAGES="$MESSAGES" python3 - <<'PY'
import json, os, re, subprocess, datetime

out = os.environ["OUT"]
env = os.environ

def find(value, key):
    """The first non-null value under `key` in a JSON tree, the top level first
    (Tether's reports keep some numbers in a nested "detail")."""
    if isinstance(value, dict):
        if value.get(key) is not None:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = find(item, key)
            if found is not None:
                return found
    return None

def report(run):
    failed = os.path.join(out, run + ".failed")
    if os.path.exists(failed):
        return None, "failed: " + open(failed).read().strip().replace("|", "/")
    path = os.path.join(out, run + ".json")
    if not os.path.exists(path):
        return None, "not run"
    try:
        return json.load(open(path)), None
    except ValueError as e:
        return None, "failed: bad JSON (%s)" % e

def cell(run, key, sub=None, fmt="{:,.0f}"):
    data, problem = report(run)
    if problem:
        return problem
    value = find(data, key)
    if isinstance(value, dict) and sub:
        value = value.get(sub)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return "n/a"

machine = {}
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            machine["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            machine["mem"] = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
except OSError:
    pass
nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()

lines = []
lines.append("# Side by side: Tether, Mosquitto, rumqttd, NATS")
lines.append("")
lines.append("Machine: %s × %s, %s RAM; date %s." % (
    nproc, machine.get("cpu", "?"), machine.get("mem", "?"),
    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
lines.append("")
lines.append("Loads: idle %s connections, keepalive %s s, window %s s; latency %s pairs at %s msg/s "
             "for %s s (QoS 1 for MQTT, NATS core); throughput one pair, %s messages of 64 bytes. "
             "Every server on loopback, started fresh for each load, sharing the machine with "
             "its load generator." % (
                 env["CONNS"], env["KEEPALIVE"], env["WINDOW"], env["PAIRS"], env["RATE"],
                 env["SECONDS_LAT"], env["MESSAGES"]))
lines.append("")
header = ["server / mode", "bytes per idle connection", "CPU µs per ping",
          "ping RTT p99 (µs)",
          "p99 latency (µs), %s msg/s over %s pairs" % (env["RATE"], env["PAIRS"]),
          "steal in the latency run (ms)",
          "one-pair msg/s"]
lines.append("| " + " | ".join(header) + " |")
lines.append("|" + "---|" * len(header))
runs = []
rows_path = os.path.join(out, "rows.tsv")
rows = [l.rstrip("\n").split("\t") for l in open(rows_path)] if os.path.exists(rows_path) else []
for label, idle, latency, throughput in rows:
    lines.append("| " + " | ".join([
        label,
        cell(idle, "server_bytes_per_connection"),
        cell(idle, "server_cpu_us_per_ping", fmt="{:.2f}"),
        cell(idle, "ping_rtt_us", "p99"),
        cell(latency, "latency_us", "p99"),
        cell(latency, "steal_ms_all_cpus"),
        cell(throughput, "msgs_per_sec"),
    ]) + " |")
    for run in (idle, latency, throughput):
        if run not in runs:
            runs.append(run)
lines.append("")
lines.append("Bytes per idle connection: server RSS growth from a tenth connected to all "
             "connected, divided by the connections added. CPU per ping: server utime+stime "
             "over the window ÷ keepalives answered in it. Tether's two rows share one idle run "
             "(durability does not apply to keepalives). n/a: the run gave no such number "
             "(async-nats exposes no ping round trip; a window shorter than the keepalive has "
             "no pings). Steal: CPU time the VM's host took from all vCPUs during the latency "
             "window (/proc/stat); a latency tail on this machine follows it (`tether bench "
             "hiccups`).")
lines.append("")
lines.append("Runs (UTC start, load average before):")
lines.append("")
for run in runs:
    load_path = os.path.join(out, run + ".load")
    load = open(load_path).read().strip() if os.path.exists(load_path) else "not run"
    data, problem = report(run)
    extra = ""
    if data is not None:
        errors, lost = find(data, "errors"), find(data, "lost")
        extra = "; errors %s" % errors if errors is not None else ""
        extra += "; lost %s" % lost if lost is not None else ""
    lines.append("- `%s`: %s%s%s" % (run, load, extra, "; " + problem if problem else ""))
table = "\n".join(lines) + "\n"
open(os.path.join(out, "table.md"), "w").write(table)
print(table)
PY

if ((${#FAILED[@]})); then
  echo "failed runs: ${FAILED[*]}" >&2
  exit 1
fi
