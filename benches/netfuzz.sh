#!/usr/bin/env bash
# Network fuzz bench: a throwaway PostgreSQL, the release tenantpool (auth_method = "trust"),
# then examples/netfuzz.rs: FUZZ_CONNS connections sending random and mutated frames (before
# and after login) while CLIENTS ordinary tokio-postgres clients of four tenants run simple
# transactions and check every answer is their own tenant's. Reports the ordinary clients'
# errors (must be 0), the proxy's RSS before / peak / after (it must come back down),
# whether the proxy is still alive, and how long it took. Exits 1 on ordinary errors, a dead
# proxy, or RSS that stays up.
#
#   benches/netfuzz.sh                              # 50,000 fuzz connections, 8 clients
#   FUZZ_CONNS=5000 CONCURRENCY=16 SEED=7 benches/netfuzz.sh
#   QUERY_WAIT=120s benches/netfuzz.sh              # query_wait_timeout (default 10s)
#   WORKERS=4 benches/netfuzz.sh                    # tenantpool's worker threads
#
# Needs PostgreSQL (scripts/test.sh installs it).
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_CONNS=${FUZZ_CONNS:-50000}
WARMUP=${WARMUP:-2000}
CLIENTS=${CLIENTS:-8}
CONCURRENCY=${CONCURRENCY:-32}
SEED=${SEED:-1}
POOL=${POOL:-20}
QUERY_WAIT=${QUERY_WAIT:-10s}
TENANTS="t1 t2 t3 t4 fz"

source benches/lib.sh
start_pg
TPPORT=$(freeport)
export PGPASSWORD=server-secret
for t in $TENANTS; do
  psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app \
    -c "CREATE SCHEMA tenant_$t" \
    -c "CREATE TABLE tenant_$t.who (tenant text)" \
    -c "INSERT INTO tenant_$t.who VALUES ('$t')" \
    -c "CREATE TABLE tenant_$t.scratch (t text)" >/dev/null
done
{
  cat <<TOML
[proxy]
listen = "127.0.0.1:$TPPORT"
auth_method = "trust"
max_client_conn = 10000
[server]
host = "127.0.0.1"
port = $PGPORT
database = "app"
user = "tenantpool"
password = "server-secret"
max_connections = $POOL
[limits]
query_wait_timeout = "$QUERY_WAIT"
client_login_timeout = "10s"
[tenant_defaults]
max_server_connections = $POOL
max_client_connections = 10000
# Trust still names the users who may log in (their passwords are not asked).
[users.app]
password = "unused"
[users.fuzz]
password = "unused"
[users.admin]
password = "unused"
TOML
  for t in $TENANTS; do printf '[tenants.%s]\nschema = "tenant_%s"\n' "$t" "$t"; done
} > "$WORK/tenantpool.toml"
cargo build --release -q --bin tenantpool --example netfuzz
RUST_LOG=warn "${TP_BIN:-$ROOT/target/release/tenantpool}" --config "$WORK/tenantpool.toml" ${WORKERS:+--workers "$WORKERS"} >"$WORK/tenantpool.log" 2>&1 &
TP_PID=$!; PIDS+=("$TP_PID")
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$TPPORT") 2>/dev/null && break; sleep 0.1; done
sleep 1

# Warm up with a short run of the same load (the pool's connections open, their buffers and
# the allocator's arenas grow to their working size), then RSS before.
"$ROOT/target/release/examples/netfuzz" "127.0.0.1:$TPPORT" t1,t2,t3,t4 "$WARMUP" "$CLIENTS" "$CONCURRENCY" 999 > "$WORK/warmup.out"
grep -q '^ORDINARY_ERRORS=0$' "$WORK/warmup.out" || { echo "warm-up:"; cat "$WORK/warmup.out"; }
sleep 3
rss_before=$(rss_kb "$TP_PID")
peak=$rss_before
(
  while kill -0 "$TP_PID" 2>/dev/null; do rss_kb "$TP_PID" >> "$WORK/rss"; sleep 0.2; done
) &
SAMPLER=$!; PIDS+=("$SAMPLER")

