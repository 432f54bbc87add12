#!/usr/bin/env bash
# The pooler's own ceiling: pgbench through tenantpool (1, 2, ... worker threads) and
# through PgBouncer to a fake PostgreSQL (examples/fakepg.rs) that answers every statement
# at once, so that what is measured is the pooler and not PostgreSQL. Prints TPS, the
# pooler's CPU (cores busy) and its transactions per CPU-second (throughput per core), and
# draws TPS against workers into an SVG (written here, no other tool).
#
#   benches/ceiling.sh                          # workers 1..4, 50 clients, 5 s per run
#   WORKERS_LIST="1 2" CLIENTS=100 MODE=extended DURATION=10 benches/ceiling.sh
#   SVG=/tmp/c.svg benches/ceiling.sh           # default docs/ceiling.svg
#
# pgbench, the fake server and the pooler share the machine's cores: on a small machine the
# load generator is a large part of the CPU, so more workers than cores-left-over cannot help.
# "direct" is pgbench straight against the fake server: the ceiling of the load generator.
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-5}
WORKERS_LIST=${WORKERS_LIST:-"1 2 3 4"}
CLIENTS=${CLIENTS:-50}
MODE=${MODE:-simple}
POOL=${POOL:-20}
FAKE_THREADS=${FAKE_THREADS:-1}
SVG=${SVG:-docs/ceiling.svg}

source benches/lib.sh
WORK=$(mktemp -d /tmp/tenantpool-ceiling.XXXXXX)
chmod 755 "$WORK"
AS=()
if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); fi
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

cargo build --release -q --bin tenantpool --example fakepg
FAKEPORT=$(freeport)
"$ROOT/target/release/examples/fakepg" "127.0.0.1:$FAKEPORT" "$FAKE_THREADS" >"$WORK/fakepg.log" 2>&1 &
FAKE_PID=$!; PIDS+=("$FAKE_PID")
wait_port "$FAKEPORT"
echo "SELECT 1;" > "$WORK/select1.sql"
TCK=$(getconf CLK_TCK)

run() { # label port pid user -> appends "label tps cores txn_per_cpu_s us_per_txn" to $WORK/data
  local label=$1 port=$2 pid=$3 user=$4 b=0 a=0 fb fa out txns tps
  [ -n "$pid" ] && b=$(cpu_ticks "$pid")
  fb=$(cpu_ticks "$FAKE_PID")
  out=$(PGPASSWORD=bench-secret pgbench -n -f "$WORK/select1.sql" -M "$MODE" -c "$CLIENTS" -j 2 -T "$DURATION" \
    -h 127.0.0.1 -p "$port" -U "$user" t1 2>&1) || true
  [ -n "$pid" ] && a=$(cpu_ticks "$pid")
  fa=$(cpu_ticks "$FAKE_PID")
  if echo "$out" | grep -qi error; then echo "$label: $(echo "$out" | grep -i error | head -2)" >&2; fi
  txns=$(echo "$out" | awk -F'[:/ ]+' '/actually processed/{s+=$6} END{print s+0}')
  tps=$(echo "$out" | awk '/^tps/{s+=$3} END{printf "%.0f", s}')
  awk -v l="$label" -v t="$tps" -v n="$txns" -v d=$((a - b)) -v f=$((fa - fb)) -v k="$TCK" -v s="$DURATION" 'BEGIN{
    cpu = d / k; printf "%s %d %.2f %.0f %.1f %.2f\n", l, t, cpu / s, (cpu > 0 ? n / cpu : 0), (n > 0 ? cpu * 1e6 / n : 0), f / k / s }' >> "$WORK/data"
}

: > "$WORK/data"
# The load generator's own ceiling: straight to the fake server.
run direct "$FAKEPORT" "" fake

for w in $WORKERS_LIST; do
  port=$(freeport)
  {
    tp_toml "$port" 127.0.0.1 "$FAKEPORT" fake "" "$POOL" 10000
    printf '[tenants.t1]\nschema = "tenant_t1"\n'
  } > "$WORK/tp.toml"
  RUST_LOG=warn "$ROOT/target/release/tenantpool" --config "$WORK/tp.toml" --workers "$w" >"$WORK/tp.$w.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_port "$port"
  sleep 1
  run "tenantpool-$w" "$port" "$pid" bench
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

if command -v pgbouncer >/dev/null; then
  [ "$(id -u)" = 0 ] && chown -R postgres "$WORK"
  start_pgbouncer "[databases]
