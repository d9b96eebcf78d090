# Shared by benches/compare.sh and benches/crosscheck.sh (sourced, with MESHKV set to
# the meshkv binary): fresh meshkv or etcd clusters on free loopback ports.

PIDS=()
ENDPOINTS=""
PEER0=""
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_ports() { # free_ports N: N free loopback ports
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# start SYSTEM N DIR: a fresh N-member cluster of meshkv or etcd, data under DIR; sets
# PIDS, ENDPOINTS (comma-separated client addresses) and PEER0; returns once every
# member answers a linearizable read.
start() {
  local sys="$1" n="$2" dir="$3" ports cports=() pports=() i
  rm -rf "$dir"; mkdir -p "$dir"
  read -r -a ports <<<"$(free_ports $((2 * n)))"
  for ((i = 0; i < n; i++)); do cports+=("${ports[$((2 * i))]}"); pports+=("${ports[$((2 * i + 1))]}"); done
  PIDS=()
  ENDPOINTS=""
  PEER0="${pports[0]}"
  local cluster=""
  for ((i = 0; i < n; i++)); do cluster+="${cluster:+,}m$i=http://127.0.0.1:${pports[$i]}"; done
  for ((i = 0; i < n; i++)); do
    local c="http://127.0.0.1:${cports[$i]}" p="http://127.0.0.1:${pports[$i]}"
    if [ "$sys" = meshkv ]; then
      local extra=()
      [ "$n" -gt 1 ] && extra=(--bootstrap-expect "$n" --join "127.0.0.1:${pports[$(((i + 1) % n))]}")
      RUST_LOG=warn "$MESHKV" --name "m$i" --data-dir "$dir/m$i" --listen-client-urls "$c" \
        --listen-peer-urls "$p" "${extra[@]}" >"$dir/m$i.log" 2>&1 &
    else
      etcd --name "m$i" --data-dir "$dir/m$i" --listen-client-urls "$c" --advertise-client-urls "$c" \
        --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "$cluster" \
        --initial-cluster-state new --log-level warn >"$dir/m$i.log" 2>&1 &
    fi
    PIDS+=("$!")
    ENDPOINTS+="${ENDPOINTS:+,}127.0.0.1:${cports[$i]}"
  done
  local ep
  for ep in ${ENDPOINTS//,/ }; do "$MESHKV" bench ready --endpoints "$ep" --timeout 120 >/dev/null; done
}

# restart SYSTEM DIR: the one member of a cluster made by `start SYSTEM 1 DIR`, again,
# on the same ports, in the background (PIDS set); the caller waits for it.
restart() {
  local sys="$1" dir="$2" ep="$ENDPOINTS" p="http://127.0.0.1:$PEER0"
  if [ "$sys" = meshkv ]; then
    RUST_LOG=warn "$MESHKV" --name m0 --data-dir "$dir/m0" --listen-client-urls "http://$ep" \
      --listen-peer-urls "$p" >>"$dir/m0.log" 2>&1 &
  else
    etcd --name m0 --data-dir "$dir/m0" --listen-client-urls "http://$ep" --advertise-client-urls "http://$ep" \
      --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --log-level warn >>"$dir/m0.log" 2>&1 &
  fi
  PIDS=("$!")
}

stop() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
