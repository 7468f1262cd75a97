#!/usr/bin/env bash
# Runs every Tether test, installing what the tests need first.
# Groups run one after another; each prints its wall time. Tests of real timing run
# with one thread (serially).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v strace >/dev/null 2>&1 || need_pkgs+=(strace)   # fsync-before-ack test
command -v pgrep >/dev/null 2>&1 || need_pkgs+=(procps)    # pgrep/kill in e2e tests
command -v kill >/dev/null 2>&1 || need_pkgs+=(procps)
command -v nft >/dev/null 2>&1 || need_pkgs+=(nftables)          # the network lab's NAT
command -v conntrack >/dev/null 2>&1 || need_pkgs+=(conntrack)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v ping >/dev/null 2>&1 || need_pkgs+=(iputils-ping)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)      # browser tests (Debian's)
command -v npm >/dev/null 2>&1 || need_pkgs+=(nodejs npm)         # playwright-core
if ((${#need_pkgs[@]})); then
  echo "== installing ${need_pkgs[*]} (apt)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

declare -a summary=()
group() {
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  local took=$((SECONDS - start))
  summary+=("$(printf '%-36s %4ds' "$name" "$took")")
  echo "== $name: ${took}s"
}

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
group "build (tests, debug)"          cargo test --workspace --no-run --quiet
group "unit (all crates)"             cargo test --workspace --lib --bins --quiet
group "store (durability, power cut)" cargo test -p tether-store --test '*' --quiet
group "client SDK (fake peer), transports (TLS heap)" cargo test -p tether-client -p tether-transport --test '*' --quiet
group "server (memory + TCP, bad input, power cut; serial)" cargo test -p tether-server --test '*' --quiet -- --test-threads=1
# The lab's scenarios run in parallel (each in its own namespaces; they mostly wait on
# timers), everything else of the tether crate serially.
e2e_tests=()
for f in crates/tether/tests/*.rs; do
  t=$(basename "$f" .rs)
  [ "$t" = lab ] || [ "$t" = chaos ] || [ "$t" = conformance ] || e2e_tests+=(--test "$t")
done
# One suite, every transport: tcp, tls, ws (proto and json), wss, quic; real timing, so
# serial.
group "transports: conformance (tcp, tls, ws, wss, quic; serial)" cargo test -p tether --test conformance --quiet -- --test-threads=1
group "end to end (CLI, processes; serial)" cargo test -p tether "${e2e_tests[@]}" --quiet -- --test-threads=1
# Debian's Chromium driven by playwright-core (npm), against a real `tether serve`.
browser_tests() {
  cargo build -p tether --quiet
  (cd crates/tether-server/web && npm ci --no-audit --no-fund --loglevel=error && npm test)
}
group "browser: SDK in Chromium (playwright-core; serial)" browser_tests
group "chaos: kills, SIGKILLs, power cuts, lossy NAT (root; serial)" cargo test -p tether --test chaos --quiet -- --test-threads=1 --nocapture
group "network lab (root: namespaces, NAT; parallel)" cargo test -p tether-lab --test '*' --quiet
group "smart heartbeat on a real NAT (root; parallel scenarios)" cargo test -p tether --test lab --quiet -- --test-threads=16

echo
echo "== test group times"
printf '%s\n' "${summary[@]}"
