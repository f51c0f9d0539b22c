#!/usr/bin/env bash
# The hawser sandbox in one command, from a fresh clone on Debian/Ubuntu:
#
#   scripts/sandbox.sh [--nodes N] [--replicas N] [--state-dir DIR]
#
# installs the Debian packages it needs (nftables, conntrack, iproute2, kubectl, curl, a C
# compiler) and, when cargo is missing, Rust through rustup; builds with the test suite's own
# build command, so the sandbox and `cargo test --workspace --all-features` share every artifact
# (after the tests nothing is compiled); then runs target/debug/hawser-sandbox with the
# arguments given, until Ctrl-C. The sandbox needs root: as another user the script uses sudo
# for the packages and the sandbox, and builds as that user.
#
#   scripts/sandbox.sh --check [ARGS]
#
# is the same path without a person: it starts the sandbox, curls the address it prints from
# this machine and expects every backend to answer, stops it with SIGINT as Ctrl-C does, and
# checks that nothing is left (network namespaces, host link and routes, processes, slot lock
# file, state directory). CI runs it after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
sandbox="$target/debug/hawser-sandbox"

check=false
if [ "${1:-}" = "--check" ]; then
  check=true
  shift
fi

say() { echo "sandbox.sh: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    say "this needs root (network namespaces, nftables, routes): run it as root, or install sudo"
    exit 1
  fi
}

prepare() {
  as_root bash scripts/install-test-deps.sh --system
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found: installing Rust with rustup (https://rustup.rs) into ~/.cargo"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
  fi
  if [ ! -x "$sandbox" ]; then
    say "building; the first build takes about 18 minutes on 2 cores and ~5 GB of disk"
  fi
  # The README's test command, without running the tests: the same features and profile, so
  # neither this nor the tests ever rebuild what the other built.
  cargo test --workspace --all-features --no-run --quiet
}

# Is pid $1 still running (a zombie waiting for its parent counts as gone)?
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

run_check() {
  local state_dir=/run/hawser-sandbox replicas=2 prev=""
  for a in "$@"; do
    case "$prev" in
      --state-dir) state_dir=$a ;;
      --replicas) replicas=$a ;;
    esac
    prev=$a
  done
  local started=$SECONDS
  # Global: the EXIT trap reads them after this function has returned.
  out=$(mktemp)
  "$sandbox" "$@" >"$out" 2>&1 &
  pid=$!
  # Whatever happens below, the sandbox is stopped the way a person stops it.
  trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$out"' EXIT
  fail() {
    say "check FAILED: $*"
    sed 's/^/  | /' "$out" >&2
    exit 1
  }
  local i
  for i in $(seq 240); do
    grep -q '^Ctrl-C stops it' "$out" && break
    kill -0 "$pid" 2>/dev/null || fail "the sandbox exited before it was ready"
    sleep 0.5
  done
  grep -q '^Ctrl-C stops it' "$out" || fail "not ready after 120 s"
  local addr
  addr=$(sed -n 's/^ *load-balancer address: *//p' "$out")
  [ -n "$addr" ] || fail "no load-balancer address printed"
  local pids
  pids=$(cat "$state_dir/pids")
  local answers=() answer
  for i in $(seq 20); do
    answer=$(curl -fsS --max-time 5 "http://$addr/hostname") || fail "curl http://$addr/hostname failed"
    answers+=("$answer")
  done
  local names
  names=$(printf '%s\n' "${answers[@]}" | sort -u)
  printf '%s\n' "$names" | grep -qvE '^demo-[0-9]+$' && fail "unexpected answers: $names"
  local want=$((replicas < 2 ? replicas : 2))
  [ "$(printf '%s\n' "$names" | wc -l)" -ge "$want" ] || fail "only $names answered 20 requests"

  kill -INT "$pid"
  local rc=0
  wait "$pid" || rc=$?
  trap 'rm -f "$out"' EXIT
  [ "$rc" = 0 ] || fail "the sandbox exited with $rc after SIGINT"
  local left=()
  [ -z "$(ip netns list | awk '$1 ~ /^hws-/')" ] || left+=("network namespaces: $(ip netns list | awk '$1 ~ /^hws-/ {print $1}' | xargs)")
  ip link show hws-h >/dev/null 2>&1 && left+=("host link hws-h")
  [ -z "$(ip route show 203.0.113.0/24)" ] || left+=("route to 203.0.113.0/24")
  [ -z "$(ip route show 10.231.0.0/22)" ] || left+=("route to 10.231.0.0/22")
  for p in $pids; do
    alive "$p" && left+=("process $p ($(cat "/proc/$p/comm" 2>/dev/null))")
  done
  [ -e /run/hawser-e2e/slot-0.lock ] && left+=("lock file /run/hawser-e2e/slot-0.lock")
  [ -e "$state_dir" ] && left+=("state directory $state_dir")
  [ "${#left[@]}" = 0 ] || fail "left behind: ${left[*]}"
  say "check passed in $((SECONDS - started)) s: $addr answered as $(echo $names), and Ctrl-C left nothing behind"
}

if [ "${HAWSER_SANDBOX_PREPARED:-}" != 1 ]; then
  prepare
fi
if [ "$(id -u)" != 0 ]; then
  # Built as this user; the sandbox itself runs as root.
  as_root env HAWSER_SANDBOX_PREPARED=1 CARGO_TARGET_DIR="$target" \
    bash "$PWD/scripts/sandbox.sh" $($check && echo --check) "$@"
  exit
fi
if $check; then
  run_check "$@"
else
  exec "$sandbox" "$@"
fi