t1 = host=127.0.0.1 port=$FAKEPORT dbname=app user=fake pool_size=$POOL" "default_pool_size = $POOL
min_pool_size = $POOL
log_connections = 0
log_disconnections = 0"
  sleep 1
  run pgbouncer "$PB_PORT" "$PB_PID" bench
fi

printf "ceiling: pgbench -f 'SELECT 1' -M %s -c %s -j 2, %ss per run, fake server (%s thread), pool %s, %s cores\n" \
  "$MODE" "$CLIENTS" "$DURATION" "$FAKE_THREADS" "$POOL" "$(nproc)"
printf "%-14s %8s %12s %18s %10s %12s\n" target tps "pooler cores" "txn/pooler-CPU-s" "µs/txn" "fake cores"
awk '{printf "%-14s %8d %12.2f %18d %10.1f %12.2f\n", $1, $2, $3, $4, $5, $6}' "$WORK/data"

# The plot: TPS against tenantpool's workers, PgBouncer and direct as horizontal lines;
# beside it, transactions per pooler CPU-second.
mkdir -p "$(dirname "$SVG")"
awk -v title="pgbench SELECT 1 -M $MODE -c $CLIENTS through each pooler to a fake server, $(nproc) cores" '
function esc(s) { gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); return s }
function panel(x0, label, col,    i, ymax, x, y, pts, px, w) {
  ymax = 0
  for (i = 1; i <= nw; i++) if (v[col, i] > ymax) ymax = v[col, i]
  if (pb[col] > ymax) ymax = pb[col]
  if (col == 2 && direct > ymax) ymax = direct
  ymax = ymax * 1.15; if (ymax <= 0) ymax = 1
  printf "<text x=\"%d\" y=\"50\" font-size=\"13\">%s</text>\n", x0, esc(label)
  printf "<line x1=\"%d\" y1=\"320\" x2=\"%d\" y2=\"320\" stroke=\"black\"/><line x1=\"%d\" y1=\"60\" x2=\"%d\" y2=\"320\" stroke=\"black\"/>\n", x0 + 50, x0 + 330, x0 + 50, x0 + 50
  for (i = 0; i <= 4; i++) {
    y = 320 - 260 * i / 4
    printf "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%d\" y=\"%.1f\" font-size=\"10\" text-anchor=\"end\">%d</text>\n", x0 + 50, y, x0 + 330, y, x0 + 46, y + 3, ymax * i / 4
  }
  pts = ""
  for (i = 1; i <= nw; i++) {
    px = x0 + 50 + 280 * (nw > 1 ? (i - 1) / (nw - 1) : 0.5)
    y = 320 - 260 * v[col, i] / ymax
    pts = pts sprintf("%.1f,%.1f ", px, y)
    printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#1f6feb\"/><text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"middle\">%d</text>\n", px, y, px, y - 7, v[col, i]
    printf "<text x=\"%.1f\" y=\"334\" font-size=\"10\" text-anchor=\"middle\">%s</text>\n", px, wk[i]
  }
  printf "<polyline points=\"%s\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\"/>\n", pts
  printf "<text x=\"%d\" y=\"350\" font-size=\"11\" text-anchor=\"middle\">tenantpool worker threads</text>\n", x0 + 190
  if (pb[col] > 0) {
    y = 320 - 260 * pb[col] / ymax
    printf "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#d1242f\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/><text x=\"%d\" y=\"%.1f\" font-size=\"10\" fill=\"#d1242f\" text-anchor=\"end\">PgBouncer (1 thread) %d</text>\n", x0 + 50, y, x0 + 330, y, x0 + 330, y - 4, pb[col]
  }
  if (col == 2 && direct > 0) {
    y = 320 - 260 * direct / ymax
    printf "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#777\" stroke-dasharray=\"2,3\"/><text x=\"%d\" y=\"%.1f\" font-size=\"10\" fill=\"#555\">no pooler %d</text>\n", x0 + 50, y, x0 + 330, y, x0 + 54, y - 4, direct
  }
}
$1 == "direct" { direct = $2; next }
$1 == "pgbouncer" { pb[2] = $2; pb[4] = $4; next }
$1 ~ /^tenantpool-/ { nw++; wk[nw] = substr($1, 12); v[2, nw] = $2; v[4, nw] = $4 }
END {
  print "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"370\" font-family=\"sans-serif\">"
  print "<rect width=\"760\" height=\"370\" fill=\"white\"/>"
  printf "<text x=\"380\" y=\"22\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n", esc(title)
  panel(10, "transactions per second", 2)
  panel(390, "transactions per pooler CPU-second", 4)
  print "</svg>"
}' "$WORK/data" > "$SVG"
echo "plot: $SVG"
