#!/usr/bin/env bash
# Load benchmark: pgbench -S through tenantpool, directly against PostgreSQL, and through
# PgBouncer when it is installed, in one run on one throwaway cluster. Prints TPS and each
# pooler's CPU time per transaction (utime+stime from /proc, divided by transactions).
#
#   benches/pgbench.sh                      # 10 s per run, 10/50/200 clients, simple+extended
#   DURATION=5 CLIENTS="10 50" MODES=simple benches/pgbench.sh
#   IDLE=2000 benches/pgbench.sh            # also: memory per idle client (after the runs)
#   CLIENTS= IDLE=2000 benches/pgbench.sh   # memory per idle client on fresh processes
#   TENANTS=100 benches/pgbench.sh          # spread clients over 100 tenants (tenantpool only)
#   EXTRA_TOML='[metrics]' benches/pgbench.sh   # append config to tenantpool's TOML
#   TARGETS="tenantpool metrics" benches/pgbench.sh   # metrics off vs on, same run
#   TARGETS="tenantpool always" benches/pgbench.sh   # reset_path_and_role = "always" vs default
#   TARGETS="tenantpool settings always always_settings" benches/pgbench.sh
#       # tenant settings (two, as an RLS context) in the prelude: default mode (sent with a
#       # reset only) and with reset_path_and_role = "always" (sent before every transaction)
#   BEFORE_BIN=/tmp/tenantpool-old TARGETS="before tenantpool" benches/pgbench.sh   # before/after
#   MODES="extended prepared" TARGETS="tenantpool untracked pgbouncer" benches/pgbench.sh
#       # named prepared statements: tracked (default), untracked (max_prepared_statements = 0,
#       # extended only: prepared fails in transaction mode), PgBouncer (prepared only from
#       # 1.21, with max_prepared_statements = 200)
#   TARGETS="tenantpool tls pgbouncer pgbouncer_tls" benches/pgbench.sh
#       # clients over TLS (sslmode=require, an ECDSA P-256 certificate made here) to
#       # tenantpool and to PgBouncer, beside both in plain TCP; the server side stays plain
#   PERF_OUT=/tmp/perf.data benches/pgbench.sh   # perf-record tenantpool during its runs
#   STRACE_DIR=/tmp/st benches/pgbench.sh        # count each pooler's syscalls per run
#
# Needs PostgreSQL; PgBouncer is optional (apt-get install pgbouncer).
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS-"10 50 200"}
MODES=${MODES:-"simple extended"}
TARGETS=${TARGETS:-"direct tenantpool pgbouncer"}
POOL=${POOL:-20}
TENANTS=${TENANTS:-1}
WORKERS=${WORKERS:-}
SCRIPT=${SCRIPT:--S}

source benches/lib.sh
start_pg
TPPORT=$(freeport)
export PGPASSWORD=server-secret
for i in $(seq 1 "$TENANTS"); do
  t=t$i
  psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_$t" >/dev/null
  PGOPTIONS="-c search_path=tenant_$t" pgbench -q -i -s 1 -h 127.0.0.1 -p "$PGPORT" -U tenantpool app >/dev/null 2>&1
done

# tenantpool
{
  tp_toml "$TPPORT" 127.0.0.1 "$PGPORT" tenantpool server-secret "$POOL" 10000
  for i in $(seq 1 "$TENANTS"); do printf '[tenants.t%s]\nschema = "tenant_t%s"\n' "$i" "$i"; done
  [ -n "${EXTRA_TOML:-}" ] && printf '%b\n' "$EXTRA_TOML"
} > "$WORK/tenantpool.toml"
cargo build --release -q
TP_ARGS=(--config "$WORK/tenantpool.toml")
[ -n "$WORKERS" ] && TP_ARGS+=(--workers "$WORKERS")
RUST_LOG=warn "$ROOT/target/release/tenantpool" "${TP_ARGS[@]}" >"$WORK/tenantpool.log" 2>&1 &
TP_PID=$!; PIDS+=("$TP_PID")

