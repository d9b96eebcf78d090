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

# Debian's etcd (the reference the tests and benches compare with) and etcdctl. They
# start their own etcd on free ports; the package's service, where systemd started it,
# would hold 2379, where meshkv serves by default, so it is stopped and left disabled.
meshkv_need_etcd() {
  if ! dpkg -s etcd-server >/dev/null 2>&1; then
    meshkv_need_apt etcd-server
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      local sudo=""
      [ "$(id -u)" -eq 0 ] || sudo="sudo"
      $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
  fi
  meshkv_need_apt etcd-client
}

# Building: bindgen needs libclang, raft-rs needs protoc, RocksDB needs a C++ compiler.
meshkv_need_apt libclang-dev protobuf-compiler g++ make pkg-config

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo (Rust stable) is required: https://rustup.rs" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meshkv/target}"
mkdir -p "$CARGO_TARGET_DIR"
