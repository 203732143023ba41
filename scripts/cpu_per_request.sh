#!/bin/bash
# CPU time of the `llamactl serve` process per POST /tokenize under wrk -t1 -c4 -d5s: steadier
# than req/s on a shared machine. One model, then two names of it behind llamactl's routing.
# Run from the project root: scripts/cpu_per_request.sh [MODEL.gguf]   (needs wrk)
set -euo pipefail
llamactl="$PWD/.venv/bin/llamactl"
model=${1:-$HOME/.cache/llamactl/models/SmolLM2-135M-Instruct.Q4_1.gguf}
server=$("$llamactl" which)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/d"; ln -s "$model" "$tmp/d/alpha.gguf"; ln -s "$model" "$tmp/d/beta.gguf"
text='Hello, world! The quick brown fox jumps over the lazy dog.'
# (A Lua string in single quotes: bash's printf %q escaped the JSON into invalid Lua, and wrk
# then sent GET /tokenize, which measured llama-server's 404 instead.)
cat > "$tmp/one.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"content":"$text"}'
wrk.headers["Content-Type"] = "application/json"
LUA
cat > "$tmp/two.lua" <<LUA
local bodies = {'{"model":"alpha","content":"$text"}', '{"model":"beta","content":"$text"}'}
local i = 0
wrk.method = "POST"
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i % 2) + 1])
end
LUA
measure() {  # LABEL LUA SERVE-ARGS...
  local label=$1 lua=$2; shift 2
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  setsid "$llamactl" serve --server-bin "$server" --port "$port" "$@" >"$tmp/$label.log" 2>&1 &
  local sp=$!
  for _ in $(seq 1 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
    sleep 0.1
  done
  for m in alpha beta; do  # load both (one model: any name is that model)
    curl -s -o /dev/null "http://127.0.0.1:$port/tokenize" -d "{\"model\":\"$m\",\"content\":\"x\"}"
  done
  wrk -t1 -c4 -d2s -s "$lua" "http://127.0.0.1:$port/tokenize" >/dev/null
  local t0 t1 out reqs
  t0=$(awk '{print $14+$15}' "/proc/$sp/stat")
  out=$(wrk -t1 -c4 -d5s -s "$lua" "http://127.0.0.1:$port/tokenize")
  t1=$(awk '{print $14+$15}' "/proc/$sp/stat")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$label: $reqs requests, $(echo "$out" | awk '/Requests\/sec/ {print $2}') req/s," \
    "CPU µs per request: $(python3 -c "print(round(($t1-$t0)/$(getconf CLK_TCK)*1e6/$reqs,1))")"
  kill -TERM -- "-$sp"; sleep 2; kill -KILL -- "-$sp" 2>/dev/null || true
}
measure one "$tmp/one.lua" -m "$model"
measure many "$tmp/two.lua" --models-dir "$tmp/d"
