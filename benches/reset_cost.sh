#!/usr/bin/env bash
# What a tenant switch costs PostgreSQL: the reset tenantpool sends before a connection serves
# another tenant (or another client after session state was left), timed alone with pgbench
# on one connection (latency = round trips + server time). "discard" is two round trips here
# (DISCARD ALL cannot share a query string), one in the proxy, which pipelines them: read its
# figure as one round trip (the "set" line) too high.
#
#   benches/reset_cost.sh
#
# "discard": DISCARD ALL + SET search_path (max_prepared_statements = 0, or after an SQL
# PREPARE). "keep": everything DISCARD ALL does but DEALLOCATE ALL / DISCARD PLANS, so the
# proxy's prepared statements survive, + SET search_path. "set": SET search_path alone (a
# fresh connection). The difference keep - discard is what keeping statements costs per
# switch; it pays off when the tenant then uses any statement the connection already has
# (each would otherwise be parsed again): "parse" is the cost of parsing one trivial statement
# (SELECT 1 over the extended protocol minus the same prepared), a lower bound.
# The "keep" statements are src/tenant.rs's RESET_KEEPING_STATEMENTS: keep them in step.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
start_pg
export PGPASSWORD=server-secret

tps() { # mode script
  printf '%s\n' "$2" > "$WORK/x.sql"
  pgbench -n -M "$1" -c 1 -j 1 -T "${DURATION:-5}" -f "$WORK/x.sql" -h 127.0.0.1 -p "$PGPORT" -U tenantpool app 2>&1 | awk '/^tps/{print $3}'
}
run() {
  local t; t=$(tps simple "$2")
  awk -v n="$1" -v t="$t" 'BEGIN{printf "%-8s %8.0f /s  %6.1f us each\n", n, t, 1e6/t}'
}
echo "reset cost, one connection, PostgreSQL $(pg_config --version 2>/dev/null | awk '{print $2}')"
run discard 'DISCARD ALL;
SET search_path TO tenant_t1, public;'
run keep 'CLOSE ALL \; SET SESSION AUTHORIZATION DEFAULT \; RESET ALL \; UNLISTEN * \; SELECT pg_advisory_unlock_all() \; DISCARD TEMP \; DISCARD SEQUENCES \; SET search_path TO tenant_t1, public;'
run set 'SET search_path TO tenant_t1, public;'
ext=$(tps extended 'SELECT 1;'); prep=$(tps prepared 'SELECT 1;')
awk -v e="$ext" -v p="$prep" 'BEGIN{printf "%-8s %8s     %6.1f us each\n", "parse", "", 1e6/e - 1e6/p}'
