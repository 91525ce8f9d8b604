#!/usr/bin/env bash
# Creates ./.work/venv with every dependency, idempotently. Used by `make setup` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.work/venv
STAMP=$VENV/.installed-$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$STAMP" ]; then exit 0; fi
# System servers the tests and the local launcher start themselves (redis-server from Debian).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server) >/dev/null
  else
    echo "redis-server is missing: install it (Debian: apt-get install redis-server)" >&2; exit 1
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p .work
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/pip install -q --upgrade pip wheel
$VENV/bin/pip install -q -r requirements.txt
$VENV/bin/pip install -q --no-deps --no-build-isolation -e .
rm -f $VENV/.installed-*
touch "$STAMP"
echo "environment ready: $VENV"
