#!/usr/bin/env bash
# The CUDA backend on a GPU machine: build here, run there, print a short table last.
#
#   bash scripts/cuda-device.sh build   # here: the release `moe` (feature cuda) and the CUDA test binaries,
#                                       # stripped, into .cuda-run/ (git-ignored)
#   bash scripts/cuda-device.sh run     # there, in the repo root (the device tool's `run`, carrying .cuda-run):
#                                       # the CUDA tests with MOE_REQUIRE_GPU=cuda (a missing GPU fails), the
#                                       # PERFORMANCE.md GPU rows of `moe bench --backend cuda` (CUDA events),
#                                       # PyTorch's HF blocks on the same GPU, and the table. Logs and JSON go to
#                                       # $OUT when it is set (the device tool's output folder), else .cuda-run/out.
#
# With the device tool: `bash scripts/cuda-device.sh build`, then
#   run(command="bash scripts/cuda-device.sh run", carry=[".cuda-run"])
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.cuda-run

build() {
  rm -rf "$RUN" && mkdir -p "$RUN/tests"
  export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
  local td=target/cuda-run
  cargo build --release --locked --target-dir "$td" -p moe-cli --features cuda
  cp "$td/release/moe" "$RUN/moe"
  cargo test --release --locked --target-dir "$td" --no-run -p moe-backends -p moe-tests \
    --features moe-backends/cuda,moe-tests/cuda --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        print(m["executable"])' |
    while read -r exe; do cp "$exe" "$RUN/tests/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
  ls -la "$RUN" "$RUN/tests"
  du -sh "$RUN"
}

run() {
  local out="${OUT:-$RUN/out}"
  mkdir -p "$out"
  # NVRTC and the driver: the CUDA image keeps NVRTC under /usr/local/cuda*/lib64.
  for dir in /usr/local/cuda-13.0/lib64 /usr/local/cuda/lib64 /usr/local/cuda-*/lib64; do
    if [ -e "$dir/libnvrtc.so" ] || ls "$dir"/libnvrtc.so.* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
  export MOE_REQUIRE_GPU=cuda MOE_REQUIRE_NVRTC=1 MOE_FIXTURES="$PWD/tests/fixtures/hf"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
  local failed=0
  for t in "$RUN"/tests/*; do
    echo "== $(basename "$t")"
    if ! "$t" --test-threads 1 >"$out/test-$(basename "$t").log" 2>&1; then
      failed=1
    fi
    grep -E "^test result|FAILED|panicked|rel err" "$out/test-$(basename "$t").log" | head -40 || true
  done
  local bench=("$RUN/moe" bench --backend cuda --repeats 20 --format json)
  "${bench[@]}" --dtype bf16 --shape mixtral8x7b -t 1,16,128,1024,4096,16384 >"$out/ours-mixtral8x7b.json"
  "${bench[@]}" --dtype bf16 --shape qwen3-30b-a3b -t 1,16,128,1024,4096,16384 >"$out/ours-qwen3.json"
  "${bench[@]}" --dtype f32 --shape mixtral-like -t 128,2048,8192 >"$out/ours-mixtral-like.json"
  PYTHONUNBUFFERED=1 python3 scripts/torch_gpu_blocks.py --repeats 20 >"$out/torch.jsonl" || echo "PyTorch rows failed"
  python3 scripts/cuda_table.py "$out/torch.jsonl" "$out"/ours-*.json | tee "$out/table.md"
  if [ "$failed" != 0 ]; then
    echo "some CUDA tests failed: see $out/test-*.log"
    exit 1
  fi
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: bash scripts/cuda-device.sh build|run" >&2; exit 2 ;;
esac
