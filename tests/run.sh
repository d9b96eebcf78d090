#!/usr/bin/env bash
# Runs the whole meshkv test suite: unit, property and integration tests, the last
# against the real binary with real etcdctl.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
# etcdctl (v3 API) drives the server in the compatibility tests.
meshkv_need_apt etcd-client
# The fault harness puts members in network namespaces of their own (as root).
meshkv_need_apt iproute2
cargo build --tests --bins
cargo test --no-fail-fast -- --test-threads=2
