#!/usr/bin/env bash
# System packages and services the test suite needs that pip cannot provide (Debian/Ubuntu, apt-get).
#   * chromium (/usr/bin/chromium): tests/test_dashboard.py renders GET /dashboard headlessly.
#   * postgresql: the server's PostgreSQL backend is tested against a real cluster; the tests
#     connect to postgresql://edgepack:edgepack@127.0.0.1:5432/edgepack_test (role with CREATEDB,
#     so tests can make throw-away databases).
#   * nginx: the fleet-scale tests start their own nginx processes with their own config, so
#     nginx is installed but deliberately NOT left running as a service (it would hold port 80).
#   * qemu-user-static, debootstrap: builds measure every variant under its target's integer
#     arithmetic (qemu-x86_64 -cpu Haswell, qemu-aarch64 -cpu cortex-a72/a76); the aarch64 sysroot
#     itself is built and cached by `edgepack bench setup-emulator` (tests call it).
#   * espeak-ng: examples/vad/train.py synthesizes the streaming VAD example's speech offline.
# Idempotent: installs only what is missing, starts the cluster only if it is down, creates the
# role and database only if they are missing; a fully set-up machine is a fast no-op.
# Run as root (CI does; there is no systemd in CI containers) or with sudo available.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
PG_PORT=5432
PG_ROLE=edgepack
PG_PASSWORD=edgepack
PG_DB=edgepack_test