# Variants: more tenantpools beside the first, the same config with one change each.
declare -A VPORT VPID
start_variant() { # name, lines for [proxy], more TOML, binary (default: this build), lines for [tenant_defaults]
  local name=$1 proxy_extra=$2 extra=$3 bin=${4:-$ROOT/target/release/tenantpool} td_extra=${5:-} port
  port=$(freeport)
  sed -e "s/^listen = \"127.0.0.1:$TPPORT\"/listen = \"127.0.0.1:$port\"${proxy_extra:+\n$proxy_extra}/" \
      -e "s/^\[tenant_defaults\]$/[tenant_defaults]${td_extra:+\n$td_extra}/" "$WORK/tenantpool.toml" > "$WORK/tenantpool-$name.toml"
  [ -n "$extra" ] && printf '%b\n' "$extra" >> "$WORK/tenantpool-$name.toml"
  RUST_LOG=warn "$bin" --config "$WORK/tenantpool-$name.toml" ${WORKERS:+--workers "$WORKERS"} >"$WORK/tenantpool-$name.log" 2>&1 &
  VPID[$name]=$!; VPORT[$name]=$port; PIDS+=($!)
}
# metrics: the Prometheus exporter on. untracked: max_prepared_statements = 0 (extended
# only: prepared fails in transaction mode). always: reset_path_and_role = "always".
# before: another tenantpool binary (BEFORE_BIN), for before/after figures in one run.
if [[ " $TARGETS " == *" metrics "* ]]; then start_variant metrics "" "[metrics]\nlisten = \"127.0.0.1:$(freeport)\""; fi
if [[ " $TARGETS " == *" untracked "* ]]; then start_variant untracked "max_prepared_statements = 0" ""; fi
if [[ " $TARGETS " == *" always "* ]]; then start_variant always 'reset_path_and_role = "always"' ""; fi
# settings: two tenant settings (an RLS context) in every prelude.
TENANT_SETTINGS='settings = { "app.tenant" = "{tenant}", "app.tenant_id" = "7c9e6679-7425-40de-944b-e07fc1f90ae7" }'
if [[ " $TARGETS " == *" settings "* ]]; then start_variant settings "" "" "" "$TENANT_SETTINGS"; fi
if [[ " $TARGETS " == *" always_settings "* ]]; then start_variant always_settings 'reset_path_and_role = "always"' "" "" "$TENANT_SETTINGS"; fi
# tls: clients over TLS (the server side stays plain TCP in both poolers).
if [[ " $TARGETS " == *" tls "* || " $TARGETS " == *" pgbouncer_tls "* ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1
  chmod 644 "$WORK/tls.key"
fi
if [[ " $TARGETS " == *" tls "* ]]; then
  W=${WORK//\//\\/}
  start_variant tls "client_tls = \"require\"\ntls_cert_file = \"$W\/tls.crt\"\ntls_key_file = \"$W\/tls.key\"" ""
fi
if [[ " $TARGETS " == *" before "* ]]; then start_variant before "" "" "${BEFORE_BIN:?set BEFORE_BIN to an older tenantpool binary}"; fi

# PgBouncer, one pool in transaction mode with the same size, search_path set on connect.
PB_PID=""
if command -v pgbouncer >/dev/null && [[ " $TARGETS " == *" pgbouncer "* ]]; then
  PB_VERSION=$(pgbouncer --version | awk '/PgBouncer/{print $2; exit}')
  # Named prepared statements in transaction mode: PgBouncer 1.21 and later.
  PB_PREPARED=$(printf '%s\n1.21\n' "$PB_VERSION" | sort -V | head -1 | grep -qx 1.21 && echo yes || echo no)
  start_pgbouncer "[databases]
t1 = host=127.0.0.1 port=$PGPORT dbname=app user=tenantpool password=server-secret pool_size=$POOL connect_query='SET search_path TO tenant_t1, public'" "default_pool_size = $POOL
min_pool_size = $POOL
$( [ "$PB_PREPARED" = yes ] && echo 'max_prepared_statements = 200')"
  PBPORT=$PB_PORT
  if [[ " $TARGETS " == *" pgbouncer_tls "* ]]; then
    PB_PLAIN_PID=$PB_PID
    start_pgbouncer "[databases]
t1 = host=127.0.0.1 port=$PGPORT dbname=app user=tenantpool password=server-secret pool_size=$POOL connect_query='SET search_path TO tenant_t1, public'" "default_pool_size = $POOL
min_pool_size = $POOL
client_tls_sslmode = require
client_tls_key_file = $WORK/tls.key
client_tls_cert_file = $WORK/tls.crt" pgbouncer_tls
    VPORT[pgbouncer_tls]=$PB_PORT; VPID[pgbouncer_tls]=$PB_PID
    PB_PORT=$PBPORT; PB_PID=$PB_PLAIN_PID
  fi
fi
sleep 1

TCK=$(getconf CLK_TCK)

run() { # target mode clients -> prints "tps txns cpu_us_per_txn"
  local target=$1 mode=$2 c=$3 port pid="" user=bench db=t1
  case $target in
    direct) port=$PGPORT; user=tenantpool; export PGPASSWORD=server-secret; export PGOPTIONS="-c search_path=tenant_t1";;
    tenantpool) port=$TPPORT; pid=$TP_PID; export PGPASSWORD=bench-secret; unset PGOPTIONS;;
    pgbouncer) port=$PBPORT; pid=$PB_PID; export PGPASSWORD=bench-secret; unset PGOPTIONS;;
    tls|pgbouncer_tls) port=${VPORT[$target]}; pid=${VPID[$target]}; export PGPASSWORD=bench-secret PGSSLMODE=require; unset PGOPTIONS;;
    *) port=${VPORT[$target]}; pid=${VPID[$target]}; export PGPASSWORD=bench-secret; unset PGOPTIONS;;
  esac
  local before=0 after=0 out perf_pid=""
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  if [ -n "${PERF_OUT:-}" ] && [ "$target" = tenantpool ]; then
    perf record -q -e cpu-clock -F 4000 -g -p "$pid" -o "$PERF_OUT" -- sleep "$DURATION" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  if [ -n "${STRACE_DIR:-}" ] && [ -n "$pid" ]; then
    strace -c -f -p "$pid" -o "$STRACE_DIR/$target-$mode-$c.txt" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.5
  fi
  if [ "$target" != direct ] && [ "$target" != pgbouncer ] && [ "$TENANTS" -gt 1 ]; then
    # Clients spread over the tenants: one pgbench per tenant group, run together.
    local per=$(( c / TENANTS > 0 ? c / TENANTS : 1 )) outs=()
    for i in $(seq 1 "$TENANTS"); do
      pgbench -n $SCRIPT -M "$mode" -c "$per" -j 1 -T "$DURATION" -h 127.0.0.1 -p "$port" -U "$user" "t$i" > "$WORK/out.$i" 2>&1 &
      outs+=($!)
    done
    wait "${outs[@]}" || true
    out=$(cat "$WORK"/out.*); rm -f "$WORK"/out.*
  else
    out=$(pgbench -n $SCRIPT -M "$mode" -c "$c" -j 2 -T "$DURATION" -h 127.0.0.1 -p "$port" -U "$user" "$( [ $target = direct ] && echo app || echo $db )" 2>&1) || true
  fi
  [ -n "$pid" ] && after=$(cpu_ticks "$pid")
  unset PGSSLMODE
  if [ -n "${STRACE_DIR:-}" ] && [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; fi
  if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; fi
  local txns tps
  txns=$(echo "$out" | awk -F'[:/ ]+' '/actually processed/{s+=$6} END{print s+0}')
  tps=$(echo "$out" | awk '/^tps/{s+=$3} END{printf "%.0f", s}')
  if echo "$out" | grep -q "error"; then echo "$out" | grep error | head -3 >&2; fi
  local us="-"
  if [ -n "$pid" ] && [ "$txns" -gt 0 ]; then
    us=$(awk -v d=$((after-before)) -v t="$txns" -v k="$TCK" 'BEGIN{printf "%.1f", d*1e6/k/t}')
  fi
  echo "$tps $txns $us"
}

