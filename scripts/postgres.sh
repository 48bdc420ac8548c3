#!/usr/bin/env bash
# A PostgreSQL server for the tests, CI and benchmarks, kept under the repository's
# .cache/postgres and listening on 127.0.0.1 only.
#
#   scripts/postgres.sh dsn      start it if needed; print the test database's URL
#   scripts/postgres.sh env      the same as a line for eval: export FEDGE_TEST_POSTGRES_DSN=...
#   scripts/postgres.sh stop     stop it (the cluster stays for the next start)
#   scripts/postgres.sh status
#
# When $FEDGE_TEST_POSTGRES_DSN already names a server that answers, that one is used.
# Otherwise: Debian's packages (apt-get update, apt-get install -y postgresql) when the
# binaries are missing, a cluster initialised by the postgres user (the server refuses to
# run as root) with password authentication, started on a free port, and a role "fedge"
# owning a database "fedge_test". Progress goes to stderr; stdout carries only the answer.
set -euo pipefail
# A failed step inside $(...) stops the script too (bash drops set -e there otherwise).
shopt -s inherit_errexit
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[postgres] $*" >&2; }

locate() {
    dir="$root/.cache/postgres"
    if [[ "$(id -u)" == 0 ]] && id postgres >/dev/null 2>&1 \
        && ! runuser -u postgres -- test -x "$root" 2>/dev/null; then
        # The postgres user cannot reach this checkout (one under /root, say): keep the
        # cluster where it can, one per checkout.
        dir="/var/tmp/fedge-postgres-$(echo "$root" | sha256sum | cut -c1-12)"
    fi
    data="$dir/data"
    run="$dir/run"
}
locate

as_owner() {
    # The cluster's owner runs the server binaries: postgres when we are root.
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

answers() { [[ -n "${1:-}" ]] && psql "$1" -XAtqc 'select 1' >/dev/null 2>&1; }

bindir() {
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -z "$found" ]]; then
        [[ "$(id -u)" == 0 ]] || { log "PostgreSQL is not installed and we are not root"; exit 1; }
        log "installing Debian's postgresql packages"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        found="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    fi
    echo "$found"
}

secret() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

init_cluster() {
    local bin="$1"
    log "initialising a cluster in $data"
    mkdir -p "$dir"
    rm -rf "$data" "$run"
    mkdir -p "$run"
    secret > "$dir/superuser.pw"
    secret > "$dir/fedge.pw"
    chmod 600 "$dir"/*.pw
    [[ "$(id -u)" == 0 ]] && chown -R postgres: "$dir"
    as_owner "$bin/initdb" -D "$data" -U postgres --pwfile="$dir/superuser.pw" \
        --auth=scram-sha-256 --encoding=UTF8 --locale=C --no-instructions >&2
    cat >> "$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$run'
max_connections = 200
EOF
}

superuser_sql() {
    PGPASSWORD="$(cat "$dir/superuser.pw")" psql -XAtq -h 127.0.0.1 -p "$(cat "$dir/port")" \
        -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$1"
}

start() {
    local bin
    bin="$(bindir)"
    locate  # again: installing the package may just have created the postgres user
    [[ -f "$data/PG_VERSION" ]] || init_cluster "$bin"
    if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        local port
        port="$(free_port)"
        log "starting on 127.0.0.1:$port"
        as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 -o "-p $port" start >&2 \
            || { tail -n 20 "$dir/server.log" >&2; exit 1; }
        echo "$port" > "$dir/port"
    fi
    if [[ -z "$(superuser_sql "select 1 from pg_roles where rolname = 'fedge'")" ]]; then
        superuser_sql "create role fedge login password '$(cat "$dir/fedge.pw")'" >/dev/null
        superuser_sql "create database fedge_test owner fedge" >/dev/null
    fi
    echo "postgresql://fedge:$(cat "$dir/fedge.pw")@127.0.0.1:$(cat "$dir/port")/fedge_test"
}

dsn() {
    if answers "${FEDGE_TEST_POSTGRES_DSN:-}"; then
        echo "$FEDGE_TEST_POSTGRES_DSN"
    else
        start
    fi
}

case "${1:-dsn}" in
    dsn) dsn ;;
    env)  # an assignment, so that dsn's failure is the script's (an echo's status is 0)
        url="$(dsn)"
        echo "export FEDGE_TEST_POSTGRES_DSN='$url'" ;;
    stop)
        if [[ -f "$data/postmaster.pid" ]]; then
            as_owner "$(bindir)/pg_ctl" -D "$data" -m fast stop >&2
        fi ;;
    status)
        as_owner "$(bindir)/pg_ctl" -D "$data" status ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
