#!/usr/bin/env bash
# tenantpool against PgBouncer, side by side in one run: the table of issue 16.
#
#   benches/compare.sh                       # every row, 5 s per run, 2 interleaved repetitions
#   DURATION=10 REPS=3 benches/compare.sh
#   ROWS="simple storm idle" benches/compare.sh     # some rows only
#   BEFORE_BIN=/tmp/tenantpool-old benches/compare.sh   # a third column: another build
#   TP_BIN=/tmp/tenantpool-x benches/compare.sh          # measure another build as "tenantpool"
#   DETAIL=1 benches/compare.sh              # also: user/system split, syscalls and context
#                                            # switches per transaction (needs perf)
#
# Rows: pgbench -S simple and extended with 10, 50 and 200 clients, pgbench's TPC-B with 50
# clients, a connection storm (pgbench -S -C, 10 clients: every transaction on a new
# connection with SCRAM, so the figure is per connection), and memory per idle client on
# fresh processes (IDLE clients, default 2000, one query each, then idle).
# Figures: each pooler's CPU (utime+stime from /proc) divided by transactions, in µs, summed
# over REPS repetitions (targets alternate order between repetitions); TPS is the mean. The
# ratio is tenantpool / PgBouncer (lower is better). PostgreSQL, pgbench and the poolers
# share the machine's cores.
set -euo pipefail
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-5}
REPS=${REPS:-2}
POOL=${POOL:-20}
IDLE=${IDLE:-2000}
WORKERS=${WORKERS:-}
DETAIL=${DETAIL:-}
if [ -n "$DETAIL" ] && ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
  echo "DETAIL=1 needs perf with tracepoints (linux-tools; run as root)"; exit 1
fi
ROWS=${ROWS:-"simple extended tpcb storm idle"}
command -v pgbouncer >/dev/null || { echo "needs PgBouncer (apt-get install pgbouncer)"; exit 1; }

source benches/lib.sh
start_pg
# PgBouncer gets a SCRAM verifier, as tenantpool derives its keys once at start, so that
# neither derives keys per login (with a cleartext auth_file PgBouncer 1.18 runs PBKDF2 on
# every login, ~5 ms). PgBouncer 1.18 then logs in to PostgreSQL with the client's SCRAM keys
# (pass-through; it fails with a forced user), so PostgreSQL gets a role bench with the same
# verifier, a member of tenantpool (the tables' owner).
PB_SECRET=$(scram_verifier bench-secret)
PGPASSWORD=su-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U postgres -d app \
  -c "CREATE ROLE bench LOGIN PASSWORD '$PB_SECRET' IN ROLE tenantpool" >/dev/null
export PGPASSWORD=server-secret
bench_schema

if [ -z "${TP_BIN:-}" ]; then
  cargo build --release -q --bin tenantpool
  TP_BIN=$ROOT/target/release/tenantpool
fi
if [[ " $ROWS " == *" idle "* ]]; then cargo build --release -q --example idle_clients; fi
TARGETS=(tenantpool)
[ -n "${BEFORE_BIN:-}" ] && TARGETS+=(before)
TARGETS+=(pgbouncer)
PB_VERSION=$(pgbouncer --version | awk '/PgBouncer/{print $2; exit}')

declare -A PORT PID
start_tp() { # name binary
  local name=$1 bin=$2 port; port=$(freeport)
  {
    tp_toml "$port" 127.0.0.1 "$PGPORT" tenantpool server-secret "$POOL" 20000
    printf '[tenants.t1]\nschema = "tenant_t1"\n'
  } > "$WORK/$name.toml"
  RUST_LOG=warn "$bin" --config "$WORK/$name.toml" ${WORKERS:+--workers "$WORKERS"} >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!; PORT[$name]=$port; PIDS+=($!)
  wait_port "$port"
}
start_pb() { # name
  start_pgbouncer "[databases]
t1 = host=127.0.0.1 port=$PGPORT dbname=app pool_size=$POOL connect_query='SET search_path TO tenant_t1, public'" "default_pool_size = $POOL
min_pool_size = $POOL
log_connections = 0
log_disconnections = 0" "$1"
  PID[$1]=$PB_PID; PORT[$1]=$PB_PORT
  # Pass-through: its server connections open after a first login.
  PGPASSWORD=bench-secret psql -qX -h 127.0.0.1 -p "$PB_PORT" -U bench -d t1 -c "SELECT 1" >/dev/null
}
start_target() { # target
  case $1 in
    tenantpool) start_tp tenantpool "$TP_BIN" ;;
    before) start_tp before "$BEFORE_BIN" ;;
    pgbouncer) start_pb pgbouncer ;;
  esac
}
stop_target() { kill "${PID[$1]}" 2>/dev/null || true; while kill -0 "${PID[$1]}" 2>/dev/null; do sleep 0.1; done; }

