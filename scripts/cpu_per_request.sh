#!/bin/bash
# CPU time of the llamactl serve process per /tokenize request under wrk -t1 -c4 (less noisy
# than req/s on a shared machine). Run from /tmp with one.lua / two.lua as in docs/performance.md.
# usage: run.sh LABEL LUA SERVE-ARGS...  -> CPU microseconds of the serve process per request
label=$1; lua=$2; shift 2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
setsid /work/wt-serve/.venv/bin/llamactl serve --port $port "$@" > /tmp/cpu/$label.out 2>/tmp/cpu/$label.err &
sp=$!
for i in $(seq 1 600); do curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/health | grep -q 200 && break; sleep 0.1; done
for m in alpha beta; do curl -s -o /dev/null http://127.0.0.1:$port/tokenize -d "{\"model\":\"$m\",\"content\":\"x\"}"; done
wrk -t1 -c4 -d2s -s $lua http://127.0.0.1:$port/tokenize > /dev/null
t0=$(awk '{print $14+$15}' /proc/$sp/stat)
out=$(wrk -t1 -c4 -d5s -s $lua http://127.0.0.1:$port/tokenize)
t1=$(awk '{print $14+$15}' /proc/$sp/stat)
reqs=$(echo "$out" | awk '/requests in/ {print $1}')
rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
tck=$(getconf CLK_TCK)
echo "$label: $reqs requests, $rps req/s, non2xx=${non2xx:-0}, CPU us/request of serve: $(python3 -c "print(round(($t1-$t0)/$tck*1e6/$reqs,1))")"
kill -TERM -- -$sp; sleep 2; kill -KILL -- -$sp 2>/dev/null
