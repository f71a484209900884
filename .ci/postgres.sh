#!/usr/bin/env bash
# Throwaway PostgreSQL server on 127.0.0.1 for the `invtract calibrate` storage tests.
#
#   eval "$(.ci/postgres.sh start)"   # installs (apt-get) if needed, starts, prints exports
#   python -m pytest tests/fit/test_search.py -k postgres
#   .ci/postgres.sh stop              # stops the server and deletes its data folder
#
# `start` prints, on stdout only, shell lines that export
#   INVTRACT_TEST_POSTGRES_URL=postgresql+psycopg2://invtract@127.0.0.1:PORT/invtract_test
#   INVTRACT_TEST_POSTGRES_DATA=<throwaway folder>
# Everything else goes to stderr. The cluster lives in a fresh mktemp folder, listens on
# loopback only (trust authentication, fine for a throwaway test server), and runs as a
# non-root user: `postgres` when this script runs as root (the server refuses root), the
# current user otherwise. Also makes sure the psycopg2 driver is importable (pip).
# Environment: INVTRACT_PG_PORT (default: a free port), INVTRACT_TEST_POSTGRES_DATA (stop).
set -euo pipefail

say() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
        echo "$d"
    fi
}

as_user() {  # run a command as the server user
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install() {
    if [[ -z "$(find_bin)" ]]; then
        if [[ $(id -u) -ne 0 ]]; then
            say "PostgreSQL is not installed and this is not root: cannot apt-get install"
            exit 1
        fi
        say "installing postgresql (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q postgresql >&2 || {
            apt-get update -q >&2
            apt-get install -y -q postgresql >&2
        }
    fi
    if ! python -c "import psycopg2" 2>/dev/null; then
        say "installing psycopg2-binary (pip)"
        python -m pip install -q psycopg2-binary >&2
    fi
}

start() {
    install
    local bin port data user
    bin=$(find_bin)
    [[ -n "$bin" ]] || { say "initdb/pg_ctl not found after installation"; exit 1; }
    port=${INVTRACT_PG_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    data=$(mktemp -d /tmp/invtract-pg.XXXXXX)
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres: "$data"
    fi
    chmod 700 "$data"
    as_user "$bin/initdb" -D "$data/db" -U invtract -A trust --no-sync -E UTF8 >"$data/initdb.log" 2>&1 \
        || { cat "$data/initdb.log" >&2; exit 1; }
    as_user "$bin/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >&2 \
        || { cat "$data/server.log" >&2; exit 1; }
    as_user "$bin/createdb" -h 127.0.0.1 -p "$port" -U invtract invtract_test
    say "server up on 127.0.0.1:$port (data $data)"
    echo "export INVTRACT_TEST_POSTGRES_URL=postgresql+psycopg2://invtract@127.0.0.1:$port/invtract_test"
    echo "export INVTRACT_TEST_POSTGRES_DATA=$data"
}

stop() {
    local data=${INVTRACT_TEST_POSTGRES_DATA:-${1:-}}
    [[ -n "$data" && -d "$data/db" ]] || { say "nothing to stop (INVTRACT_TEST_POSTGRES_DATA unset)"; return 0; }
    as_user "$(find_bin)/pg_ctl" -D "$data/db" -m fast -w stop >&2 || true
    case "$data" in /tmp/invtract-pg.*) rm -rf "$data" ;; esac
    say "stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    install) install ;;
    *) say "usage: $0 start|stop [DATA]|install"; exit 2 ;;
esac