printf "pgbench %s, %ss per run, pool %s, tenants %s, %s cores\n" "$SCRIPT" "$DURATION" "$POOL" "$TENANTS" "$(nproc)"
COLS=()
for target in direct tenantpool before metrics untracked always settings always_settings tls pgbouncer pgbouncer_tls; do
  [[ " $TARGETS " == *" $target "* ]] || continue
  [ "$target" = pgbouncer ] && [ -z "$PB_PID" ] && continue
  [ "$target" = pgbouncer_tls ] && [ -z "${VPID[pgbouncer_tls]:-}" ] && continue
  COLS+=("$target")
done
header=$(printf "%-9s %-8s" mode clients)
for t in "${COLS[@]}"; do
  case $t in direct) header+=$(printf " | %-20s" "direct tps");; metrics) header+=$(printf " | %-20s" "tenantpool+metrics");; untracked) header+=$(printf " | %-20s" "tp untracked");; pgbouncer) header+=$(printf " | %-20s" "pgbouncer $PB_VERSION");; pgbouncer_tls) header+=$(printf " | %-20s" "pgbouncer TLS");; tls) header+=$(printf " | %-20s" "tenantpool TLS");; *) header+=$(printf " | %-20s" "$t tps us/tx");; esac
done
echo "$header"
for mode in $MODES; do
  for c in $CLIENTS; do
    line=$(printf "%-9s %-8s" "$mode" "$c")
    for target in "${COLS[@]}"; do
      if [ "$mode" = prepared ] && { [ "$target" = untracked ] || { [ "$target" = pgbouncer ] && [ "$PB_PREPARED" = no ]; }; }; then
        line+=$(printf " | %-20s" "n/a"); continue
      fi
      read -r tps txns us < <(run "$target" "$mode" "$c")
      if [ "$target" = direct ]; then line+=$(printf " | %-20s" "$tps"); else line+=$(printf " | %-20s" "$tps $us"); fi
    done
    echo "$line"
  done
