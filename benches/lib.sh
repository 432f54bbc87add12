# Shared by the benchmark scripts: a throwaway PostgreSQL cluster and small helpers.
# Source it, then call start_pg; it sets PGBIN, WORK, PGPORT, AS and a cleanup trap.

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

# Waits (up to 10 s) until something listens on 127.0.0.1:PORT.
wait_port() { for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; }

# tp_toml PORT HOST SERVER_PORT USER PASSWORD POOL MAX_CLIENTS [PROXY_LINES]: the benches'
# tenantpool config, tenants left to the caller: listening on 127.0.0.1:PORT, one server
# pool of POOL connections kept warm (database app; PASSWORD "" for none), the user bench
# (password bench-secret); PROXY_LINES go in [proxy].
tp_toml() {
  local password=""
  [ -n "$5" ] && password="password = \"$5\""
  cat <<TOML
[proxy]
listen = "127.0.0.1:$1"
max_client_conn = $7
${8:-}
[server]
host = "$2"
port = $3
database = "app"
user = "$4"
$password
max_connections = $6
min_idle = $6
[tenant_defaults]
max_server_connections = $6
max_client_connections = $7
[users.bench]
password = "bench-secret"
TOML
}

# bench_schema: tenant_t1 in database app with pgbench's tables (scale 1), for the
# scripts that run one tenant.
bench_schema() {
  PGPASSWORD=server-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U tenantpool -d app -c "CREATE SCHEMA tenant_t1" >/dev/null
  PGPASSWORD=server-secret PGOPTIONS="-c search_path=tenant_t1" pgbench -q -i -s 1 -h 127.0.0.1 -p "$PGPORT" -U tenantpool app >/dev/null 2>&1
}

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}

# start_pg: initdb + start with SCRAM auth; creates role tenantpool (password server-secret)
# owning database app.
start_pg() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  WORK=$(mktemp -d /tmp/tenantpool-bench.XXXXXX)
  chmod 755 "$WORK"
  AS=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"; AS=(runuser -u postgres --); fi
  PGPORT=$(freeport)
  trap cleanup EXIT
  echo "su-secret" > "$WORK/pw"; chmod 644 "$WORK/pw"
  "${AS[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres -A scram-sha-256 --pwfile="$WORK/pw" --no-sync >/dev/null
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off" start >/dev/null
  PGPASSWORD=su-secret psql -qX -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres \
    -c "CREATE ROLE tenantpool LOGIN PASSWORD 'server-secret'" -c "CREATE DATABASE app OWNER tenantpool" >/dev/null
}

# start_pgbouncer INI_BODY [MORE_SETTINGS] [NAME]: runs PgBouncer (as postgres when root)
# with the given ini; sets PB_PORT and PB_PID. User "bench" with password "bench-secret"
# (stored as PB_SECRET when set, e.g. a SCRAM verifier, so that a login costs PgBouncer no
# key derivation).
# NAME (default pgbouncer) names its ini, log and pid files, so several can run.
# PB_WRAP, when set, is a command PgBouncer runs under (e.g. valgrind and its options).
start_pgbouncer() {
  PB_PORT=$(freeport)
  local name=${3:-pgbouncer}
  cat > "$WORK/$name.ini" <<INI
$1
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
max_client_conn = 10000
logfile = $WORK/$name.log
pidfile = $WORK/$name.pid
${2:-}
INI
  echo "\"bench\" \"${PB_SECRET:-bench-secret}\"" > "$WORK/userlist.txt"
  chown -R postgres "$WORK" 2>/dev/null || true
  rm -f "$WORK/$name.pid"
  "${AS[@]}" bash -c "ulimit -n \$(ulimit -Hn); exec ${PB_WRAP:-} pgbouncer '$WORK/$name.ini'" >/dev/null 2>&1 &
  for _ in $(seq 200); do [ -s "$WORK/$name.pid" ] && break; sleep 0.1; done
  PB_PID=$(cat "$WORK/$name.pid")
  PIDS+=("$PB_PID")
}

# scram_verifier PASSWORD: PostgreSQL's SCRAM-SHA-256 verifier (4096 iterations) of it.
scram_verifier() {
  python3 -c 'import base64,hashlib,hmac,os,sys
pw=sys.argv[1].encode(); salt=os.urandom(16); it=4096
sp=hashlib.pbkdf2_hmac("sha256", pw, salt, it)
ck=hmac.new(sp, b"Client Key", "sha256").digest()
sk=hmac.new(sp, b"Server Key", "sha256").digest()
b=lambda x: base64.b64encode(x).decode()
print("SCRAM-SHA-256$%d:%s$%s:%s" % (it, b(salt), b(hashlib.sha256(ck).digest()), b(sk)))' "$1"
}
