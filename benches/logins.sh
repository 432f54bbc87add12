#!/usr/bin/env bash
# What a switch between server logins costs, next to a tenant switch on the shared login.
# pgbench -S through tenantpool with TENANTS tenants busy at once on a pool of POOL < TENANTS
# server connections, so connections keep changing tenant. Two tenantpools on one throwaway
# cluster, run one after the other:
#
#   shared  every tenant on [server] user: a switch is a reset + SET search_path
#   logins  every tenant with a server_user of its own: a switch closes the connection and
#           opens one with the other login (PostgreSQL starts a backend; SCRAM both ways)
#
# Prints TPS, tenantpool's CPU per transaction (utime+stime from /proc), PostgreSQL's CPU per
# transaction (all its processes, exited backends included), and how many tenant switches
# (shared) or server connections opened (logins) there were per 1000 transactions.
#
#   benches/logins.sh
#   TENANTS=8 POOL=4 CLIENTS=2 DURATION=10 MODE=simple benches/logins.sh   # the defaults
#
# CLIENTS is per tenant. Needs PostgreSQL (server binaries, psql, pgbench) and curl.
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
TENANTS=${TENANTS:-8}
POOL=${POOL:-4}
CLIENTS=${CLIENTS:-2}
DURATION=${DURATION:-10}
MODE=${MODE:-simple}
WORKERS=${WORKERS:-}

source benches/lib.sh
start_pg
PGMASTER=$(head -n 1 "$WORK/data/postmaster.pid")
for i in $(seq 1 "$TENANTS"); do
  PGPASSWORD=server-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_t$i" >/dev/null
  PGPASSWORD=server-secret PGOPTIONS="-c search_path=tenant_t$i" pgbench -q -i -s 1 -h 127.0.0.1 -p "$PGPORT" -U tenantpool app >/dev/null 2>&1
  # A role per tenant that may read only its own schema.
  PGPASSWORD=su-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U postgres -d app \
    -c "CREATE ROLE login_t$i LOGIN PASSWORD 'secret-t$i'" \
    -c "GRANT USAGE ON SCHEMA tenant_t$i TO login_t$i" \
    -c "GRANT SELECT ON ALL TABLES IN SCHEMA tenant_t$i TO login_t$i" >/dev/null
done

start_tp() { # name logins(yes/no) -> sets PORT_<name>, PID_<name>, MPORT_<name>
  local name=$1 port mport
  port=$(freeport); mport=$(freeport)
  {
    cat <<TOML
[proxy]
listen = "127.0.0.1:$port"
max_client_conn = 10000
[metrics]
listen = "127.0.0.1:$mport"
[server]
host = "127.0.0.1"
port = $PGPORT
database = "app"
user = "tenantpool"
password = "server-secret"
max_connections = $POOL
min_idle = 0
[tenant_defaults]
max_server_connections = $POOL
[users.bench]
password = "bench-secret"
TOML
    for i in $(seq 1 "$TENANTS"); do
      printf '[tenants.t%s]\nschema = "tenant_t%s"\n' "$i" "$i"
      [ "$2" = yes ] && printf 'server_user = "login_t%s"\nserver_password = "secret-t%s"\n' "$i" "$i"
    done
  } > "$WORK/$name.toml"
  RUST_LOG=warn "$ROOT/target/release/tenantpool" --config "$WORK/$name.toml" ${WORKERS:+--workers "$WORKERS"} >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  printf -v "PID_$name" %s "$!"
  printf -v "PORT_$name" %s "$port"
  printf -v "MPORT_$name" %s "$mport"
}

