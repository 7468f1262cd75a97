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
command -v jq >/dev/null 2>&1 || need_pkgs+=(jq)                  # picks test binaries
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)        # TLS interop test
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
# A fresh checkout builds once: incremental caches only cost disk there.
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0

# Everything is built once, for the whole workspace. The groups below run the built test
# binaries themselves: `cargo test -p X` would resolve dependency features for X alone
# and rebuild half the dependency tree (six copies of syn, gigabytes of disk) per group.
target_dir="${CARGO_TARGET_DIR:-target}"
bins="$target_dir/test-binaries.json"
build_tests() {
  mkdir -p "$target_dir"
  cargo test --workspace --no-run --quiet --message-format=json-render-diagnostics >"$bins"
}
# run_tests PACKAGE TARGET... [-- TEST-ARGS...]: runs integration-test binaries of one
# package the way `cargo test` does (from the package's directory), stopping at the
# first that fails.
run_tests() {
  local pkg="$1"; shift
  local -a targets=() args=()
  while (($#)) && [ "$1" != -- ]; do targets+=("$1"); shift; done
  (($#)) && { shift; args=("$@"); }
  if [ "${targets[0]}" = '*' ]; then
    mapfile -t targets < <(jq -r --arg m "/crates/$pkg/Cargo.toml" \
      'select(.reason == "compiler-artifact" and .executable != null and .profile.test
              and (.target.kind | index("test")) and (.manifest_path | endswith($m)))
       | .target.name' "$bins" | sort -u)
  fi
  ((${#targets[@]})) || { echo "no test targets for $pkg" >&2; return 1; }
  local t exe
  for t in "${targets[@]}"; do
    exe=$(jq -r --arg m "/crates/$pkg/Cargo.toml" --arg t "$t" \
      'select(.reason == "compiler-artifact" and .executable != null and .profile.test
              and (.target.kind | index("test")) and .target.name == $t
              and (.manifest_path | endswith($m)))
       | .executable' "$bins" | tail -n1)
    [ -n "$exe" ] || { echo "test target $pkg/$t was not built" >&2; return 1; }
    echo "     Running tests/$t.rs ($pkg)"
    (cd "crates/$pkg" && "$exe" --quiet "${args[@]}") || return 1
  done
}

group "build (tests, debug)"          build_tests
group "unit (all crates)"             cargo test --workspace --lib --bins --quiet
group "store (durability, power cut)" run_tests tether-store '*'
client_and_transport() { run_tests tether-client '*' && run_tests tether-transport '*'; }
group "client SDK (fake peer), transports (TLS heap)" client_and_transport
group "server (memory + TCP, bad input, power cut; serial)" run_tests tether-server '*' -- --test-threads=1
# The lab's scenarios run in parallel (each in its own namespaces; they mostly wait on
# timers), everything else of the tether crate serially.
e2e_tests=()
for f in crates/tether/tests/*.rs; do
  t=$(basename "$f" .rs)
  [ "$t" = lab ] || [ "$t" = chaos ] || [ "$t" = conformance ] || e2e_tests+=("$t")
done
# One suite, every transport: tcp, tls, ws (proto and json), wss, quic; real timing, so
# serial.
group "transports: conformance (tcp, tls, ws, wss, quic; serial)" run_tests tether conformance -- --test-threads=1
group "end to end (CLI, processes; serial)" run_tests tether "${e2e_tests[@]}" -- --test-threads=1
# Debian's Chromium driven by playwright-core (npm), against a real `tether serve`
# (the debug build made with the tests above).
browser_tests() {
  local bin
  bin="$(realpath "$target_dir")/debug/tether"
  [ -x "$bin" ] || { echo "$bin was not built" >&2; return 1; }
  (cd crates/tether-server/web && npm ci --no-audit --no-fund --loglevel=error &&
    TETHER_BIN="$bin" npm test)
}
group "browser: SDK in Chromium (playwright-core; serial)" browser_tests
group "chaos: kills, SIGKILLs, power cuts, lossy NAT (root; serial)" run_tests tether chaos -- --test-threads=1 --nocapture
group "network lab (root: namespaces, NAT; parallel)" run_tests tether-lab '*'
group "smart heartbeat on a real NAT (root; parallel scenarios)" run_tests tether lab -- --test-threads=16

echo
echo "== test group times"
printf '%s\n' "${summary[@]}"
