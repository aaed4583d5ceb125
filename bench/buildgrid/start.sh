#!/usr/bin/env bash
# Start BuildGrid 0.4.4 for the benchmark on 127.0.0.1:PORT, in the foreground.
#
# Usage: bash bench/buildgrid/start.sh PORT DIR [BGD_SERVER_START_OPTION...]
#        bash bench/buildgrid/start.sh --drop-database
#
# The first form recreates the PostgreSQL database (so every start has an empty
# scheduler), applies BuildGrid's migrations, writes DIR/config.yml from config.yml
# beside this script with the port filled in, and replaces itself with
# `bgd server start [OPTION...] DIR/config.yml`, so the pid the caller started is
# BuildGrid's. Options such as -v (more logging) go to `bgd server start`.
# The second form drops the database. Run setup.sh first.
#
# Environment: BGRID_BENCH_BUILDGRID_VENV (default: bench/.venv-buildgrid),
# BGRID_BENCH_DATABASE (default: bgrid_bench_buildgrid), and the usual PGHOST, PGPORT
# and PGUSER (default: 127.0.0.1, 5432, postgres) for a server with trust authentication.
set -euo pipefail

script_dir="$(cd "$(dirname "$0")" && pwd)"
venv="${BGRID_BENCH_BUILDGRID_VENV:-$script_dir/../.venv-buildgrid}"
database="${BGRID_BENCH_DATABASE:-bgrid_bench_buildgrid}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
# The psycopg2 driver is named on purpose: see config.yml.
url="postgresql+psycopg2://$PGUSER@$PGHOST:$PGPORT/$database"

run_psql() {
    PGOPTIONS="--client-min-messages=warning" psql -d postgres -v ON_ERROR_STOP=1 -q "$@"
}

if [ "${1:-}" = "--drop-database" ]; then
    run_psql -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)"
    exit 0
fi

if [ $# -lt 2 ]; then
    echo "usage: $0 PORT DIR [BGD_SERVER_START_OPTION...] | $0 --drop-database" >&2
    exit 2
fi
port="$1"
directory="$2"
shift 2

if [ ! -x "$venv/bin/bgd" ]; then
    echo "BuildGrid is not installed in $venv: run bash bench/buildgrid/setup.sh first" >&2
    exit 1
fi

run_psql -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" -c "CREATE DATABASE \"$database\""
"$venv/bin/bgd" migrate apply "$url" >"$directory/migrate.log" 2>&1 || {
    echo "bgd migrate apply $url failed; its output:" >&2
    cat "$directory/migrate.log" >&2
    exit 1
}

sed -e "s|127\.0\.0\.1:50071|127.0.0.1:$port|" \
    -e "s|postgresql+psycopg2://postgres@127\.0\.0\.1:5432/bgrid_bench_buildgrid|$url|" \
    "$script_dir/config.yml" >"$directory/config.yml"
cd "$directory"
exec "$venv/bin/bgd" server start "$@" "$directory/config.yml"
