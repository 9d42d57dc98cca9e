#!/usr/bin/env bash
# The GPU path in one run, on one H100/H200 in under 8 minutes: install the carried wheels, the CUDA tests,
# the kernel microbenchmarks, the training step and decode benchmarks; JSON + a markdown summary in one folder.
#   bash bench/gpu.sh [--out DIR]        # on the GPU machine (DIR default: bench/results/gpu-<date>)
#   bash bench/gpu.sh --dry-run [--out DIR]   # the same steps on the CPU at tiny shapes (Triton interpreted)
# Output: DIR/gpu.json (everything), DIR/gpu.md (the tables), DIR/gpu.log (every step's output), and each step's
# own kernels.json, train.json, decode.json, cuda_tests.xml. A failing step is recorded and the next one runs;
# the exit status is non-zero if any step failed. Details: bench/README.md ("gpu.sh").
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
COMMAND="bash bench/gpu.sh$([ $DRY = 1 ] && echo ' --dry-run')${OUT:+ --out $OUT}"
OUT="${OUT:-bench/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/gpu.json "$OUT"/gpu.md "$OUT"/gpu.log "$OUT"/kernels.json "$OUT"/train.json "$OUT"/decode.json \
    "$OUT"/cuda_tests.xml
WORK="$(mktemp -d /tmp/dslc-gpu-sh.XXXXXX)"
STEPS="$WORK/steps.tsv" # name, status, exit code, seconds: one line per step
: >"$STEPS"
LOG="$OUT/gpu.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # dslc from this checkout (no pip install -e)
# wall-time budget: each step's limit is its own cap or what is left of this, whichever is less
BUDGET="${GPU_SH_BUDGET:-$([ $DRY = 1 ] && echo 240 || echo 470)}"
START=$(date +%s)

elapsed() { echo $(($(date +%s) - START)); }

# step NAME CAP_SECONDS COMMAND...: run with a time limit, output to the log (and the terminal), status recorded
step() {
    local name="$1" cap="$2" left rc t0
    shift 2
    left=$((BUDGET - $(elapsed) - 5))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
        echo "== [$name] skipped: the ${BUDGET}s budget is spent" | tee -a "$LOG"
        printf '%s\tfailed\t124\t0\n' "$name" >>"$STEPS"
        echo "no time left in the ${BUDGET}s budget (GPU_SH_BUDGET)" >"$WORK/$name.log"
        return
    fi
    echo "== [$name] $* (limit ${cap}s; ${BUDGET}s budget, $(elapsed)s used)" | tee -a "$LOG"
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$WORK/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
    elif [ "$rc" != 0 ]; then
        status=failed
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" >>"$STEPS"
    echo "== [$name] $status (exit $rc) in $(($(date +%s) - t0))s; $(elapsed)s elapsed" | tee -a "$LOG"
}

# 1. packages the GPU image lacks, from wheels carried in .whl/ (bench/fetch_wheels.sh)
install() {
    local have=1
    "$PY" -c "import lark, pydantic" 2>/dev/null && "$PY" -m ruff --version >/dev/null 2>&1 || have=0
    if [ $have = 1 ] && { "$PY" -c "import liger_kernel" 2>/dev/null || ! compgen -G ".whl/liger_kernel-*.whl" >/dev/null; }; then
        echo "lark, pydantic, ruff (and liger-kernel, or no wheel of it) import already: nothing to install"
        return 0
    fi
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "missing packages and no wheels in .whl/: run bash bench/fetch_wheels.sh where PyPI is reachable" >&2
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        return 1
    "$PY" -c "import lark, pydantic, liger_kernel; print('installed into /tmp/site:', lark.__version__, pydantic.VERSION)" &&
        "$PY" -m ruff --version
}
echo "== gpu.sh: out $OUT; dry run $DRY; budget ${BUDGET}s" | tee -a "$LOG"
if [ $DRY = 1 ] && "$PY" -c "import lark, pydantic" 2>/dev/null; then
    printf 'install\tok\t0\t0\n' >>"$STEPS"
    echo "dry run: the packages import already, no install" >"$WORK/install.log"
else
    # the exports must reach the later steps: the site goes on the path first, whatever the install did
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    export PATH="/tmp/site/bin:$PATH" # ruff's binary (dslc build formats the generated code with it)
    step install 120 bash -c "$(declare -f install); PY='$PY'; install"
fi

# 2. the CUDA tests (skipped, not failed, without CUDA)
CUDA_TEST_FILES=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs --junitxml="$OUT/cuda_tests.xml" $CUDA_TEST_FILES

# 3. benchmarks
if [ $DRY = 1 ]; then
    step kernels 90 "$PY" bench/kernels.py --dry-run --json "$OUT/kernels.json"
    step train 120 env TRITON_INTERPRET=1 DSLC_BACKEND=triton "$PY" bench/train.py --device cpu --tiny --no-compile \
        --repeats 1 --build-runs 1 --json "$OUT/train.json"
    step decode 90 env TRITON_INTERPRET=1 DSLC_BACKEND=triton "$PY" bench/decode.py --device cpu --tiny \
        --batches 1 8 --json "$OUT/decode.json"
else
    step kernels 120 "$PY" bench/kernels.py --json "$OUT/kernels.json"
    step train 210 "$PY" bench/train.py --device cuda --batch 4 --seq 2048 --repeats 3 --build-runs 2 \
        --json "$OUT/train.json"
    step decode 150 "$PY" bench/decode.py --device cuda --batches 1 8 --repeats 3 --json "$OUT/decode.json"
fi

# 4. one JSON and one markdown summary of it all
"$PY" bench/gpu_report.py --out "$OUT" --steps "$STEPS" --logs "$WORK" --command "$COMMAND" \
    --wall "$(elapsed)" $([ $DRY = 1 ] && echo --dry-run)
report=$?
failed=$(awk -F'\t' '$2 != "ok"' "$STEPS" | cut -f1 | tr '\n' ' ')
rm -rf "$WORK"
echo "== gpu.sh: $(elapsed)s in all; results in $OUT/gpu.md${failed:+; FAILED: $failed}" | tee -a "$LOG"
[ -z "$failed" ] && [ $report = 0 ]
