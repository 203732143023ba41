#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, then serve the default model at
# http://127.0.0.1:8080 (extra arguments go to `llamactl serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/llamactl serve "$@"
