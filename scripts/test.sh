#!/usr/bin/env bash
# Runs the whole test suite against a throwaway PostgreSQL that the tests start themselves.
# Installs PostgreSQL (server, psql, pgbench), psycopg 3, asyncpg and PgBouncer with apt-get first
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pgbench >/dev/null || ! command -v psql >/dev/null; then
  echo "installing PostgreSQL (server, psql, pgbench)..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq postgresql >/dev/null
fi

# Python drivers (Debian's packages) for the tests that run real drivers through the proxy:
# psycopg 3 (prepared statements) and asyncpg (its Pool's reset at every release).
missing=()
for m in psycopg asyncpg; do
  if ! /usr/bin/python3 -c "import $m" >/dev/null 2>&1 && ! python3 -c "import $m" >/dev/null 2>&1; then
    missing+=("python3-$m")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The schema check of the Kubernetes manifests (tests/manifests.rs): kubernetes-validate,
# from PyPI (it ships the API schemas).
if ! command -v kubernetes-validate >/dev/null; then
  echo "installing kubernetes-validate..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-pip >/dev/null || true
  fi
  # Debian's Python refuses pip installs outside a venv (PEP 668) unless told otherwise.
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || $SUDO python3 -m pip install -q --break-system-packages kubernetes-validate \
    || echo "warning: kubernetes-validate not installed" >&2
fi

# PgBouncer (Debian's package): tests/console.rs runs every SHOW command against it and
# against tenantpool in the same run.
if [ ! -x /usr/sbin/pgbouncer ]; then
  echo "installing pgbouncer..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq pgbouncer >/dev/null
fi

# Benches and examples must build; the tests are the library's and tests/ (run last).
cargo build --benches --examples
cargo test --lib --bins --tests "$@"
