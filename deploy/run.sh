#!/usr/bin/env bash
# Builds meshkv and runs one member with its data in ./default.meshkv, serving clients
# on 127.0.0.1:2379. Extra arguments go to meshkv (see `meshkv --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
cargo build --bin meshkv
exec "$CARGO_TARGET_DIR/debug/meshkv" "$@"
