#!/usr/bin/env bash
# Unix sockets vs TCP, on both sides of the pooler: pgbench -S through tenantpool and
# through PgBouncer (when installed), clients over TCP or over the pooler's Unix socket, the
# pooler's server connections over TCP (server.host = "127.0.0.1") or over PostgreSQL's
# Unix socket (server.host = the socket directory). Prints TPS and the pooler's CPU time
# per transaction (utime+stime from /proc, divided by transactions), and each row's CPU
# relative to the all-TCP row of the same pooler.
#
#   benches/unix.sh                           # 10 s per run, 10 and 50 clients
#   DURATION=5 CLIENTS=20 benches/unix.sh
#   TARGETS=tenantpool MODES=extended benches/unix.sh
#   TP_BIN=target/dist/tenantpool benches/unix.sh   # a binary already built (no cargo build)
#
# One pooler process per server-side transport (each listens on TCP and on a Unix socket),
# all on one throwaway cluster that listens on 127.0.0.1 and on its socket directory.
# Needs PostgreSQL; PgBouncer is optional (apt-get install pgbouncer).
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS-"10 50"}
MODES=${MODES:-simple}
TARGETS=${TARGETS:-"direct tenantpool pgbouncer"}
POOL=${POOL:-20}
SCRIPT=${SCRIPT:--S}

source benches/lib.sh
start_pg
export PGPASSWORD=server-secret
psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_t1" >/dev/null
PGOPTIONS="-c search_path=tenant_t1" pgbench -q -i -s 1 -h 127.0.0.1 -p "$PGPORT" -U tenantpool app >/dev/null 2>&1
TP_BIN=${TP_BIN:-}
if [ -z "$TP_BIN" ]; then cargo build --release -q; TP_BIN=$ROOT/target/release/tenantpool; fi
TP_BIN=$(realpath "$TP_BIN")

# server side: tcp (127.0.0.1) or unix (PostgreSQL's socket directory, $WORK)
server_host() { case $1 in tcp) echo 127.0.0.1;; unix) echo "$WORK";; esac; }

declare -A TP_PORT TP_PID TP_SOCK PB_PORTS PB_PIDS PB_SOCK
for side in tcp unix; do
  port=$(freeport)
  sock="$WORK/tp-$side"; mkdir -p "$sock"
  {
    tp_toml "$port" "$(server_host $side)" "$PGPORT" tenantpool server-secret "$POOL" 10000 "unix_socket_dir = \"$sock\""
    printf '[tenants.t1]\nschema = "tenant_t1"\n'
  } > "$WORK/tenantpool-$side.toml"
  RUST_LOG=warn "$TP_BIN" --config "$WORK/tenantpool-$side.toml" >"$WORK/tenantpool-$side.log" 2>&1 &
  TP_PID[$side]=$!; TP_PORT[$side]=$port; TP_SOCK[$side]=$sock; PIDS+=($!)
done

PB_VERSION=""
if command -v pgbouncer >/dev/null && [[ " $TARGETS " == *" pgbouncer "* ]]; then
  PB_VERSION=$(pgbouncer --version | awk '/PgBouncer/{print $2; exit}')
  for side in tcp unix; do
    sock="$WORK/pb-$side"; mkdir -p "$sock"
    start_pgbouncer "[databases]
t1 = host=$(server_host $side) port=$PGPORT dbname=app user=tenantpool password=server-secret pool_size=$POOL connect_query='SET search_path TO tenant_t1, public'" "default_pool_size = $POOL
min_pool_size = $POOL
unix_socket_dir = $sock" "pgbouncer-$side"
    PB_PIDS[$side]=$PB_PID; PB_PORTS[$side]=$PB_PORT; PB_SOCK[$side]=$sock
  done