TCK=$(getconf CLK_TCK)
declare -A TICKS TXNS TPS UTICKS SYSCALLS SWITCHES
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }
run() { # target key pgbench-args...: adds CPU ticks and transactions under key
  local t=$1 key=$2; shift 2
  local before after out txns tps ubefore perf_pid=""
  before=$(cpu_ticks "${PID[$t]}")
  ubefore=$(user_ticks "${PID[$t]}")
  if [ -n "$DETAIL" ]; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "${PID[$t]}" -o "$WORK/perf.$t.$key" &
    perf_pid=$!
  fi
  out=$(PGPASSWORD=bench-secret pgbench -n "$@" -j 2 -T "$DURATION" -h 127.0.0.1 -p "${PORT[$t]}" -U bench t1 2>&1) || true
  after=$(cpu_ticks "${PID[$t]}")
  UTICKS[$t.$key]=$(( ${UTICKS[$t.$key]:-0} + $(user_ticks "${PID[$t]}") - ubefore ))
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
    SYSCALLS[$t.$key]=$(( ${SYSCALLS[$t.$key]:-0} + $(awk -F, '/raw_syscalls/{print $1+0}' "$WORK/perf.$t.$key") ))
    SWITCHES[$t.$key]=$(( ${SWITCHES[$t.$key]:-0} + $(awk -F, '/context-switches/{print $1+0}' "$WORK/perf.$t.$key") ))
  fi
  if echo "$out" | grep -qi "error"; then echo "$t $key: $(echo "$out" | grep -i error | head -2)" >&2; fi
  txns=$(echo "$out" | awk -F'[:/ ]+' '/actually processed/{s+=$6} END{print s+0}')
  tps=$(echo "$out" | awk '/^tps/{s+=$3} END{printf "%.0f", s}')
  TICKS[$t.$key]=$(( ${TICKS[$t.$key]:-0} + after - before ))
  TXNS[$t.$key]=$(( ${TXNS[$t.$key]:-0} + txns ))
  TPS[$t.$key]=$(( ${TPS[$t.$key]:-0} + tps ))
}

# What each row runs: key -> pgbench arguments.
declare -a KEYS=()
declare -A ARGS LABEL
add_row() { KEYS+=("$1"); ARGS[$1]=$2; LABEL[$1]=$3; }
if [[ " $ROWS " == *" simple "* ]]; then
  for c in 10 50 200; do add_row "simple$c" "-S -M simple -c $c" "select simple c$c"; done
fi
if [[ " $ROWS " == *" extended "* ]]; then
  for c in 10 50 200; do add_row "extended$c" "-S -M extended -c $c" "select extended c$c"; done
fi
if [[ " $ROWS " == *" tpcb "* ]]; then add_row tpcb50 "-M simple -c 50" "TPC-B c50"; fi
if [[ " $ROWS " == *" storm "* ]]; then add_row storm "-S -M simple -C -c 10" "storm -C c10 (per conn)"; fi

