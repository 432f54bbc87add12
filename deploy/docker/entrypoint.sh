#!/bin/sh
# Container entrypoint: secrets from files, then exec tenantpool (PID 1: it gets SIGTERM to
# drain and SIGHUP to reload directly).
#
# Every environment variable VAR_FILE=/path sets VAR to the content of that file (trailing
# newline removed), as the postgres image does: Docker secrets and Kubernetes Secret volumes
# are files. A VAR given both ways is an error. Arguments are tenantpool's (e.g. `check`).
set -eu

for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)_FILE=.*/\1/p'); do
    eval "file=\${${name}_FILE}"
    eval "both=\${${name}+set}"
    if [ "${both:-}" = set ]; then
        echo "tenantpool-entrypoint: both $name and ${name}_FILE are set" >&2
        exit 2
    fi
    if [ ! -r "$file" ]; then
        echo "tenantpool-entrypoint: ${name}_FILE: cannot read $file" >&2
        exit 2
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done

# TENANTPOOL_BIN: another binary (the tests run this script against their build).
exec "${TENANTPOOL_BIN:-/usr/local/bin/tenantpool}" "$@"
