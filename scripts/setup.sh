#!/usr/bin/env bash
# Set up a checkout on a fresh machine, idempotently: .venv/ with llamactl (editable), the
# pinned llama.cpp source, a build for this machine, and the default model.
# Usage: scripts/setup.sh [--test]   (--test also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Ninja and ccache make builds faster; install them when we may, go on without them otherwise.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  want=""
  command -v ninja >/dev/null 2>&1 || want="$want ninja-build"
  command -v ccache >/dev/null 2>&1 || want="$want ccache"
  if [ -n "$want" ]; then
    echo "setup: installing$want"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want) \
      >/dev/null 2>&1 || echo "setup: could not install$want; going on without"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.llamactl-installed-v2$extras
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing llamactl$extras into .venv"
  # compat mode: a plain path entry in site-packages instead of an import hook, which costs
  # every llamactl command ~15 ms of start-up (docs/performance.md, time to ready).
  .venv/bin/python -m pip install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e ".$extras"
  touch "$stamp"
fi
# Byte-code for our own modules even where PYTHONDONTWRITEBYTECODE is set: compiling them on
# every start would cost serve ~50 ms. Only stale files are rewritten.
.venv/bin/python -m compileall -q llamactl

.venv/bin/llamactl source fetch
.venv/bin/llamactl build
.venv/bin/llamactl models >/dev/null  # fetches nothing; warms nothing; proves the CLI works
.venv/bin/python -c "from llamactl.models.catalog import ensure_default_model; print('setup: default model', ensure_default_model())"
