#!/usr/bin/env bash
# Runs the whole test suite against a throwaway PostgreSQL that the tests start themselves.
# Installs PostgreSQL (server, psql, pgbench) and psycopg 3 with apt-get first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pgbench >/dev/null || ! command -v psql >/dev/null; then
  echo "installing PostgreSQL (server, psql, pgbench)..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq postgresql >/dev/null
fi

# psycopg 3 (Debian's package) for the prepared-statement test with a Python driver.
if ! /usr/bin/python3 -c "import psycopg" >/dev/null 2>&1 && ! python3 -c "import psycopg" >/dev/null 2>&1; then
  echo "installing psycopg 3 (python3-psycopg)..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3-psycopg >/dev/null
fi

# Benches and examples must build; the tests are the library's and tests/ (run last).
cargo build --benches --examples
cargo test --lib --bins --tests "$@"
