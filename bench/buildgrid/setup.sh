#!/usr/bin/env bash
# Install BuildGrid 0.4.4 into its own virtual environment, for comparison runs of the
# benchmark. The environment keeps BuildGrid's many dependencies (SQLAlchemy, boto3,
# pydantic and others) out of bgrid's.
#
# Usage: bash bench/buildgrid/setup.sh [VENV_DIR]   (default: bench/.venv-buildgrid)
# Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail

bench_dir="$(cd "$(dirname "$0")/.." && pwd)"
venv_dir="${1:-$bench_dir/.venv-buildgrid}"
python="${PYTHON:-python3}"

if [ ! -x "$venv_dir/bin/python" ]; then
    "$python" -m venv "$venv_dir"
fi
"$venv_dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv_dir/bin/python" -m pip install -q --disable-pip-version-check \
    'buildgrid==0.4.4' psycopg2-binary

"$venv_dir/bin/bgd" --help >/dev/null
echo "BuildGrid installed: $venv_dir/bin/bgd"