if [ ${#KEYS[@]} -gt 0 ]; then
  for t in "${TARGETS[@]}"; do start_target "$t"; done
  sleep 1
  for rep in $(seq 1 "$REPS"); do
    order=("${TARGETS[@]}")
    if [ $((rep % 2)) = 0 ]; then order=(); for ((i=${#TARGETS[@]}-1; i>=0; i--)); do order+=("${TARGETS[$i]}"); done; fi
    for key in "${KEYS[@]}"; do
      for t in "${order[@]}"; do
        # shellcheck disable=SC2086
        run "$t" "$key" ${ARGS[$key]}
      done
    done
  done
  for t in "${TARGETS[@]}"; do stop_target "$t"; done
fi

# Idle memory: a fresh process per target and repetition.
declare -A IDLE_KB
if [[ " $ROWS " == *" idle "* ]]; then
  for rep in $(seq 1 "$REPS"); do
    for t in "${TARGETS[@]}"; do
      if [ "$t" = pgbouncer ]; then start_pb "pgbouncer_idle$rep"; PID[$t]=$PB_PID; PORT[$t]=$PB_PORT; else start_target "$t"; fi
      sleep 1
      b=$(rss_kb "${PID[$t]}")
      fifo="$WORK/idle.$t.$rep"; mkfifo "$fifo"
      "$ROOT/target/release/examples/idle_clients" "host=127.0.0.1 port=${PORT[$t]} user=bench password=bench-secret dbname=t1" "$IDLE" 600 > "$fifo" &
      ipid=$!
      read -r _ < "$fifo"
      sleep 1
      a=$(rss_kb "${PID[$t]}")
      kill "$ipid"; wait "$ipid" 2>/dev/null || true
      stop_target "$t"
      IDLE_KB[$t]=$(awk -v s="${IDLE_KB[$t]:-0}" -v b="$b" -v a="$a" -v n="$IDLE" -v r="$REPS" 'BEGIN{printf "%.4f", s + (a-b)/n/r}')
    done
  done
fi

us() { # target key
  awk -v d="${TICKS[$1.$2]:-0}" -v n="${TXNS[$1.$2]:-0}" -v k="$TCK" 'BEGIN{ if (n > 0) printf "%.1f", d*1e6/k/n; else printf "-" }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else printf "-" }'; }

printf "compare: %ss per run, %s repetitions, pool %s, %s cores, tenantpool workers %s, PgBouncer %s\n" \
  "$DURATION" "$REPS" "$POOL" "$(nproc)" "${WORKERS:-default}" "$PB_VERSION"
printf "pooler CPU per transaction in µs (utime+stime / transactions), mean TPS in brackets; ratio = tenantpool / PgBouncer\n"
header=$(printf "%-26s" test)
for t in "${TARGETS[@]}"; do header+=$(printf " | %-20s" "$t"); done
header+=" | ratio"
[ -n "${BEFORE_BIN:-}" ] && header+=" | before ratio"
echo "$header"
for key in "${KEYS[@]}"; do
  line=$(printf "%-26s" "${LABEL[$key]}")
  for t in "${TARGETS[@]}"; do
    line+=$(printf " | %-20s" "$(us "$t" "$key") ($(( ${TPS[$t.$key]:-0} / REPS )))")
  done
  line+=" | $(ratio "$(us tenantpool "$key")" "$(us pgbouncer "$key")")"
  [ -n "${BEFORE_BIN:-}" ] && line+=" | $(ratio "$(us before "$key")" "$(us pgbouncer "$key")")"
  echo "$line"
done
if [[ " $ROWS " == *" idle "* ]]; then
  line=$(printf "%-26s" "idle kB/client ($IDLE)")
  for t in "${TARGETS[@]}"; do line+=$(printf " | %-20s" "$(printf '%.2f kB' "${IDLE_KB[$t]}")"); done
  line+=" | $(ratio "${IDLE_KB[tenantpool]}" "${IDLE_KB[pgbouncer]}")"
  [ -n "${BEFORE_BIN:-}" ] && line+=" | $(ratio "${IDLE_KB[before]}" "${IDLE_KB[pgbouncer]}")"
  echo "$line"
fi
if [ -n "$DETAIL" ] && [ ${#KEYS[@]} -gt 0 ]; then
  echo
  echo "where the CPU goes, per transaction: user µs / system µs / system calls / context switches"
  header=$(printf "%-26s" test)
  for t in "${TARGETS[@]}"; do header+=$(printf " | %-26s" "$t"); done
  echo "$header"
  for key in "${KEYS[@]}"; do
    line=$(printf "%-26s" "${LABEL[$key]}")
    for t in "${TARGETS[@]}"; do
      cell=$(awk -v d="${TICKS[$t.$key]:-0}" -v u="${UTICKS[$t.$key]:-0}" -v n="${TXNS[$t.$key]:-0}" \
        -v k="$TCK" -v sc="${SYSCALLS[$t.$key]:-0}" -v cs="${SWITCHES[$t.$key]:-0}" \
        'BEGIN{ if (n > 0) printf "%.1f / %.1f / %.2f / %.2f", u*1e6/k/n, (d-u)*1e6/k/n, sc/n, cs/n; else printf "-" }')
      line+=$(printf " | %-26s" "$cell")
    done
    echo "$line"
  done
fi
