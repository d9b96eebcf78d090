#!/usr/bin/env bash
# Does `meshkv bench` measure what another client measures? Against a fresh meshkv and
# a fresh etcd, run etcdctl's own `check perf` (Go clientv3, etcd's report package) and
# then `meshkv bench put` with the same load: the same clients, one connection each,
# keys of 276 bytes (its prefix and 256), values of 1 KiB, at its rate for 60 s. The two
# throughputs should agree within 10%.
#
#   bash benches/crosscheck.sh [--load s|m|l|xl] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
meshkv_need_etcd
meshkv_need_apt python3

LOAD=xl
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --load) LOAD="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$LOAD" in
  s) RATE=150 CLIENTS=50 ;;
  m) RATE=1000 CLIENTS=200 ;;
  l) RATE=8000 CLIENTS=500 ;;
  xl) RATE=15000 CLIENTS=1000 ;;
  *) echo "--load is one of s, m, l, xl" >&2; exit 2 ;;
esac

cargo build --release --bin meshkv
MESHKV="$CARGO_TARGET_DIR/release/meshkv"
OUT="${OUT:-$(mktemp -d -t meshkv-crosscheck.XXXXXX)}"
mkdir -p "$OUT"
echo "results in $OUT" >&2
. benches/lib.sh
ulimit -n 65536 2>/dev/null || true

printf '| server | etcdctl check perf writes/s | meshkv bench writes/s | bench/etcdctl | etcdctl slowest s | bench max s |\n'
printf '| --- | ---: | ---: | ---: | ---: | ---: |\n'
for sys in meshkv etcd; do
  start "$sys" 1 "$OUT/data-$sys"
  ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" check perf --load "$LOAD" >"$OUT/check-$sys.txt" 2>&1 || true
  stop
  start "$sys" 1 "$OUT/data-$sys"
  "$MESHKV" bench put --endpoints "$ENDPOINTS" --clients "$CLIENTS" --conns "$CLIENTS" --rate "$RATE" \
    --duration 60 --key-size 276 --val-size 1024 --key-space 100000000 --label "$sys" \
    --case "check perf $LOAD" --json "$OUT/bench.jsonl" >"$OUT/bench-$sys.txt" 2>&1 || true
  stop
  ctl=$(sed -n 's/.*Throughput[^0-9]*\([0-9]*\) writes.*/\1/p' "$OUT/check-$sys.txt")
  slow=$(sed -n 's/.*Slowest request took[^0-9]*\([0-9.]*\)s.*/\1/p' "$OUT/check-$sys.txt")
  read -r ours max < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(round(r["ops_per_sec"]), r["max_ms"]/1000)' \
    <(grep -m1 '^{' "$OUT/bench-$sys.txt"))
  ratio=$(python3 -c "print(f'{$ours/$ctl:.3f}')" 2>/dev/null || echo "–")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$sys" "${ctl:-–}" "$ours" "$ratio" "${slow:-–}" "$max"
done