done
if [ "${IDLE:-0}" -gt 0 ]; then
  cargo build --release -q --example idle_clients
  for target in tenantpool pgbouncer; do
    case $target in tenantpool) port=$TPPORT; pid=$TP_PID;; pgbouncer) port=$PBPORT; pid=$PB_PID;; esac
    [ -z "$pid" ] && continue
    before=$(rss_kb "$pid")
    fifo="$WORK/idle.$target"; mkfifo "$fifo"
    PGPASSWORD=bench-secret "$ROOT/target/release/examples/idle_clients" "host=127.0.0.1 port=$port user=bench password=bench-secret dbname=t1" "$IDLE" 600 > "$fifo" &
    ipid=$!
    read -r _ < "$fifo"
    sleep 1
    after=$(rss_kb "$pid")
    kill "$ipid"; wait "$ipid" 2>/dev/null || true
    awk -v b="$before" -v a="$after" -v n="$IDLE" -v t="$target" 'BEGIN{printf "%s: %d idle clients: RSS %d kB -> %d kB, %.2f kB per idle client\n", t, n, b, a, (a-b)/n}'
  done
fi
echo
echo "RSS after the runs: tenantpool $(rss_kb "$TP_PID") kB${PB_PID:+, pgbouncer $(rss_kb "$PB_PID") kB}"
