#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (venv, source, build, default model), lint,
# types, then every test tier: fast, fake llama-server, real llama-server + default model.
# Extra arguments go to pytest (e.g. scripts/test.sh -m 'not real' for the fast tiers only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test

echo "== ruff"
.venv/bin/ruff check llamactl tests scripts
.venv/bin/ruff format --check llamactl tests scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
export LLAMACTL_REQUIRE_REAL=1
exec .venv/bin/pytest -m "not soak" "$@"
