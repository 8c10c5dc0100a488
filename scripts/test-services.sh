# Servers the tests need, started by the test command itself on loopback ports in temporary
# directories, and stopped when it exits. Sourced by test.sh.

sudo_apt() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A free TCP port on loopback (the kernel picks; there is a small window before it is used).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PostgreSQL from Debian's package (installed when missing, then checked), a fresh cluster in
# a temporary directory, trust auth on 127.0.0.1 only. Exports KILN_TEST_DATABASE_URL, which
# kiln-store's and the cluster's tests connect to (each test makes its own database).
start_postgres() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
        bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    fi
    [ -n "$bin" ] && [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] \
        || { echo "PostgreSQL did not install: apt-get install postgresql" >&2; return 1; }
    local dir port as=()
    dir=$(mktemp -d /tmp/kiln-test-pg.XXXXXX)
    port=$(free_port)
    # PostgreSQL refuses to run as root: as root, the cluster belongs to Debian's postgres user.
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
        as=(runuser -u postgres --)
    fi
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U kiln -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=300" start >/dev/null \
        || { cat "$dir/server.log" >&2; return 1; }
    KILN_TEST_PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop)
    KILN_TEST_PG_DIR=$dir
    export KILN_TEST_DATABASE_URL="host=127.0.0.1 port=$port user=kiln dbname=postgres"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)" >&2
}

stop_services() {
    if [ -n "${KILN_TEST_PG_STOP+x}" ]; then
        "${KILN_TEST_PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$KILN_TEST_PG_DIR"
    fi
}