# PostgreSQL's CPU ticks so far: the postmaster, its live children, and the children it
# has reaped (cutime/cstime), so backends that ended during a run are counted too.
pg_ticks() {
  local total p
  total=$(awk '{print $14+$15+$16+$17}' "/proc/$PGMASTER/stat")
  for p in $(pgrep -P "$PGMASTER"); do
    total=$((total + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

metric() { # port series
  curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s {print $2; exit}'
}

cargo build --release -q
start_tp shared no
start_tp logins yes
sleep 1
TCK=$(getconf CLK_TCK)

pgbench_all() { # port seconds -> transactions processed
  local i outs=()
  for i in $(seq 1 "$TENANTS"); do
    PGPASSWORD=bench-secret pgbench -n -S -M "$MODE" -c "$CLIENTS" -j 1 -T "$2" -h 127.0.0.1 -p "$1" -U bench "t$i" > "$WORK/out.$i" 2>&1 &
    outs+=($!)
  done
  wait "${outs[@]}" || true
  if grep -qi error "$WORK"/out.*; then grep -hi error "$WORK"/out.* | head -3 >&2; fi
  awk -F'[:/ ]+' '/actually processed/{s+=$6} END{print s+0}' "$WORK"/out.*
  rm -f "$WORK"/out.*
}

run() { # name -> "tps tp_us pg_us switches_per_1000 connects_per_1000"
  local name=$1 port pid mport
  port=PORT_$name; port=${!port}; pid=PID_$name; pid=${!pid}; mport=MPORT_$name; mport=${!mport}
  pgbench_all "$port" 2 >/dev/null # warm up
  sleep 1
  local tp0 pg0 sw0 cn0 txns tp1 pg1 sw1 cn1
  sw0=$(metric "$mport" tenantpool_search_path_switches_total)
  cn0=$(metric "$mport" 'tenantpool_server_connects_total{result="ok"}')
  tp0=$(cpu_ticks "$pid"); pg0=$(pg_ticks)
  txns=$(pgbench_all "$port" "$DURATION")
  tp1=$(cpu_ticks "$pid"); pg1=$(pg_ticks)
  sleep 1 # the metrics refresh every 500 ms
  sw1=$(metric "$mport" tenantpool_search_path_switches_total)
  cn1=$(metric "$mport" 'tenantpool_server_connects_total{result="ok"}')
  awk -v n="$txns" -v d="$DURATION" -v tp=$((tp1 - tp0)) -v pg=$((pg1 - pg0)) -v k="$TCK" \
      -v sw="$(awk -v a="$sw0" -v b="$sw1" 'BEGIN{print b-a}')" \
      -v cn="$(awk -v a="$cn0" -v b="$cn1" 'BEGIN{print b-a}')" \
      'BEGIN{ if (n == 0) n = 1; printf "%.0f %.1f %.1f %.0f %.0f\n", n/d, tp*1e6/k/n, pg*1e6/k/n, sw*1000/n, cn*1000/n }'
}

printf "pgbench -S -M %s, %s tenants x %s clients, pool %s, %ss per run, %s cores, PostgreSQL %s\n" \
  "$MODE" "$TENANTS" "$CLIENTS" "$POOL" "$DURATION" "$(nproc)" "$("$PGBIN/postgres" --version | awk '{print $3}')"
printf "%-8s %9s %14s %14s %18s %18s\n" target tps "tp us/tx" "pg us/tx" "switches/1000tx" "connects/1000tx"
declare -A R
for name in shared logins; do
  read -r tps tpus pgus sw cn < <(run "$name")
  R[$name]="$tps $tpus $pgus $cn"
  printf "%-8s %9s %14s %14s %18s %18s\n" "$name" "$tps" "$tpus" "$pgus" "$sw" "$cn"
done
# What one login switch costs beyond a shared-login tenant switch, per process: the extra
# CPU per transaction spread over the connections opened.
read -r _ s_tp s_pg _ <<<"${R[shared]}"
read -r _ l_tp l_pg l_cn <<<"${R[logins]}"
awk -v stp="$s_tp" -v spg="$s_pg" -v ltp="$l_tp" -v lpg="$l_pg" -v cn="$l_cn" 'BEGIN{
  if (cn > 0) printf "per login switch, beyond a tenant switch: tenantpool %.0f us CPU, PostgreSQL %.0f us CPU\n", (ltp-stp)*1000/cn, (lpg-spg)*1000/cn }'
