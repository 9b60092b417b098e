#!/usr/bin/env bash
# Installs what loopgate needs to build, test and run its demo on Debian 12.
# Idempotent: only what is missing is installed. `cargo xtask setup` (and so
# `cargo xtask test` and `cargo xtask demo`) runs this script, and so does the
# Vagrantfile's provisioner: CI exercises the same steps a fresh VM gets.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------
PKGS=(
  build-essential pkg-config ca-certificates
  curl iproute2 procps psmisc
  python3               # /usr/bin/python3: the loops in tests and the demo
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Rust toolchains -----------------------------------------------------------
for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
  [[ -d "$d" ]] && PATH="$d:$PATH"
done
export PATH
if ! command -v rustup >/dev/null; then
  log "rustup is required (stable for the agent, nightly + rust-src for the eBPF programs); install it first"
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup component add rust-src --toolchain nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker 0.10 links with the nightly toolchain's own LLVM; 0.11+ wants a
# newer LLVM than this nightly has (see ../shared/design/EBPF.md).
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.0'; then
  log "cargo +nightly install bpf-linker@0.10.0 --locked (1-2 minutes)"
  cargo +nightly install bpf-linker@0.10.0 --locked --quiet
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy'; then
  log "rustup component add clippy --toolchain nightly (lints the eBPF crate)"
  rustup component add clippy --toolchain nightly
fi
log "prerequisites present"
