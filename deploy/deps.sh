# Sourced by deploy/run.sh and tests/run.sh: installs what building and testing meshkv
# needs on Debian, when it is missing, and points cargo at a target directory outside
# the checkout (RocksDB takes minutes to build; a fresh clone reuses it).
set -euo pipefail

meshkv_need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Building: bindgen needs libclang, raft-rs needs protoc, RocksDB needs a C++ compiler.
meshkv_need_apt libclang-dev protobuf-compiler g++ make pkg-config

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo (Rust stable) is required: https://rustup.rs" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meshkv/target}"
mkdir -p "$CARGO_TARGET_DIR"
