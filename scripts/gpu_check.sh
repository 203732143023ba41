#!/usr/bin/env bash
# The GPU check of issue 15, for a machine with one NVIDIA GPU (an H200 here), nvcc and CMake,
# no network, and at most 64 MiB of working tree carried to it: one call builds llama-server
# with `llamactl build` for the detected architecture, serves a small model with -ngl 999,
# checks that every layer went to the GPU and that the seed question is answered, and runs
# llama-bench on the CPU and on the GPU. Figures go to stdout (and $OUT/gpu_check.txt).
#
#   scripts/gpu_check.sh --pack      here (network, CPU build): writes .gpu/ (gitignored), what
#                                    travels besides the repo: the llama.cpp source pruned and
#                                    xz-compressed (~6 MB), wheels of llamactl's dependencies the
#                                    GPU machine lacks, and a small model (the default model,
#                                    Q4_0, its last 13 layers pruned by llama-quantize: 52 MB)
#   scripts/gpu_check.sh --dry-run   here: every step that needs no GPU, on .gpu/ (unpack, import,
#                                    doctor, the CUDA plan for sm_90, the model on the CPU build)
#   scripts/gpu_check.sh             there: the whole check (carry .gpu; about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PACK=$REPO/.gpu
MODE=${1:-run}
OUT_FILE=${OUT:-/tmp}/gpu_check.txt
mkdir -p "$(dirname "$OUT_FILE")"
MIB=$((1024 * 1024))
# What the pruned source leaves out: documentation, models, tests, examples, the web UI's
# sources (built with --no-ui), Python conversion tools. CMake needs none of them.
PRUNE=(docs models tests examples benches media gguf-py conversion .github skills ci
  requirements pocs .devops scripts)

say() { echo "gpu_check: $*" | tee -a "$OUT_FILE"; }
fail() { say "FAIL: $*"; exit 1; }

pack() {
  rm -rf "$PACK" && mkdir -p "$PACK/wheels"
  local src
  src=$(.venv/bin/python -c 'from llamactl.build.source import resolve_source as r; print(r().path.resolve())')
  local excludes=()
  for p in "${PRUNE[@]}"; do excludes+=(--exclude="llama.cpp/$p"); done
  # tools/ui: only its CMakeLists.txt (tools/CMakeLists.txt adds the folder).
  excludes+=(--exclude='llama.cpp/tools/ui/*[!t]' --exclude='llama.cpp/tools/ui/[!C]*')
  tar -C "$(dirname "$src")" -cJf "$PACK/llama.cpp.tar.xz" "${excludes[@]}" llama.cpp
  # The GPU machine's python3 (3.12) has click, httpx, psutil, rich and uvloop already.
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$PACK/wheels" platformdirs httptools
  local model quantize
  model=$(.venv/bin/python -c 'from llamactl.models.default import default_model_path as d; print(d())' 2>/dev/null ||
    echo "$HOME/.cache/llamactl/models/SmolLM2-135M-Instruct.Q4_1.gguf")
  [ -f "$model" ] || fail "no default model at $model: run scripts/setup.sh"
  quantize=$(dirname "$(.venv/bin/llamactl which --backend cpu)")/llama-quantize
  if [ ! -x "$quantize" ]; then
    # One more target in the CPU build: quantize.cpp against the libraries already built.
    cmake --build "$(dirname "$(dirname "$quantize")")" --target llama-quantize >/dev/null
  fi
  # The default model is 98 MB; no quantization of it fits 64 MiB with the source (its rows of
  # 576 rule out the K-quants, Q4_0 everywhere is 78 MB), so its last 13 of 30 layers go:
  # 52 MB. It answers, but nonsense: the check asks for an answer, full offload and speed.
  "$quantize" --allow-requantize --token-embedding-type q4_0 --output-tensor-type q4_0 \
    --prune-layers 17,18,19,20,21,22,23,24,25,26,27,28,29 \
    "$model" "$PACK/model.gguf" Q4_0 >"$PACK/quantize.log" 2>&1 ||
    fail "llama-quantize failed: $(tail -3 "$PACK/quantize.log")"
  rm -f "$PACK/quantize.log"
  local total
  total=$(($(du -sb "$PACK" | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)))
  du -ab "$PACK" | sort -n | awk '{printf "  %8.1f MiB  %s\n", $1/1048576, $2}'
  say "packed: repo + .gpu = $((total / MIB)) MiB (limit 64 MiB)"
  [ "$total" -lt $((64 * MIB)) ] || fail "over the 64 MiB a call may carry"
}

