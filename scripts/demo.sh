#!/usr/bin/env bash
# Runs tenantpool in front of a throwaway local PostgreSQL with two demo tenants.
#   scripts/demo.sh            # builds, starts Postgres on a free port, runs the proxy on 6432
# Stop with Ctrl-C: the proxy stops and the throwaway cluster is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROXY_PORT=${PROXY_PORT:-6432}
# Installs PostgreSQL with apt-get when its server binaries are missing.

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$PGBIN" ]; then
  echo "PostgreSQL is not installed; installing it (apt-get)..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

DEMO=$(mktemp -d /tmp/tenantpool-demo.XXXXXX)
chmod 755 "$DEMO"
PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AS=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$DEMO"
  AS=(runuser -u postgres --)
fi
echo "secret-superuser" > "$DEMO/pw"; chmod 644 "$DEMO/pw"
"${AS[@]}" "$PGBIN/initdb" -D "$DEMO/data" -U postgres -A scram-sha-256 --pwfile="$DEMO/pw" >/dev/null
"${AS[@]}" "$PGBIN/pg_ctl" -D "$DEMO/data" -l "$DEMO/postgres.log" -w \
  -o "-p $PGPORT -k $DEMO -c listen_addresses=127.0.0.1" start >/dev/null
cleanup() {
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$DEMO/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$DEMO"
}
trap cleanup EXIT

export PGPASSWORD=secret-superuser
psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 <<SQL
CREATE ROLE tenantpool LOGIN PASSWORD 'server-secret';
CREATE DATABASE app OWNER tenantpool;
SQL
PGPASSWORD=server-secret psql -q -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -v ON_ERROR_STOP=1 <<SQL
CREATE SCHEMA tenant_acme;
CREATE SCHEMA tenant_globex;
CREATE TABLE tenant_acme.leads (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE tenant_globex.leads (id serial PRIMARY KEY, name text NOT NULL);
INSERT INTO tenant_acme.leads (name) VALUES ('Wile E. Coyote'), ('Road Runner');
INSERT INTO tenant_globex.leads (name) VALUES ('Hank Scorpio');
SQL

cat > "$DEMO/tenantpool.toml" <<TOML
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
auth_method = "scram-sha-256"

[server]
host = "127.0.0.1"
port = $PGPORT
database = "app"
user = "tenantpool"
password_env = "TENANTPOOL_SERVER_PASSWORD"
max_connections = 10
min_idle = 2

[tenants.acme]
schema = "tenant_acme"

[tenants.globex]
schema = "tenant_globex"
max_server_connections = 5

[users.app]
password = "app-secret"

[users.admin]
password = "admin-secret"
tenants = []
TOML

cargo build --release -q
echo
echo "PostgreSQL (throwaway) on 127.0.0.1:$PGPORT, tenantpool on 127.0.0.1:$PROXY_PORT."
echo "Try:"
echo "  PGPASSWORD=app-secret psql \"host=127.0.0.1 port=$PROXY_PORT dbname=acme user=app\" -c 'SELECT * FROM leads'"
echo "  PGPASSWORD=app-secret psql \"host=127.0.0.1 port=$PROXY_PORT dbname=globex user=app\" -c 'SELECT * FROM leads'"
echo "  PGPASSWORD=admin-secret psql \"host=127.0.0.1 port=$PROXY_PORT dbname=tenantpool user=admin\" -c 'SHOW POOLS'"
echo
TENANTPOOL_SERVER_PASSWORD=server-secret "$ROOT/target/release/tenantpool" --config "$DEMO/tenantpool.toml"
