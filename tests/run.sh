#!/usr/bin/env bash
# Runs the whole meshkv test suite: unit, property and integration tests, the last
# against the real binary with real etcdctl.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
# etcdctl (v3 API) drives the server in the compatibility tests; Debian's etcd answers
# the same calls where a test compares the two.
meshkv_need_etcd
# curl plays the probes and scrapers of the HTTP endpoints; openssl makes the TLS tests'
# certificates.
meshkv_need_apt curl openssl
# The fault harness puts members in network namespaces of their own (as root).
meshkv_need_apt iproute2
# Patroni keeps PostgreSQL highly available with meshkv as its DCS (tests/t73_patroni.rs).
meshkv_need_apt patroni postgresql
# The python etcd3 client, from PyPI, runs tests/python/test_etcd3.py (pinned to the
# versions of its dependencies it works with).
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  meshkv_need_apt python3 python3-venv
fi
MESHKV_PY="$HOME/.cache/meshkv/py"
[ -x "$MESHKV_PY/bin/python" ] || python3 -m venv "$MESHKV_PY"
"$MESHKV_PY/bin/python" -c 'import etcd3' >/dev/null 2>&1 ||
  "$MESHKV_PY/bin/pip" install -q etcd3==0.12.0 tenacity==6.3.1 protobuf==3.20.3
export MESHKV_PYTHON="$MESHKV_PY/bin/python"
cargo build --tests --bins
cargo test --no-fail-fast -- --test-threads=2
