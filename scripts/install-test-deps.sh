#!/usr/bin/env bash
# Installs what hawser's test suite needs on a Debian/Ubuntu machine (run as root):
# nftables and conntrack (dataplane traffic tests), iproute2 (network namespaces), kubectl
# (fake-apiserver smoke test), curl, a C compiler (ring and aws-lc build C code), and a Python
# venv at .venv with moto (AWS API), the Helm SDK and kubernetes-validate (chart tests).
# `--system` installs the Debian packages only (what the sandbox needs). Safe to run again: it
# only adds what is missing. Rust itself comes from https://rustup.rs (scripts/sandbox.sh
# installs it when cargo is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

system_only=false
[ "${1:-}" = "--system" ] && system_only=true

need_apt=()
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if ! $system_only; then
  command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: installing ${need_apt[*]} needs root; run this script as root" >&2
    exit 1
  fi
  echo "installing: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if $system_only; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r scripts/test-requirements.txt
echo "test dependencies ready"