# The llamactl the GPU machine runs: this checkout on PYTHONPATH, its missing dependencies
# from the carried wheels, the llama.cpp source unpacked where a checkout keeps it.
setup_there() {
  local py=$1 site=$2 tree=$3
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$PACK"/wheels/*.whl
  export PYTHONPATH=$site:$REPO
  mkdir -p "$tree"
  tar -C "$tree" -xJf "$PACK/llama.cpp.tar.xz"
}

pip_cublas_args() {
  # A contingency, for a system toolkit without cuBLAS on a machine whose Python has NVIDIA's
  # cuBLAS wheel (PyTorch images do) and no network for llamactl's own wheels: the system nvcc
  # with that cuBLAS (RESOURCES.md: its headers in the compile flags, its libraries named to
  # CMake through unversioned links, found at run time through RPATH). Sets EXTRA_ARGS.
  local inc lib links=/tmp/cublas-links so
  inc=$(python3 - <<'EOF2' 2>/dev/null
import importlib.metadata as m
d = m.distribution("nvidia-cublas")
print(next(str(d.locate_file(f).parent) for f in d.files if f.name == "cublas_v2.h"))
EOF2
  ) || return 1
  lib=$(dirname "$inc")/lib
  say "the system toolkit lacks cuBLAS: using the Python package's, $inc"
  mkdir -p "$links"
  for so in "$lib"/libcublas*.so.*; do
    ln -sf "$so" "$links/$(basename "$so" | sed 's/\.so\..*/.so/')"
  done
  local rpath="-Wl,-rpath-link,$lib -Wl,-rpath,$lib"
  EXTRA_ARGS=(-- "-DCUDA_cublas_LIBRARY=$links/libcublas.so"
    "-DCUDA_cublasLt_LIBRARY=$links/libcublasLt.so" "-DCMAKE_CUDA_FLAGS=-I$inc"
    "-DCMAKE_CXX_FLAGS=-I$inc" "-DCMAKE_EXE_LINKER_FLAGS=$rpath"
    "-DCMAKE_SHARED_LINKER_FLAGS=$rpath")
}

serve_check() {
  # serve -ngl 999: every layer on the GPU, and an answer to the seed question.
  local backend=$1 model=$2 port=$3 log=$4
  python3 -m llamactl serve -m "$model" -ngl 999 --port "$port" --backend "$backend" \
    >"$log.out" 2>"$log" &
  local pid=$! deadline=$((SECONDS + 120))
  until grep -q '^listening at' "$log.out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$log"; fail "serve exited"; }
    [ $SECONDS -lt $deadline ] || { kill "$pid"; cat "$log"; fail "serve not ready in 120 s"; }
    sleep 0.2
  done
  local ready
  ready=$(grep 'ready in [0-9.]* s:' "$log" | tail -1)
  say "serve: $ready"
  local answer
  answer=$(python3 - "$port" <<'EOF'
import json, sys, urllib.request
body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 32}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions",
                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as resp:
    print(json.load(resp)["choices"][0]["message"]["content"].replace("\n", " "))
EOF
  ) || { kill "$pid"; fail "the seed request failed"; }
  kill -TERM "$pid"; wait "$pid" || true
  say "seed answer: $answer"
  [ -n "$answer" ] || fail "empty answer"
  echo "$answer" | grep -qi paris && say "the answer names Paris" ||
    say "note: the answer does not name Paris (expected: the carried model lost 13 of 30 layers)"
  if [ "$backend" = cuda ]; then
    echo "$ready" | grep -Eq '([0-9]+)/\1 layers on the GPU' || fail "not every layer was offloaded: $ready"
  fi
}

