#!/usr/bin/env bash
# Fairness: a noisy tenant (32 clients looping pg_sleep(0.05)) and a quiet tenant (SELECT 1
# every 100 ms) share 4 server connections. Prints the quiet tenant's wait percentiles and
# the noisy tenant's throughput through tenantpool (round robin across tenants) and, when
# installed, through PgBouncer with one pool per tenant, the 4 connections split 2 + 2 (its
# way to keep a server total: max_user_connections does not cap across these pools, as the
# "max server conns" column shows when tried).
#
#   benches/fairness.sh            # 10 s each;  DURATION=20 NOISY=64 benches/fairness.sh
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
NOISY=${NOISY:-32}
source benches/lib.sh
start_pg
export PGPASSWORD=server-secret
for t in noisy quiet; do
  psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_$t" >/dev/null
done
TPPORT=$(freeport)
cat > "$WORK/tenantpool.toml" <<TOML
[proxy]
listen = "127.0.0.1:$TPPORT"
[server]
port = $PGPORT
database = "app"
user = "tenantpool"
password = "server-secret"
max_connections = 4
min_idle = 4
[tenant_defaults]
max_server_connections = 4
[tenants.noisy]
schema = "tenant_noisy"
[tenants.quiet]
schema = "tenant_quiet"
[users.bench]
password = "bench-secret"
TOML
cargo build --release -q --bin tenantpool --example fairness
RUST_LOG=warn "$ROOT/target/release/tenantpool" --config "$WORK/tenantpool.toml" >"$WORK/tp.log" 2>&1 &
PIDS+=($!)
sleep 1
PROBE="$ROOT/target/release/examples/fairness"
conn() { echo "host=127.0.0.1 port=$1 user=bench password=bench-secret dbname=$2"; }
# Runs the probe while sampling the most server backends the pooler had open at once.
probe() {
  local out max=0 n
  "$PROBE" "$(conn "$1" noisy)" "$(conn "$1" quiet)" "$DURATION" "$NOISY" > "$WORK/probe.out" &
  local p=$!
  while kill -0 "$p" 2>/dev/null; do
    n=$(PGPASSWORD=su-secret psql -qXAt -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres \
      -c "SELECT count(*) FROM pg_stat_activity WHERE usename = 'tenantpool'" 2>/dev/null || echo 0)
    [ "$n" -gt "$max" ] && max=$n
    sleep 0.05
  done
  wait "$p" || true
  echo "$(cat "$WORK/probe.out") | max server conns $max"
}

echo "noisy: $NOISY clients looping pg_sleep(0.05); quiet: SELECT 1 every 100 ms; 4 server connections; ${DURATION}s"
printf "%-34s " "tenantpool (round robin):"
probe "$TPPORT"

if command -v pgbouncer >/dev/null; then
  start_pgbouncer "[databases]
noisy = host=127.0.0.1 port=$PGPORT dbname=app user=tenantpool password=server-secret connect_query='SET search_path TO tenant_noisy'
quiet = host=127.0.0.1 port=$PGPORT dbname=app user=tenantpool password=server-secret connect_query='SET search_path TO tenant_quiet'" "default_pool_size = 2
max_db_connections = 2"
  sleep 1
  printf "%-34s " "pgbouncer (pools of 2 + 2):"
  probe "$PB_PORT"
fi
