#!/usr/bin/env bash
# The GPU half of the project in a few device calls: each stage fits one 10-minute command on one H100/H200.
#
#   bash benchmarks/gpu_session.sh fetch       # here, with the package registry: peer wheels into .whl/
#   bash benchmarks/gpu_session.sh tests       # on the GPU: tests/test_gpu.py, then the whole suite without the
#                                              # Triton interpreter
#   bash benchmarks/gpu_session.sh ce          # on the GPU: exact fused CE against full CE and the peers
#   bash benchmarks/gpu_session.sh catalogue   # on the GPU: SCE / fused / sampled at V = 1M and 10M
#   bash benchmarks/gpu_session.sh sampled     # on the GPU: sampled CE, N = 32k, K = 512...4096, V = 1M
#   bash benchmarks/gpu_session.sh sasrec      # on the GPU: tests/test_gpu.py, then the SASRec study's ML-1M
#                                              # ce / sce / gbce jobs at window 200 in bf16 autocast, each
#                                              # budget-capped, about 8 minutes with the tests (carry .data: fetch
#                                              # copies ml-1m.txt there)
#
# Results (CSV, logs) go to $OUT when it is set (the device tool brings that folder back), else to
# benchmarks/results/tmp. Copy what you keep to benchmarks/results/ under a name with the device and the date.
# SMOKE=1 runs every stage at toy sizes on whatever device there is (checks the plumbing on a CPU machine).
set -euo pipefail

cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_session.sh fetch|tests|ce|catalogue|sampled|sasrec}
case "$STAGE" in
fetch|tests|ce|catalogue|sampled|sasrec) ;;
*) echo "unknown stage $STAGE (fetch|tests|ce|catalogue|sampled|sasrec)" >&2; exit 2 ;;
esac
RESULTS=${OUT:-benchmarks/results/tmp}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
# Peers measured by bench_ce.py: Apple's cut-cross-entropy and Liger-Kernel (pure-Python wheels).
PEER_WHEELS=("cut-cross-entropy==25.1.1" "liger-kernel==0.8.5")
# The SASRec stage's data: ../shared/data does not travel to the device machine, so fetch copies it into .data/.
REC=${REC:-.data/rec}
SASREC_JOBS=${SASREC_JOBS:-ml_ce_s0,ml_sce_s0,ml_sce_by1024_s0,ml_gbce_s0}

setup_device() {
    # The device image has torch, triton, transformers and accelerate but no internet: carried wheels (.whl/,
    # made by the fetch stage) go to a private site folder, and this checkout installs without dependencies.
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    export PYTHONUNBUFFERED=1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
          'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$RESULTS/env.txt"
}

if [[ ${SMOKE:-0} == 1 ]]; then
    DEVICE=cpu; DTYPE=float32
    CE_N=256; CE_V=4096; CE_D=64; CE_PROVIDERS=torch_eager,lv_torch
    CAT_N=256; CAT_V=8192; CAT_D=32
    SMP_N=256; SMP_KS="64"; SMP_V=8192; SMP_D=32
    # Each job's own flags, cut to one epoch of 64 users at a short window.
    SASREC_MINUTES=6; SASREC_CAP=120; SASREC_EXTRA="--max-users 64 --max-len 16 --epochs 1"
else
    DEVICE=cuda; DTYPE=bfloat16
    # The Gemma-2-2B head of issue 2: 8k tokens, 256k vocabulary, d = 2304.
    CE_N=8192; CE_V=256000; CE_D=2304
    CE_PROVIDERS=torch_eager,torch_compile,torch_native,cce_apple,liger,lv_torch,lv_triton,lv_triton_filtered
    # Issue 3's shapes: N = 64k rows at V = 1M and 10M items, D = 64 and 256; sampled at N = 32k, V = 1M.
    CAT_N=65536; CAT_V=1000000,10000000; CAT_D=64,256
    SMP_N=32768; SMP_KS="512 1024 2048 4096"; SMP_V=1000000; SMP_D=256
    # Each job gets at most 90 s (gbce at gSASRec's settings needs far more: its row says the epoch reached).
    SASREC_MINUTES=6; SASREC_CAP=90; SASREC_EXTRA=""
fi

# Every stage but fetch runs on the device machine (SMOKE=1: here, with this machine's environment as it is).
[[ $STAGE == fetch || ${SMOKE:-0} == 1 ]] || setup_device

case "$STAGE" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${PEER_WHEELS[@]}"
    ls -l .whl
    grep -qx '/.data/' .git/info/exclude || echo '/.data/' >> .git/info/exclude
    mkdir -p .data/rec && cp ../shared/data/rec/ml-1m.txt .data/rec/
    echo "carry .whl in every device call of the ce stage, .data in the sasrec stage's"
    ;;
tests)
    "$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$RESULTS/pytest_gpu.log"
    # The whole suite on the GPU: every Triton test then compiles real kernels instead of interpreting them.
    "$PY" -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$RESULTS/pytest_all.log"
    ;;
ce)
    "$PY" benchmarks/bench_ce.py --device "$DEVICE" --dtype "$DTYPE" --n "$CE_N" --v "$CE_V" --d "$CE_D" \
        --providers "$CE_PROVIDERS" --out "$RESULTS/ce.csv" 2>&1 | tee "$RESULTS/ce.log"
    ;;
catalogue)
    "$PY" benchmarks/bench_catalogue.py --device "$DEVICE" --dtype float32 --n "$CAT_N" --v "$CAT_V" --d "$CAT_D" \
        --out "$RESULTS/catalogue.csv" 2>&1 | tee "$RESULTS/catalogue.log"
    ;;
sampled)
    for k in $SMP_KS; do
        "$PY" benchmarks/bench_sampled.py --device "$DEVICE" --dtype float32 --n "$SMP_N" --k "$k" --v "$SMP_V" \
            --d "$SMP_D" --out "$RESULTS/sampled.csv" 2>&1 | tee -a "$RESULTS/sampled.log"
    done
    ;;
sasrec)
    [[ -f $REC/ml-1m.txt ]] || { echo "no $REC/ml-1m.txt: run the fetch stage here and carry .data" >&2; exit 2; }
    [[ ${SMOKE:-0} == 1 ]] || "$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$RESULTS/pytest_gpu.log"
    # One row per job in $RESULTS/sasrec/. Checkpoints stay on the machine (too many files to bring back), in a
    # fresh folder: the runner would skip a job whose folder holds a finished run.
    RUNS=$(mktemp -d /tmp/largevocab_sasrec_runs.XXXXXX)
    trap 'rm -rf "$RUNS"' EXIT
    "$PY" benchmarks/sasrec_study.py benchmarks/sasrec_study_jobs.json --only "$SASREC_JOBS" \
        --until "$(date -d "+$SASREC_MINUTES min" '+%Y-%m-%d %H:%M')" --cap "$SASREC_CAP" --min-budget 20 \
        --reserve 20 --threads 4 --extra="$SASREC_EXTRA" --data-dir "$REC" --runs-dir "$RUNS" \
        --results "$RESULTS/sasrec" 2>&1 | tee "$RESULTS/sasrec.log"
    ;;
esac
