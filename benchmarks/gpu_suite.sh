#!/usr/bin/env bash
# One command on a CUDA host: the GPU test subset and every benchmark suite at full size on CUDA,
# with CSVs, charts and a performance report written to OUTDIR, in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Each stage runs under its own time limit (the budget printed first), so one slow stage cannot
# push the whole run past its total; a stage that fails or runs out of time is reported at the
# end and the others still run. Suites run one process each: a crash loses only that suite's rows.
# Exit status: 0 when every stage passed, 1 otherwise, 2 on bad usage.
# Needs no build or install: with no .venv it uses the host's python3 (its torch and Triton) on
# the plain checkout (petal_fast finds kernels/ itself; the C++ CPU backend is not needed on CUDA).
# Smoke-testing the script itself without a GPU: DEVICE=cpu QUICK=1 bash benchmarks/gpu_suite.sh OUTDIR
# (skips the GPU tests, runs the --quick cases on CPU).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUTDIR" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
DEVICE="${DEVICE:-cuda}"
QUICK_FLAG=$([[ -n "${QUICK:-}" ]] && echo --quick || true)
unset TRITON_INTERPRET  # real kernels on the GPU, never the interpreter

# Packages the host lacks come as wheels in .whl/ (docs/performance.md, "Reproducing"): the `brisque` distribution holds
# BRISQUE's trained SVR model. They go to a scratch folder, never into the host's environment.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/petal_fast_site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/petal_fast_site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DEVICE == cuda ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA device; this script measures the GPU path" >&2
    exit 2
fi

# Stage budgets in seconds, sum 460 s (~7.7 min), so that a 15-minute device lease holds this run,
# the machine's start and a short second run. Sized for one H100/H200 from the suites' full CUDA case
# lists; a stage that runs out of time keeps the rows it appended before the limit.
# gpu_tests: dominated by Triton compiles (one per kernel specialisation), 8 pytest-xdist workers;
#   -v names every test as it ends, so a stage cut at its limit still says which one failed.
# linear: 7 shapes (6 PETALface + 8192x4096x4096, the latter at r = 8 and 16) x p 0, 0.1 x modes
#   fwd, bwd, full = 48 cases x 7 providers x 2 do_bench rounds at rep 25 ms (+ ~30 ms warm-up and
#   L2 flushes) = 37 s of timing + 48 x 0.3 s set-up + 10 s start-up + ~30 s of compiles = ~92 s,
#   goal shape first.
# tune: the pruned tile search (QUICK_CANDIDATES, 8 tiles x 6 kernels, a compile each) at the goal
#   shape, bf16, r = 8 x 2 branches; prints the H200 TILE_CONFIGS / DEFAULT_DESIGN entries.
# loss, quality, e2e: shortened from their full lists by the stage limit where needed.
STAGES=(gpu_tests linear tune loss quality e2e charts)
declare -A BUDGET=([gpu_tests]=120 [linear]=100 [tune]=75 [loss]=70 [quality]=30 [e2e]=50 [charts]=15)
declare -A SPENT STATUS
# A rerun can pick stages and budgets: ONLY="gpu_tests linear" BUDGET_linear=150 bash benchmarks/gpu_suite.sh OUT
for s in "${STAGES[@]}"; do
    var="BUDGET_$s"; [[ -n "${!var:-}" ]] && BUDGET[$s]=${!var}
    [[ -z "${ONLY:-}" || " $ONLY " == *" $s "* ]] || { BUDGET[$s]=0; SPENT[$s]=0; STATUS[$s]="skipped (ONLY)"; }
done

echo "petal_fast GPU suite -> $OUT"
echo "time budget (s):"
total=0
for s in "${STAGES[@]}"; do printf '  %-10s %4d\n' "$s" "${BUDGET[$s]}"; total=$((total + BUDGET[$s])); done
printf '  %-10s %4d\n' total "$total"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1

stage() {  # stage NAME COMMAND...: run under the stage's time limit, log to OUT/NAME.log
    local name=$1; shift
    [[ ${STATUS[$name]:-} == skipped* ]] && return
    local t0=$SECONDS rc
    echo
    echo "== $name (budget ${BUDGET[$name]} s) =="
    timeout --signal=TERM --kill-after=10 "${BUDGET[$name]}" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    SPENT[$name]=$((SECONDS - t0))
    case $rc in
        0) STATUS[$name]=ok ;;
        124|137) STATUS[$name]="TIMED OUT (rows measured before the limit may be missing)" ;;
        *) STATUS[$name]="FAILED (exit $rc, see $name.log)" ;;
    esac
}

if [[ $DEVICE == cuda ]]; then
    # the GPU tests are dominated by Triton compiles (one per kernel specialisation): with
    # pytest-xdist, 8 workers compile in parallel on the host's cores while sharing the GPU
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    stage gpu_tests "$PY" -m pytest -m gpu -v $XDIST --junitxml="$OUT/gpu_tests.xml" tests
else
    SPENT[gpu_tests]=0 STATUS[gpu_tests]="skipped (DEVICE=$DEVICE)"
fi
bench() { stage "$1" "$PY" -m benchmarks --suite "$1" --device "$DEVICE" $QUICK_FLAG --out "$OUT" --no-plots; }
bench linear
if [[ $DEVICE == cuda ]]; then
    stage tune "$PY" -m petal_fast.kernels.tune_petal_linear --tune --quick
else
    SPENT[tune]=0 STATUS[tune]="skipped (DEVICE=$DEVICE)"
fi
for suite in loss quality e2e; do bench "$suite"; done
stage charts bash -c '"$0" -m benchmarks.plots --results "$1" && "$0" -m benchmarks.report --results "$1" --output "$1/PERFORMANCE.md"' "$PY" "$OUT"

echo
echo "== summary: $OUT =="
failed=0
for s in "${STAGES[@]}"; do
    printf '  %-10s %4d s of %4d s  %s\n' "$s" "${SPENT[$s]}" "${BUDGET[$s]}" "${STATUS[$s]}"
    [[ ${STATUS[$s]} == ok || ${STATUS[$s]} == skipped* ]] || failed=1
done
echo "  total      $SECONDS s"
echo "charts and tables: $OUT/*.png, $OUT/PERFORMANCE.md"
echo "to publish in the repo: python -m benchmarks.merge $OUT && python -m benchmarks.plots && python -m benchmarks.report"
exit $failed
