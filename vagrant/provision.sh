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
  clang libclang-dev    # pg_query builds PostgreSQL's parser (libpg_query) through bindgen
  curl iproute2 procps psmisc
  python3               # /usr/bin/python3: the loops in tests and the demo
  python3-psycopg2      # a Python PostgreSQL driver as a loop (imports under /usr/bin/python3 only)
  python3-venv          # the chdb-core venv below
  postgresql postgresql-client           # a real PostgreSQL target in tests (tests start their own)
  openssh-server openssh-client         # a real sshd target and ssh loops in tests (tests start their own sshd)
  openjdk-17-jdk-headless libpostgresql-jdbc-java  # pgjdbc as a loop (Java's source launcher needs the JDK)
  clickhouse-server clickhouse-client   # the audit store (18.16 on Debian 12); tests start their own
  chromium              # the approval page test clicks in headless Chromium
  dnsmasq-base          # a real DNS server on loopback behind the agent's resolver (tests)
  util-linux            # unshare, prlimit, setpriv (tests)
)
# Node.js drives Chromium (playwright-core); any node >= 18 will do.
command -v node >/dev/null || PKGS+=(nodejs npm)
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
# cargo-fuzz drives the fuzz targets of fuzz/ (cargo xtask fuzz, and the
# short run in cargo xtask test).
if ! cargo +nightly fuzz --version 2>/dev/null | grep -q ' 0\.13\.'; then
  log "cargo +nightly install cargo-fuzz@~0.13 --locked (2-3 minutes)"
  cargo +nightly install cargo-fuzz@~0.13 --locked --quiet
fi
# cargo-deny checks the dependency policy of deny.toml (licenses, bans,
# sources) in cargo xtask test; pinned (xtask/src/deny.rs names the same version).
if ! cargo deny --version 2>/dev/null | grep -qx 'cargo-deny 0\.20\.2'; then
  log "cargo install cargo-deny@0.20.2 --locked (2-3 minutes)"
  cargo install cargo-deny@0.20.2 --locked --quiet
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy'; then
  log "rustup component add clippy --toolchain nightly (lints the eBPF crate)"
  rustup component add clippy --toolchain nightly
fi
# chdb-core (PyPI): a current ClickHouse engine in-process, to prove the modern
# DDL and the documented analyst queries (Debian only has the 18.16 server).
VENV="${LOOPGATE_DEV_CACHE:-/var/cache/loopgate-dev}/chdb-venv"
if ! "$VENV/bin/python" -c 'import chdb' 2>/dev/null; then
  log "python venv with chdb-core at $VENV (about 900 MB)"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check chdb-core
fi
# Loops from PyPI that Debian does not package (asyncpg: PostgreSQL's binary
# format everywhere). World-readable: tests run the loops as nobody.
LOOPS="${LOOPGATE_DEV_CACHE:-/var/cache/loopgate-dev}/loops-venv"
if ! "$LOOPS/bin/python" -c 'import asyncpg' 2>/dev/null; then
  log "python venv with asyncpg at $LOOPS"
  mkdir -p "$(dirname "$LOOPS")"
  /usr/bin/python3 -m venv "$LOOPS"
  "$LOOPS/bin/pip" install --quiet --disable-pip-version-check 'asyncpg>=0.29,<1'
  chmod -R a+rX "$LOOPS"
fi
PW="${LOOPGATE_DEV_CACHE:-/var/cache/loopgate-dev}/playwright"
if [[ ! -d "$PW/node_modules/playwright-core" ]]; then
  log "npm install playwright-core into $PW (drives Debian's chromium; no browser download)"
  mkdir -p "$PW"
  npm install --prefix "$PW" --silent --no-audit --no-fund playwright-core@1
fi
log "prerequisites present"
