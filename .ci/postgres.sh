#!/usr/bin/env bash
# Install (Debian package) and start a PostgreSQL server on 127.0.0.1 for the multi-worker tests,
# create the role and database `tightfit`, and print the storage URL. Idempotent; needs root.
# Usage: export TIGHTFIT_TEST_POSTGRES_URL="$(bash .ci/postgres.sh)"
set -euo pipefail
log() { echo "postgres.sh: $*" >&2; }
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q postgresql >&2
fi
read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ -z "${version:-}" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    pg_createcluster "$version" main >&2
    read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
fi
# Loopback only: the server is for this machine's tests and workers.
echo "listen_addresses = '127.0.0.1'" > "/etc/postgresql/$version/$cluster/conf.d/tightfit-loopback.conf"
if [ "$status" != "online" ]; then
    log "starting cluster $version/$cluster on 127.0.0.1:$port"
    pg_ctlcluster "$version" "$cluster" start >&2
fi
as_pg() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }
for _ in $(seq 30); do as_pg "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(as_pg "SELECT 1 FROM pg_roles WHERE rolname='tightfit'")" != "1" ]; then
    as_pg "CREATE ROLE tightfit LOGIN PASSWORD 'tightfit'" >&2
fi
if [ "$(as_pg "SELECT 1 FROM pg_database WHERE datname='tightfit'")" != "1" ]; then
    as_pg "CREATE DATABASE tightfit OWNER tightfit" >&2
fi
echo "postgresql://tightfit:tightfit@127.0.0.1:${port}/tightfit"
