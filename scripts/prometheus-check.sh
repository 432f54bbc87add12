#!/usr/bin/env bash
# Runs a real Prometheus (Debian package `prometheus`, installed if missing) against
# tenantpool in front of a throwaway PostgreSQL: `promtool check metrics` must be clean on
# tenantpool's /metrics, and a histogram_quantile over the wait histogram must return a number.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing prometheus (apt-get)..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
fi
source benches/lib.sh
start_pg
export PGPASSWORD=server-secret
psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_acme" -c "CREATE SCHEMA tenant_globex" >/dev/null
TPPORT=$(freeport); MPORT=$(freeport); PROMPORT=$(freeport)
cat > "$WORK/tenantpool.toml" <<TOML
[proxy]
listen = "127.0.0.1:$TPPORT"
[metrics]
listen = "127.0.0.1:$MPORT"
[server]
port = $PGPORT
database = "app"
user = "tenantpool"
password = "server-secret"
max_connections = 4
min_idle = 1
[tenant_defaults]
max_server_connections = 2
[tenants.acme]
schema = "tenant_acme"
[tenants.globex]
schema = "tenant_globex"
[users.bench]
password = "bench-secret"
TOML
cargo build --release -q --bin tenantpool
RUST_LOG=warn "$ROOT/target/release/tenantpool" --config "$WORK/tenantpool.toml" >"$WORK/tp.log" 2>&1 &
PIDS+=($!)
sleep 1

promtool check config config/prometheus.yml
cat > "$WORK/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: tenantpool
    static_configs:
      - targets: ["127.0.0.1:$MPORT"]
YML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
  --web.listen-address="127.0.0.1:$PROMPORT" >"$WORK/prom.log" 2>&1 &
PIDS+=($!)

# Traffic: more clients than acme's cap, so transactions queue.
export PGPASSWORD=bench-secret
for t in acme globex; do
  pgbench -n -c 6 -j 1 -T 8 -f <(echo "SELECT pg_sleep(0.005);") -h 127.0.0.1 -p "$TPPORT" -U bench "$t" >/dev/null 2>&1 &
done
sleep 4
curl -s "http://127.0.0.1:$MPORT/metrics" > "$WORK/metrics.txt"
promtool check metrics < "$WORK/metrics.txt"
echo "promtool check metrics: clean ($(grep -c '^tenantpool_' "$WORK/metrics.txt") series)"
wait %3 %4 2>/dev/null || sleep 5
sleep 2
Q='histogram_quantile(0.99, sum by (le) (rate(tenantpool_wait_duration_seconds_bucket{tenant="acme"}[10s])))'
ANS=$(curl -s --get "http://127.0.0.1:$PROMPORT/api/v1/query" --data-urlencode "query=$Q" --data-urlencode "time=$(( $(date +%s) - 3 ))")
echo "Prometheus: $Q = $ANS"
python3 - "$ANS" <<'PY'
import json, math, sys
r = json.loads(sys.argv[1])
assert r["status"] == "success", r
v = float(r["data"]["result"][0]["value"][1])
assert not math.isnan(v), "histogram_quantile returned NaN"
print(f"ok: p99 wait for acme = {v * 1000:.2f} ms")
PY
