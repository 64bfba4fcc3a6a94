#!/usr/bin/env bash
# The GPU check: the GPU test tier and the phase-against-peak figures on one GPU, in one JSON file, in under
# 8 minutes (GPU_CHECK_BUDGET_S, default 450 s, bounds the whole run; every stage has a timeout of its own).
#
#   bash examples/benchmarks/gpu_check.sh [OUT.json]
#
# OUT.json: the argument, else $GPU_CHECK_JSON, else $OUT/gpu_check.json where $OUT is set (the device machine's
# folder that comes back), else runs/gpu_check/gpu_check.json. Stage logs and files go to OUT.parts/ beside it.
# Without CUDA it says so, writes {"gpu": false, "reason": ...} and exits 0, running nothing else.
# Exit status with a GPU: 0 when every stage and test ran without failing, 1 otherwise (the JSON says which).
#
# Stages, each a process of its own under `timeout` (figures: examples/benchmarks/gpu_peak.py; the one JSON:
# examples/benchmarks/gpu_report.py):
#   pytest  python -m pytest tests/test_gpu.py -v (tests that need vLLM, Ray or 2 GPUs skip with their reason)
#   peak    bf16 / fp32 matmul peak, device memcpy, pinned host <-> device copies
#   phases  teacher scoring and student forward + backward + AdamW of a Qwen3-0.6B-shaped model, FLOP/s
#   sync    weight sync on one GPU: state-dict copy, bucket packing, CUDA IPC to a second process (NCCL on 2 GPUs)
#   vllm    sleep / wake-up seconds, where vLLM imports
# GPU_CHECK_SMOKE=1 runs the same stages on the CPU with a tiny model (a test of this script, not a figure);
# GPU_CHECK_TESTS replaces the test selection (default tests/test_gpu.py); PYTHON picks the interpreter.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python}
JSON=${1:-${GPU_CHECK_JSON:-}}
if [ -z "$JSON" ]; then
    if [ -n "${OUT:-}" ]; then JSON="$OUT/gpu_check.json"; else JSON="$ROOT/runs/gpu_check/gpu_check.json"; fi
fi
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SMOKE=${GPU_CHECK_SMOKE:-0}
TESTS=${GPU_CHECK_TESTS:-tests/test_gpu.py}
START=$(date +%s)
mkdir -p "$(dirname "$JSON")" || exit 1

# The JSON of a machine where the check cannot run; the reason is our own text, stripped of quotes.
no_gpu() {
    local reason
    reason=$(printf '%s' "$1" | tr -d '"\\' | tr '\n' ' ')
    printf '{"gpu": false, "reason": "%s", "date": "%s", "torch": "%s", "cuda_visible_devices": "%s"}\n' \
        "$reason" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${TORCH_VERSION:-unknown}" "${CUDA_VISIBLE_DEVICES-unset}" \
        > "$JSON"
    echo "gpu_check: no GPU here: $reason"
    echo "gpu_check: wrote $JSON; nothing else was run."
    exit 0
}

probe=$(cd "$ROOT" && "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available(), torch.cuda.device_count())" 2>&1)
if [ $? -ne 0 ]; then
    no_gpu "torch could not be imported by $PY: $(printf '%s' "$probe" | tail -n 1)"
fi
read -r TORCH_VERSION TORCH_CUDA CUDA_OK N_GPUS <<< "$(printf '%s' "$probe" | tail -n 1)"
DEVICE=cuda
MODE=gpu
if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    MODE=cpu-smoke
    echo "gpu_check: GPU_CHECK_SMOKE=1: the stages on the CPU with a tiny model (no figure is meaningful)"
elif [ "$CUDA_OK" != "True" ]; then
    no_gpu "torch.cuda.is_available() is False (torch $TORCH_VERSION, built for CUDA $TORCH_CUDA, \
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
fi
echo "gpu_check: torch $TORCH_VERSION, CUDA $TORCH_CUDA, $N_GPUS GPU(s), budget ${BUDGET}s -> $JSON"

PARTS="${JSON%.json}.parts"
rm -rf "$PARTS" && mkdir -p "$PARTS" || exit 1
RESERVE=30  # seconds kept for the assembly at the end

# run_stage NAME CAP CMD...: CMD under a timeout of CAP seconds, or less when the budget is running out;
# NAME.log gets its output, NAME.rc "exit-status seconds" (124 / 137: it ran out of time).
run_stage() {
    local name=$1 cap=$2 left t t0 rc
    shift 2
    left=$((BUDGET - ($(date +%s) - START) - RESERVE - 10))  # 10: timeout's grace before it kills
    t=$((cap < left ? cap : left))
    if [ "$t" -lt 15 ]; then
        echo "124 0" > "$PARTS/$name.rc"
        echo "not run: the time budget was spent" > "$PARTS/$name.log"
        echo "== $name: not run (budget spent)"
        return
    fi
    echo "== $name (timeout ${t}s)"
    t0=$(date +%s)
    (cd "$ROOT" && timeout -k 10 "$t" "$@") > "$PARTS/$name.log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - t0))" > "$PARTS/$name.rc"
    echo "   exit $rc after $(($(date +%s) - t0))s (log: $PARTS/$name.log)"
    [ "$rc" -eq 0 ] || tail -n 15 "$PARTS/$name.log" | sed 's/^/   | /'
}

# The test tier first: it says whether the CUDA code paths work at all. JUnit XML gives the counts and the
# skip reasons; system-out keeps what the tests print (device, MiB, seconds).
run_stage pytest 200 "$PY" -m pytest $TESTS -v -p no:cacheprovider -o junit_logging=system-out \
    --junitxml="$PARTS/pytest.xml"
for stage in peak:60 phases:120 sync:90 vllm:90; do
    run_stage "${stage%%:*}" "${stage##*:}" "$PY" examples/benchmarks/gpu_peak.py stage "${stage%%:*}" \
        --device "$DEVICE" --json "$PARTS/${stage%%:*}.json"
done

if ! (cd "$ROOT" && "$PY" examples/benchmarks/gpu_report.py --parts "$PARTS" --json "$JSON" \
        --mode "$MODE" --elapsed "$(($(date +%s) - START))"); then
    printf '{"gpu": true, "mode": "%s", "error": "the assembly failed; the stage files are in %s"}\n' \
        "$MODE" "$PARTS" > "$JSON"
    echo "gpu_check: the assembly failed; stage files in $PARTS"
    exit 1
fi
echo "gpu_check: done in $(($(date +%s) - START))s -> $JSON"
for f in "$PARTS"/*.rc; do
    [ "$(cut -d' ' -f1 "$f")" = 0 ] || exit 1
done
exit 0
