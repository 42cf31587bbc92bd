#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one call of at most 540 s (the device tool's 600 s
# command limit less a margin, and under 15 minutes of device time with room for one rerun), for a lent
# GPU machine, from the checkout as it is (no install, no network):
#   bash benchmarks/gpu.sh            # results into $OUT (at most 8 files), or benchmarks/out/ when OUT is unset
# 1. python3 must import torch and see a CUDA GPU, else one line says why and it exits 2.
# 2. faster-coco-eval comes from the wheels in .whl/ when python3 lacks it (docs/gpu.md says how to
#    download them; the device tool carries ".whl"); the checkout is put first on PYTHONPATH, so
#    `scratchdet` is this tree.  The synthetic data's masks are encoded by its RLE library, and step 4 evaluates.
# 3. The training step of R50-FPN GN Mask R-CNN on 800x800 synthetic squares (the paper's 800 px
#    shorter side; not COCO's 800x1333 frames), 2 and 8 images, in what train.amp=auto runs (bf16 autocast
#    with TF32 on an Ampere or newer GPU) and in full fp32 (train.amp=off), NCHW (what auto uses on CUDA),
#    scratchdet's step against the torchvision-reference loop in the same settings; peak GPU memory of each.
#    Prepared batches: the data pipeline is not in these numbers.
# 4. `scratchdet train` of the default preset end to end on the GPU (AP, wall time), then
#    `scratchdet eval` of that run on 500 validation images (wall time).
# Each step has its own time limit (60 + 2 x 100 + 170 + 90 = 520 s at most), so one slow step cannot
# take the others' time; a failed step is reported and the others still run.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/out}"
mkdir -p "$OUT"
WORK="${TMPDIR:-/tmp}/scratchdet-gpu"
mkdir -p "$WORK"
export SCRATCHDET_CACHE="${SCRATCHDET_CACHE:-$WORK/cache}" PYTHONUNBUFFERED=1
PY=python3
command -v "$PY" >/dev/null || { echo "gpu.sh: no $PY on PATH; run it where PyTorch's python3 is"; exit 2; }

# ---- 1. torch and a GPU, or one line and exit 2 -------------------------------------------------
"$PY" - <<'PY' >"$OUT/gpu_env.txt" 2>"$WORK/env.err" || { cat "$OUT/gpu_env.txt"; exit 2; }
import os, sys
try:
    import torch, torchvision
except Exception as e:  # one line, not a traceback
    print(f"gpu.sh: {sys.executable} cannot import torch/torchvision ({e.__class__.__name__}: {e}); run it where PyTorch is installed")
    sys.exit(2)
versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA build {torch.version.cuda}"
if not torch.cuda.is_available():
    print(f"gpu.sh: no CUDA GPU visible ({versions}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}); "
          "these benchmarks need one")
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"{versions}; GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}; python {sys.version.split()[0]}")
PY
cat "$OUT/gpu_env.txt"

# ---- 2. faster-coco-eval from the carried wheels, the checkout on the path ----------------------
if ! "$PY" -c "import faster_coco_eval" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: $PY lacks faster-coco-eval and no wheel is in .whl/ (carry .whl)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        >"$WORK/install.log" 2>&1 || { echo "gpu.sh: installing .whl/ failed: $(tail -n 1 "$WORK/install.log")"; exit 2; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import scratchdet.engine, scratchdet.evaluation" 2>"$WORK/import.err" \
    || { echo "gpu.sh: importing scratchdet failed: $(tail -n 1 "$WORK/import.err")"; exit 2; }

status=0
step() {  # step LIMIT_SECONDS NAME COMMAND...: the command's output in $WORK/NAME.log, its tail here
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then tail -n 4 "$WORK/$name.log"
    else echo "$name failed or timed out (rc $?):"; tail -n 15 "$WORK/$name.log"; status=1; fi
}

# ---- 3. the training-step grid ------------------------------------------------------------------
# The 800x800 synthetic set is generated once (CPU work), outside the cases' time limits.
step 60 data_800sq "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import train_throughput as t; t.prepare('r50_gn_800sq_gpu', 1)"
rm -rf "$WORK/grid"
for batch in 2 8; do  # one process per batch size: both precisions, each loop twice (A B A B)
    name="r50_gn_800sq_b${batch}"
    mkdir -p "$WORK/grid/$name"
    OUT="$WORK/grid/$name" step 100 "$name" "$PY" benchmarks/train_throughput.py --case r50_gn_800sq_gpu \
        --iters 6 --warmup 2 --rounds 2 --precisions auto,off --set "solver.ims_per_batch=$batch" \
        --set "train.channels_last=off"
done
"$PY" - "$WORK/grid" "$OUT" <<'PY'
import json, sys
from pathlib import Path
grid, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for f in sorted(grid.glob("*/train_throughput_*.json")):
    for r in json.loads(f.read_text()):
        rows.append({"name": f.parent.name, **r})
(out / "train_grid.json").write_text(json.dumps(rows, indent=1))
# detectron2's GN R50-FPN 3x on 8 V100s: 0.309 s/iteration at 16 images, about 6.5 images/s per GPU.
DETECTRON_PER_GPU = 16 / 0.309 / 8
lines = ["| case | train.amp | precision | layout | batch | reference img/s | scratchdet img/s | ratio | peak GiB ref / ours | "
         "scratchdet / detectron2 per V100 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    ips, peak = r["images_per_sec"], {k: v / 2**30 for k, v in r["peak_memory_bytes"].items()}
    amp = next((o.split("=", 1)[1] for o in r["overrides"] if o.startswith("train.amp=")), "case")
    lines.append(f"| {r['name']} | {amp} | {r['precision']}{' + TF32' if amp == 'auto' and r['precision'] == 'bf16' else ''} | "
                 f"{'channels-last' if r['channels_last'] else 'NCHW'} | "
                 f"{r['ims_per_batch']} | {ips['reference']:.2f} | {ips['scratchdet']:.2f} | {r['ratio']:.2f}x | "
                 f"{peak['reference']:.1f} / {peak['scratchdet']:.1f} | {ips['scratchdet'] / DETECTRON_PER_GPU:.2f}x |")
(out / "train_grid.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

# ---- 4. the default preset end to end, then 500 validation images -------------------------------
run_dir="$WORK/e2e"
t0=$(date +%s)
step 170 train_default "$PY" -m scratchdet train default --out "$run_dir" --force --no-progress dataloader.num_workers=8
echo "train_default wall time: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu_env.txt"
cp "$run_dir/final.json" "$OUT/e2e_final.json" 2>/dev/null
cp "$run_dir/metrics.jsonl" "$OUT/e2e_metrics.jsonl" 2>/dev/null
t0=$(date +%s)
step 90 eval_500 "$PY" -m scratchdet eval --run "$run_dir" --device cuda data.synth.num_val=500
echo "eval_500 wall time (500 images, synthetic data generated first when not cached): $(( $(date +%s) - t0 )) s" \
    | tee -a "$OUT/gpu_env.txt"
cp "$WORK/eval_500.log" "$OUT/eval_500.log" 2>/dev/null
exit $status
