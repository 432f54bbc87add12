#!/usr/bin/env bash
# Instructions per transaction in tenantpool's own code (user space), counted by callgrind:
# repeatable where wall-clock CPU figures are noisy. Runs a fixed pgbench workload through
# tenantpool once per variant and prints Ir / transaction for each.
#
#   benches/callgrind.sh                 # variants: plain, metrics, settings (their costs)
#   TXNS=2000 CLIENTS=4 MODE=extended benches/callgrind.sh
#   MODE=prepared VARIANTS="plain untracked" benches/callgrind.sh
#   CG_OUT=/tmp/cg benches/callgrind.sh  # keeps /tmp/cg.<variant> for callgrind_annotate
#   TP_BIN=/tmp/tenantpool-old VARIANTS=plain benches/callgrind.sh   # another build (before/after)
#   CONNECT=1 TXNS=200 VARIANTS=plain benches/callgrind.sh   # pgbench -C: a login per transaction
#
# Variants: plain (defaults: prepared statements tracked), untracked
# (max_prepared_statements = 0), metrics (exporter on), settings (3 startup settings),
# always (reset_path_and_role = "always"), pgbouncer (PgBouncer itself under callgrind, same
# workload and pool, for comparison; needs pgbouncer).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TXNS=${TXNS:-1000}
CLIENTS=${CLIENTS:-4}
MODE=${MODE:-simple}
VARIANTS=${VARIANTS:-plain metrics settings}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)"; exit 1; }
source benches/lib.sh
start_pg
export PGPASSWORD=server-secret
bench_schema
if [ -z "${TP_BIN:-}" ]; then
  cargo build --release -q --bin tenantpool
  TP_BIN=$ROOT/target/release/tenantpool
fi

variant() { # name extra-toml [PGOPTIONS for the clients] [extra [proxy] keys]
  local port; port=$(freeport)
  cat > "$WORK/$1.toml" <<TOML
[proxy]
listen = "127.0.0.1:$port"
${4:-}
[server]
port = $PGPORT
database = "app"
user = "tenantpool"
password = "server-secret"
max_connections = 8
min_idle = 8
[tenant_defaults]
max_server_connections = 8
[tenants.t1]
schema = "tenant_t1"
[users.bench]
password = "bench-secret"
TOML
  [ -n "$2" ] && printf '%b\n' "$2" >> "$WORK/$1.toml"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$1" \
    "$TP_BIN" --workers 1 --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
  sleep 2
  # Start-up (config SCRAM keys, server logins) is not counted.
  callgrind_control -z "$pid" >/dev/null
  PGOPTIONS="${3:-}" PGPASSWORD=bench-secret pgbench -n -S ${CONNECT:+-C} -M "$MODE" -c "$CLIENTS" -j 1 -t "$TXNS" -h 127.0.0.1 -p "$port" -U bench t1 >/dev/null 2>&1
  kill -INT "$pid"; wait "$pid" || true
  report "$1" "$WORK/cg.$1"
}

# report NAME FILE: the instructions a callgrind output FILE counted, per transaction.
report() {
  [ -n "${CG_OUT:-}" ] && cp "$2" "$CG_OUT.$1"
  local ir; ir=$( (callgrind_annotate "$2" 2>/dev/null || true) | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1; exit}')
  awk -v n="$1" -v ir="$ir" -v t=$((TXNS * CLIENTS)) 'BEGIN{printf "%-10s %12d Ir total  %8.0f Ir per transaction (client logins included)\n", n, ir, ir/t}'
}

# PgBouncer with the compare script's setup (benches/lib.sh start_pgbouncer): a SCRAM
# verifier in its auth_file (no key derivation per login), which it passes through to
# PostgreSQL's role bench.
pgbouncer_variant() {
  command -v pgbouncer >/dev/null || { echo "pgbouncer   not installed"; return; }
  PB_SECRET=$(scram_verifier bench-secret)
  PGPASSWORD=su-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U postgres -d app \
    -c "DROP ROLE IF EXISTS bench" -c "CREATE ROLE bench LOGIN PASSWORD '$PB_SECRET' IN ROLE tenantpool" >/dev/null
  PB_WRAP="valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.pgbouncer" start_pgbouncer "[databases]
t1 = host=127.0.0.1 port=$PGPORT dbname=app pool_size=8 connect_query='SET search_path TO tenant_t1, public'" "default_pool_size = 8
min_pool_size = 8
log_connections = 0
log_disconnections = 0"
  wait_port "$PB_PORT"
  # Pass-through: its server connections open after a first login.
  PGPASSWORD=bench-secret psql -qX -h 127.0.0.1 -p "$PB_PORT" -U bench -d t1 -c "SELECT 1" >/dev/null
  sleep 2
  "${AS[@]}" callgrind_control -z "$PB_PID" >/dev/null
  PGPASSWORD=bench-secret pgbench -n -S ${CONNECT:+-C} -M "$MODE" -c "$CLIENTS" -j 1 -t "$TXNS" -h 127.0.0.1 -p "$PB_PORT" -U bench t1 >/dev/null 2>&1
  # A dump after the run (the part counted since the zero), then stop it.
  "${AS[@]}" callgrind_control -d "$PB_PID" >/dev/null
  kill -TERM "$PB_PID" 2>/dev/null || true
  while kill -0 "$PB_PID" 2>/dev/null; do sleep 0.1; done
  report pgbouncer "$WORK/cg.pgbouncer.1"
}

echo "callgrind: pgbench -S ${CONNECT:+-C }-M $MODE, $CLIENTS clients x $TXNS transactions"
for v in $VARIANTS; do
  case $v in
    plain) variant plain "" ;;
    untracked) variant untracked "" "" "max_prepared_statements = 0" ;;
    always) variant always "" "" 'reset_path_and_role = "always"' ;;
    metrics) variant metrics "[metrics]\nlisten = \"127.0.0.1:$(freeport)\"" ;;
    # Every client with the same session settings: should cost what no settings cost.
    settings) variant settings "" "-c statement_timeout=5s -c timezone=UTC -c datestyle=ISO,DMY" ;;
    pgbouncer) pgbouncer_variant ;;
    *) echo "unknown variant $v"; exit 1 ;;
  esac
done
