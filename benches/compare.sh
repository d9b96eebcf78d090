#!/usr/bin/env bash
# meshkv against etcd (Debian's etcd-server), side by side on this machine.
#
# Each round starts a fresh meshkv cluster, runs every workload, stops it, then does the
# same with a fresh etcd cluster (A B, A B, ...). Both sync their log to disk before they
# answer a write (etcd always does; meshkv syncs each Raft batch), each in a data dir of
# its own, on loopback. `meshkv bench report` makes the table of medians and ratios.
#
#   bash benches/compare.sh [--members "1 3"] [--rounds 3] [--seconds 5] [--out DIR] [--load]
#
# --load adds, with one member: RSS after loading 1M keys of 256 B, and the time a
# restart with those keys takes until a linearizable read is answered.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
meshkv_need_etcd
meshkv_need_apt python3

MEMBERS="1 3"
ROUNDS=3
SECONDS_PER=5
OUT=""
LOAD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --members) MEMBERS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --seconds) SECONDS_PER="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --load) LOAD=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cargo build --release --bin meshkv
MESHKV="$CARGO_TARGET_DIR/release/meshkv"
OUT="${OUT:-$(mktemp -d -t meshkv-compare.XXXXXX)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
echo "results in $OUT" >&2

. benches/lib.sh

bench() { # bench SYSTEM CASE WORKLOAD ARGS...
  local sys="$1" case="$2" w="$3"
  shift 3
  "$MESHKV" bench "$w" --endpoints "$ENDPOINTS" --label "$sys" --case "$case" --json "$RESULTS" "$@" \
    >"$OUT/last.txt" 2>&1 || { echo "bench $w on $sys failed:" >&2; cat "$OUT/last.txt" >&2; }
  grep -m1 '^{' "$OUT/last.txt" >&2 || true
}

for n in $MEMBERS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    for sys in meshkv etcd; do
      echo "== $n member(s), round $r, $sys" >&2
      # This disk's fsync latency, the floor for a single client's put, with nothing else
      # running. The disk's speed drifts within minutes, so each round takes it anew.
      "$MESHKV" bench fsync --dir "$OUT" --total 2000 --val-size 2048 --label disk --case "fsync (disk)" \
        --json "$RESULTS" >"$OUT/last.txt"
      head -1 "$OUT/last.txt" >&2
      start "$sys" "$n" "$OUT/data-$sys"
      d=(--duration "$SECONDS_PER")
      bench "$sys" "put, 100 clients, ${n}m" put --clients 100 --conns 10 "${d[@]}"
      bench "$sys" "put, 1 client, ${n}m" put --clients 1 --conns 1 "${d[@]}"
      bench "$sys" "range linearizable, 100 clients, ${n}m" range --clients 100 --conns 10 "${d[@]}"
      bench "$sys" "range serializable, 100 clients, ${n}m" range-serializable --clients 100 --conns 10 "${d[@]}"
      bench "$sys" "txn-mixed, 100 clients, ${n}m" txn-mixed --clients 100 --conns 10 --key-space 1000 "${d[@]}"
      bench "$sys" "lease, 100 clients, ${n}m" lease --clients 100 --conns 10 "${d[@]}"
      bench "$sys" "watch events, 1000 watchers, ${n}m" watch --watchers 1000 --streams 10 --key-space 10 \
        --clients 20 --conns 10 --total 10000
      stop
    done
  done
done

if [ "$LOAD" = 1 ]; then
  for sys in meshkv etcd; do
    echo "== 1M keys, $sys" >&2
    start "$sys" 1 "$OUT/data-$sys"
    "$MESHKV" bench put --endpoints "$ENDPOINTS" --clients 100 --conns 10 --total 1000000 --key-space 1000000 \
      --sequential-keys --val-size 256 --label "$sys" --case "load 1M keys" --json "$RESULTS" >"$OUT/last.txt"
    head -1 "$OUT/last.txt" >&2
    sleep 5 # let background flushes settle before reading memory
    rss=$(rss_kib "${PIDS[0]}")
    echo "{\"label\":\"$sys\",\"case\":\"RSS after 1M keys (KiB)\",\"rss_kib\":$rss}" | tee -a "$OUT/load.jsonl" >&2
    stop
    ep="$ENDPOINTS"
    restart "$sys" "$OUT/data-$sys"
    ms=$("$MESHKV" bench ready --endpoints "$ep" --timeout 600 | sed 's/.*"ready_ms":\([0-9.]*\).*/\1/')
    echo "{\"label\":\"$sys\",\"case\":\"restart with 1M keys (ms)\",\"ready_ms\":$ms}" | tee -a "$OUT/load.jsonl" >&2
    stop
  done
fi

"$MESHKV" bench report "$RESULTS" --plot "$OUT/latency.svg" | tee "$OUT/table.md"
[ "$LOAD" = 1 ] && cat "$OUT/load.jsonl"
echo "plot: $OUT/latency.svg" >&2