# Backends busy for more than 3 s (what holds server connections), sampled once a second.
(
  while kill -0 "$TP_PID" 2>/dev/null; do
    PGPASSWORD=su-secret psql -qXAt -h 127.0.0.1 -p "$PGPORT" -U postgres -d app -c \
      "SELECT now()::time(0), pid, state, wait_event_type, wait_event, round(extract(epoch FROM now() - state_change)), left(query, 80) FROM pg_stat_activity WHERE usename = 'tenantpool' AND state <> 'idle' AND now() - state_change > interval '3 s'" >> "$WORK/busy" 2>/dev/null || true
    PGPASSWORD=su-secret psql -qXAt -h 127.0.0.1 -p "$PGPORT" -U postgres -d app -c \
      "SELECT now()::time(0), count(*), string_agg(DISTINCT state, ',') FROM pg_stat_activity WHERE usename = 'tenantpool'" >> "$WORK/backends" 2>/dev/null || true
    if [ -n "${DIAG:-}" ]; then
      { date +%T; PGPASSWORD= psql -qXAt "host=127.0.0.1 port=$TPPORT user=admin dbname=tenantpool" -c "SHOW POOLS" -c "SHOW SERVERS"; } >> "$DIAG" 2>&1 || true
    fi
    sleep 1
  done
) &
BUSY=$!; PIDS+=("$BUSY")

start=$(date +%s.%N)
"$ROOT/target/release/examples/netfuzz" "127.0.0.1:$TPPORT" t1,t2,t3,t4 "$FUZZ_CONNS" "$CLIENTS" "$CONCURRENCY" "$SEED" | tee "$WORK/netfuzz.out"
secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

alive=no
kill -0 "$TP_PID" 2>/dev/null && alive=yes
# Idle clients' buffers are freed as they go; give the allocator a moment.
sleep 3
rss_after=$( [ "$alive" = yes ] && rss_kb "$TP_PID" || echo 0)
kill "$SAMPLER" "$BUSY" 2>/dev/null || true
peak=$(sort -n "$WORK/rss" | tail -1)
hwm=$( [ "$alive" = yes ] && awk '/VmHWM/{print $2}' "/proc/$TP_PID/status" || echo 0)
# Still serving after all that?
serving=no
PGPASSWORD= psql -qXAt "host=127.0.0.1 port=$TPPORT user=app dbname=t2" -c "SELECT tenant FROM who" 2>/dev/null | grep -qx t2 && serving=yes
errors=$(awk -F= '/^ORDINARY_ERRORS=/{print $2}' "$WORK/netfuzz.out")
panics=$(grep -c -i panick "$WORK/tenantpool.log" || true)

echo "----"
echo "took: ${secs}s for $FUZZ_CONNS fuzz connections ($CONCURRENCY at once) with $CLIENTS ordinary clients"
echo "ordinary clients' errors: $errors"
echo "proxy RSS: before ${rss_before} kB, peak ${peak} kB (VmHWM ${hwm} kB), after ${rss_after} kB"
echo "proxy alive: $alive, serving: $serving, panics in its log: $panics"
# Warnings by kind: the client address and backend pid left out, so that each kind is counted.
echo "warnings and errors in its log, by kind:"
grep -E 'WARN|ERROR' "$WORK/tenantpool.log" | sed -E 's/^[^ ]+ +//; s/ (client|backend_pid)=[^ ]+//g' \
  | sort | uniq -c | sort -rn | head -10 || true
if [ -s "$WORK/busy" ]; then
  echo "server connections busy > 3 s (time|pid|state|wait|seconds|query):"
  sort -t'|' -k2,2 -k6,6nr "$WORK/busy" | awk -F'|' '!seen[$2]++' | head -10
fi
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/tenantpool.log" "$KEEP_LOG"
echo "server backends of the pool role (min/max over the run): $(awk -F'|' 'NR==1{mn=$2;mx=$2} {if($2<mn)mn=$2; if($2>mx)mx=$2} END{print mn"/"mx}' "$WORK/backends")"
ok=1
[ "$errors" = 0 ] || ok=0
[ "$alive" = yes ] && [ "$serving" = yes ] || ok=0
# "Comes back down": within 25% (or 4 MB) of where it was after the warm-up.
awk -v b="$rss_before" -v a="$rss_after" 'BEGIN{exit !(a <= b*1.25 || a - b < 4096)}' || { echo "RSS stayed up"; ok=0; }
[ "$ok" = 1 ] || exit 1