fi
sleep 1
# Every pooler must answer on both client sides before anything is measured.
for side in tcp unix; do
  for c in tcp unix; do
    if [[ " $TARGETS " == *" tenantpool "* ]]; then
      h=127.0.0.1; [ "$c" = unix ] && h=${TP_SOCK[$side]}
      PGPASSWORD=bench-secret psql -qXAt -h "$h" -p "${TP_PORT[$side]}" -U bench -d t1 -c "SELECT 1" >/dev/null \
        || { echo "tenantpool ($side server side) does not answer over $c" >&2; cat "$WORK/tenantpool-$side.log" >&2; exit 1; }
    fi
    if [ -n "$PB_VERSION" ]; then
      h=127.0.0.1; [ "$c" = unix ] && h=${PB_SOCK[$side]}
      PGPASSWORD=bench-secret psql -qXAt -h "$h" -p "${PB_PORTS[$side]}" -U bench -d t1 -c "SELECT 1" >/dev/null \
        || { echo "pgbouncer ($side server side) does not answer over $c" >&2; exit 1; }
    fi
  done
done

TCK=$(getconf CLK_TCK)

run() { # target client_side server_side mode clients -> prints "tps txns cpu_us_per_txn"
  local target=$1 cside=$2 sside=$3 mode=$4 c=$5 host=127.0.0.1 port pid="" user=bench db=t1
  case $target in
    direct)
      port=$PGPORT; user=tenantpool; db=app; export PGPASSWORD=server-secret
      export PGOPTIONS="-c search_path=tenant_t1"; [ "$cside" = unix ] && host=$WORK;;
    tenantpool)
      port=${TP_PORT[$sside]}; pid=${TP_PID[$sside]}; export PGPASSWORD=bench-secret; unset PGOPTIONS
      [ "$cside" = unix ] && host=${TP_SOCK[$sside]};;
    pgbouncer)
      port=${PB_PORTS[$sside]}; pid=${PB_PIDS[$sside]}; export PGPASSWORD=bench-secret; unset PGOPTIONS
      [ "$cside" = unix ] && host=${PB_SOCK[$sside]};;
  esac
  local before=0 after=0 out
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  out=$(pgbench -n $SCRIPT -M "$mode" -c "$c" -j 2 -T "$DURATION" -h "$host" -p "$port" -U "$user" "$db" 2>&1) || true
  [ -n "$pid" ] && after=$(cpu_ticks "$pid")
  local txns tps us="-"
  txns=$(echo "$out" | awk -F'[:/ ]+' '/actually processed/{s+=$6} END{print s+0}')
  tps=$(echo "$out" | awk '/^tps/{s+=$3} END{printf "%.0f", s}')
  if echo "$out" | grep -q "error"; then echo "$out" | grep error | head -3 >&2; fi
  if [ -n "$pid" ] && [ "$txns" -gt 0 ]; then
    us=$(awk -v d=$((after-before)) -v t="$txns" -v k="$TCK" 'BEGIN{printf "%.1f", d*1e6/k/t}')
  fi
  echo "$tps $txns $us"
}

printf "pgbench %s, %ss per run, pool %s, %s cores%s\n" "$SCRIPT" "$DURATION" "$POOL" "$(nproc)" "${PB_VERSION:+, PgBouncer $PB_VERSION}"
printf "%-10s %-8s %-7s %-7s %-7s | %8s | %8s | %s\n" target mode clients client server tps "us/tx" "cpu vs tcp/tcp"
for target in direct tenantpool pgbouncer; do
  [[ " $TARGETS " == *" $target "* ]] || continue
  [ "$target" = pgbouncer ] && [ -z "$PB_VERSION" ] && continue
  for mode in $MODES; do
    for c in $CLIENTS; do
      base=""
      for pair in "tcp tcp" "unix tcp" "tcp unix" "unix unix"; do
        read -r cside sside <<<"$pair"
        # Directly against PostgreSQL there is no server side.
        [ "$target" = direct ] && [ "$sside" = unix ] && continue
        read -r tps txns us < <(run "$target" "$cside" "$sside" "$mode" "$c")
        ratio="-"
        if [ "$us" != "-" ]; then
          [ -z "$base" ] && base=$us
          ratio=$(awk -v a="$us" -v b="$base" 'BEGIN{printf "%.2f", a/b}')
        fi
        [ "$target" = direct ] && sside="-"
        printf "%-10s %-8s %-7s %-7s %-7s | %8s | %8s | %s\n" "$target" "$mode" "$c" "$cside" "$sside" "$tps" "$us" "$ratio"
      done
    done
  done
done