bench() {
  # llama-bench on the CPU alone (-dev none) and, with `gpu`, everything on the GPU.
  local bin=$1 model=$2 which=$3 threads
  threads=$(nproc)
  say "llama-bench, CPU ($threads threads, -dev none):"
  "$bin" -m "$model" -dev none -ngl 0 -t "$threads" -p 512 -n 128 -r 3 -o md 2>/dev/null |
    tee -a "$OUT_FILE"
  if [ "$which" = gpu ]; then
    say "llama-bench, GPU (-ngl 999):"
    "$bin" -m "$model" -ngl 999 -p 512 -n 128 -r 3 -o md 2>/dev/null | tee -a "$OUT_FILE"
  fi
}

case "$MODE" in
--pack)
  pack
  ;;
--dry-run)
  [ -f "$PACK/llama.cpp.tar.xz" ] || fail "no $PACK: run scripts/gpu_check.sh --pack first"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # Here: the venv's python (3.11) instead of the GPU machine's 3.12 wheels; the source goes to
  # a temporary tree (this checkout's vendor/llama.cpp is left alone).
  tar -C "$work" -xJf "$PACK/llama.cpp.tar.xz"
  export LLAMACTL_HOME=$work/home LLAMACTL_SOURCE=$work/llama.cpp PATH=$REPO/.venv/bin:$PATH
  say "pruned source: $(du -sh "$work/llama.cpp" | cut -f1) unpacked, $(find "$work/llama.cpp" -type f | wc -l) files"
  python3 -m llamactl doctor | tail -6
  plan=$(python3 -m llamactl build --backend cuda --cuda-arch 90 --no-ui --dry-run 2>&1)
  echo "$plan" | grep -q -- '-DGGML_CUDA=ON' || fail "no CUDA plan: $plan"
  say "CUDA plan for sm_90: $(echo "$plan" | grep -c '^cmake') commands"
  # The pruned tree configures (CPU, no build): nothing CMake needs was pruned.
  cmake -S "$work/llama.cpp" -B "$work/configure" -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_RPC=ON -DLLAMA_USE_PREBUILT_UI=OFF >"$work/configure.log" 2>&1 ||
    fail "the pruned tree does not configure: $(grep -A3 'CMake Error' "$work/configure.log" | head -8)"
  say "the pruned tree configures"
  export LLAMACTL_CACHE_DIR=$HOME/.cache/llamactl
  unset LLAMACTL_SOURCE
  serve_check cpu "$PACK/model.gguf" "$(python3 -c 'from llamactl.net import free_port as f; print(f())')" "$work/serve.log"
  bench "$(dirname "$(python3 -m llamactl which --backend cpu)")/llama-bench" "$PACK/model.gguf" cpu
  say "dry run done: the rest needs the GPU"
  ;;
run)
  [ -f "$PACK/llama.cpp.tar.xz" ] || fail "no $PACK (carry .gpu): run scripts/gpu_check.sh --pack here first"
  : >"$OUT_FILE"
  t0=$SECONDS
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader | while read -r l; do say "gpu: $l"; done
  export LLAMACTL_HOME=/tmp/llamactl-home
  setup_there python3 /tmp/llamactl-site "$REPO/vendor"
  python3 -m llamactl doctor | tee -a "$OUT_FILE" | tail -8
  toolkit=auto
  EXTRA_ARGS=()
  if ! python3 -m llamactl doctor | grep -q '^CUDA toolkit: system'; then
    pip_cublas_args && toolkit=system
  fi
  tb=$SECONDS
  if ! python3 -m llamactl build --backend cuda --cuda-toolkit "$toolkit" --no-ui -j "$(nproc)" \
    "${EXTRA_ARGS[@]}" >/tmp/gpu_check_build.out 2>&1; then
    tail -30 /tmp/gpu_check_build.out
    fail "the CUDA build failed"
  fi
  tail -12 /tmp/gpu_check_build.out
  say "CUDA build: $((SECONDS - tb)) s with $(nproc) jobs"
  bin=$(python3 -m llamactl which --backend cuda)
  "$bin" --list-devices 2>&1 | tee -a "$OUT_FILE"
  serve_check cuda "$PACK/model.gguf" 18080 /tmp/gpu_check_serve.log
  bench "$(dirname "$bin")/llama-bench" "$PACK/model.gguf" gpu
  say "done in $((SECONDS - t0)) s"
  ;;
*)
  echo "usage: scripts/gpu_check.sh [--pack | --dry-run]" >&2
  exit 2
  ;;
esac