say() { echo "install-system-deps: $*"; }
fail() {
    echo "install-system-deps: $*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
need_root() {
    # Called only when something must change, so a set-up machine needs neither root nor sudo.
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
        fail "$1 needs root: run 'sudo bash $0' (or run it as root)."
    fi
}
as_root() { "${SUDO[@]}" "$@"; }
as_postgres() {
    # cd /: the postgres user usually cannot read the caller's working directory, and psql warns.
    if [ "$(id -u)" -eq 0 ]; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u postgres -- "$@")
        else
            (cd / && su postgres -s /bin/sh -c "$(printf '%q ' "$@")")
        fi
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

# Newest installed PostgreSQL server major version (Debian: /usr/lib/postgresql/<major>/bin/postgres).
pg_major() {
    local bin major=""
    for bin in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$bin" ] || continue
        bin=${bin#/usr/lib/postgresql/}
        bin=${bin%%/*}
        if [ -z "$major" ] || [ "$bin" -gt "$major" ] 2>/dev/null; then major=$bin; fi
    done
    echo "$major"
}

nginx_bin() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }

# The test role can log in over TCP with its password, owns the database and may create databases:
# if this one query works, the PostgreSQL part is already done.
pg_ready_for_tests() {
    command -v psql >/dev/null 2>&1 || return 1
    local ok
    ok=$(PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=3 psql -X -A -t -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DB" \
        -c "SELECT r.rolcreatedb AND d.datdba = r.oid FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()" \
        2>/dev/null) || return 1
    [ "$ok" = "t" ]
}

# ---------------------------------------------------------------- packages
missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
[ -n "$(pg_major)" ] || missing+=(postgresql)
[ -n "$(nginx_bin)" ] || missing+=(nginx)
command -v qemu-x86_64-static >/dev/null 2>&1 && command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)

installed_nginx=no
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 \
        || fail "missing: ${missing[*]}, and apt-get is not available; install the Debian packages '${missing[*]}' by hand (chromium at $CHROMIUM), then re-run $0."
    need_root "installing ${missing[*]}"
    say "installing ${missing[*]} with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || fail "'apt-get update' failed; check the network and the apt sources, then re-run $0."
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
        || fail "'apt-get install ${missing[*]}' failed (see apt's output above); on Ubuntu the 'chromium' deb may be a snap stub, use a Debian image or install Chromium at $CHROMIUM."
    [ -x "$CHROMIUM" ] || fail "apt-get installed 'chromium' but $CHROMIUM is still missing; check the package."
    [ -n "$(pg_major)" ] || fail "apt-get installed 'postgresql' but no /usr/lib/postgresql/*/bin/postgres exists; check the package."
    [ -n "$(nginx_bin)" ] || fail "apt-get installed 'nginx' but no nginx binary is on PATH or at /usr/sbin/nginx; check the package."
    for pkg in "${missing[@]}"; do
        if [ "$pkg" = nginx ]; then installed_nginx=yes; fi
    done
fi
say "chromium: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
say "nginx: $(nginx_bin)"

# ---------------------------------------------------------------- nginx: installed, not running
# Debian's postinst starts nginx on port 80; the tests run their own nginx processes instead.
# Only an nginx this run installed is stopped: a developer's own nginx is none of our business.
if [ "$installed_nginx" = yes ]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
    if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
        say "stopping the nginx that apt-get's postinst started (tests start their own)"
        as_root "$(nginx_bin)" -s quit 2>/dev/null || as_root kill "$(cat /run/nginx.pid)" || true
        for _ in $(seq 1 50); do
            [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null || break
            sleep 0.1
        done
    fi
fi

# ---------------------------------------------------------------- PostgreSQL
if pg_ready_for_tests; then
    say "postgresql: ready (role $PG_ROLE, database $PG_DB on 127.0.0.1:$PG_PORT)"
    exit 0
fi

command -v pg_lsclusters >/dev/null 2>&1 \
    || fail "pg_lsclusters is missing; this script manages clusters the Debian way: install the 'postgresql-common' package."
major=$(pg_major)

# The cluster the tests use is the one on port $PG_PORT, whatever its version.
cluster=$(pg_lsclusters -h | awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4; exit }')
if [ -z "$cluster" ]; then
    if [ -n "$(pg_lsclusters -h)" ]; then
        fail "no PostgreSQL cluster uses port $PG_PORT (see 'pg_lsclusters'); the tests connect to 127.0.0.1:$PG_PORT: move a cluster there (port in /etc/postgresql/VERSION/NAME/postgresql.conf) or create one with 'pg_createcluster --port $PG_PORT $major main'."
    fi
    need_root "creating a PostgreSQL cluster"
    say "creating PostgreSQL cluster $major/main on port $PG_PORT"
    as_root pg_createcluster --port "$PG_PORT" "$major" main >/dev/null \
        || fail "'pg_createcluster --port $PG_PORT $major main' failed (see above)."
    cluster="$major main down"
fi
read -r ver name status <<<"$cluster"
if [ "${status%%,*}" != online ]; then
    need_root "starting PostgreSQL cluster $ver/$name"
    say "starting PostgreSQL cluster $ver/$name"
    as_root pg_ctlcluster "$ver" "$name" start \
        || fail "'pg_ctlcluster $ver $name start' failed; see /var/log/postgresql/postgresql-$ver-$name.log."
fi
for _ in $(seq 1 100); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" \
    || fail "PostgreSQL $ver/$name does not accept connections on 127.0.0.1:$PG_PORT after 20 s; see /var/log/postgresql/postgresql-$ver-$name.log."

need_root "creating the PostgreSQL role and database"
psql_admin() { as_postgres psql -X -A -t -q -v ON_ERROR_STOP=1 -p "$PG_PORT" "$@"; }
role=$(psql_admin -c "SELECT rolcreatedb::text || ' ' || rolcanlogin::text FROM pg_roles WHERE rolname = '$PG_ROLE'") \
    || fail "cannot run psql as the postgres OS user; check that cluster $ver/$name is healthy ('pg_lsclusters')."
if [ -z "$role" ]; then
    say "creating PostgreSQL role $PG_ROLE"
    psql_admin -c "CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASSWORD'" \
        || fail "creating the role $PG_ROLE failed (see above)."
elif [ "$role" != "true true" ]; then
    # The role exists but cannot log in or create databases: the tests need both.
    say "granting LOGIN CREATEDB to the existing PostgreSQL role $PG_ROLE"
    psql_admin -c "ALTER ROLE $PG_ROLE LOGIN CREATEDB" || fail "ALTER ROLE $PG_ROLE LOGIN CREATEDB failed (see above)."
fi
owner=$(psql_admin -c "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '$PG_DB'")
if [ -z "$owner" ]; then
    say "creating PostgreSQL database $PG_DB owned by $PG_ROLE"
    psql_admin -c "CREATE DATABASE $PG_DB OWNER $PG_ROLE" || fail "creating the database $PG_DB failed (see above)."
elif [ "$owner" != "$PG_ROLE" ]; then
    fail "database $PG_DB exists but is owned by $owner, not $PG_ROLE; run: sudo -u postgres psql -c 'ALTER DATABASE $PG_DB OWNER TO $PG_ROLE'"
fi

pg_ready_for_tests \
    || fail "cannot log in as $PG_ROLE (password '$PG_PASSWORD') to $PG_DB on 127.0.0.1:$PG_PORT; an existing role may have another password (sudo -u postgres psql -c \"ALTER ROLE $PG_ROLE PASSWORD '$PG_PASSWORD'\") or pg_hba.conf may refuse password logins from 127.0.0.1."
say "postgresql: ready (role $PG_ROLE, database $PG_DB on 127.0.0.1:$PG_PORT, cluster $ver/$name)"
