#!/usr/bin/env bash
# Every GPU benchmark case in one call (at most 8 minutes), for a lent GPU machine:
#   bash benchmarks/gpu.sh            # JSON into $OUT, or benchmarks/out/ when OUT is unset
# It installs the project into a fresh virtual environment on the machine when scratchdet is not
# importable, prints the GPU, then runs the cases with a time limit each, so one slow case cannot
# take the others' time.  Each case writes its own JSON; a failed or timed-out case is reported
# and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
export OUT
mkdir -p "$OUT"
if ! python -c "import scratchdet" 2>/dev/null; then
    python -m venv /tmp/sd-venv && . /tmp/sd-venv/bin/activate
    pip install -q -e . >"$OUT/install.log" 2>&1 || { echo "install failed: see $OUT/install.log"; exit 1; }
fi
python - <<'PY' | tee "$OUT/gpu_env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
export SCRATCHDET_CACHE="${SCRATCHDET_CACHE:-/tmp/scratchdet-cache}"
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then tail -n 8 "$OUT/$name.log"
    else echo "$name failed or timed out (rc $?): see $OUT/$name.log"; tail -n 20 "$OUT/$name.log"; status=1; fi
}
# R50-FPN GN at 800x1333, 2 images, bf16: scratchdet's step vs the torchvision-reference loop.
run 300 train_throughput_r50_gpu python benchmarks/train_throughput.py --case r50_gn_800_gpu --iters 20 --warmup 5 --rounds 2
# The default preset on the GPU, and the training data pipeline feeding it.
run 100 train_throughput_default_gpu python benchmarks/train_throughput.py --case default --iters 30 --warmup 5 --rounds 2
exit $status
