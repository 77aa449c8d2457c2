#!/usr/bin/env bash
# One command on a CUDA host: the GPU test subset and every benchmark suite at full size on CUDA,
# with CSVs, charts and a performance report written to OUTDIR, in under 9 minutes on one H100.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Each stage runs under its own time limit (the budget printed first), so one slow stage cannot
# push the whole run past 9 minutes; a stage that fails or runs out of time is reported at the
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

# Packages the host lacks come as wheels in .whl/ (README, "GPU runs"): the `brisque` distribution holds
# BRISQUE's trained SVR model. They go to a scratch folder, never into the host's environment.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/petal_fast_site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/petal_fast_site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DEVICE == cuda ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA device; this script measures the GPU path" >&2
    exit 2
fi

# Stage budgets in seconds, sum 520 s; with ~10 s of start-up checks the run fits 9 minutes (540 s).
# Sized for one H100 from the suites' full CUDA case lists (loss 8 shapes with memory, quality
# batch 64 at 120x120, e2e the paper's Swin at batch 64) and do_bench's 50 ms per sample; charts
# (plots + report) take ~6 s on a 2-core CPU.
# linear: 7 shapes (6 PETALface + 8192x4096x4096, the latter at r = 8 and 16) x p 0, 0.1 x modes
#   fwd, bwd, full = 48 cases, x 7 providers (base, fused, fused_onepass, addmm, reference,
#   fused_1b, peft) x 2 do_bench rounds = 672 do_bench calls. At do_bench's rep 50 ms (+ ~30 ms of
#   warm-up, runtime estimate and L2 flushes) that is 672 x 80 ms = 54 s of timing alone, so the
#   linear suite uses rep 25 ms (bench_petal_linear.CUDA_REP_MS): 672 x 55 ms = 37 s; + per-case
#   set-up (layers, PEFT, rotated inputs, bwd graphs, 2 warm-up calls per provider) 48 x 0.3 s = 15 s;
#   + start-up (torch, CUDA context, peft import) 10 s; + Triton compiles the gpu_tests stage did
#   not leave in the disk cache (two designs x p = 0/0.1 x R = 16/32 and one branch) ~30 s
#   = ~92 s -> 110 s. Rows are appended per case, the 8192x4096x4096 goal shape first, so a
#   timeout keeps every case measured before it.
STAGES=(gpu_tests linear loss quality e2e charts)
declare -A BUDGET=([gpu_tests]=140 [linear]=110 [loss]=120 [quality]=50 [e2e]=80 [charts]=20)
declare -A SPENT STATUS

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
    # pytest-xdist, 4 workers compile in parallel on the host's cores while sharing the GPU
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4" || true)
    stage gpu_tests "$PY" -m pytest -m gpu -q $XDIST --junitxml="$OUT/gpu_tests.xml" tests
else
    SPENT[gpu_tests]=0 STATUS[gpu_tests]="skipped (DEVICE=$DEVICE)"
fi
for suite in linear loss quality e2e; do
    stage "$suite" "$PY" -m benchmarks --suite "$suite" --device "$DEVICE" $QUICK_FLAG --out "$OUT" --no-plots
done
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
