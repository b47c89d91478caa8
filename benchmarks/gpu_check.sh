#!/usr/bin/env bash
# The CUDA check, in one go (issue 18): the whole test suite with a GPU visible, the demo on CUDA,
# checkpoints across devices, the IW estimate against a hand-written one, bf16 autocast, and the
# speed ratio. Writes at most 8 files to $OUT (default ./gpu_out). Where no GPU exists it says so and
# runs only what makes sense on the CPU (the suite, which skips its CUDA tests).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # here, or on the lent GPU machine
#
# On the GPU machine, pyro-ppl travels as wheels in .whl/ and Fashion-MNIST in .data/fashion-mnist/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
W=$(mktemp -d)
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/gpu_check.log"; }
. benchmarks/device_env.sh  # wheels, data, PY
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
log "device $DEV: $($PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/gpu_check.log" 2>&1

log "1. the whole suite"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout ${SUITE_TIMEOUT:-300} $PY -m pytest -q -rs $XDIST -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
log "suite: $(tail -1 "$OUT/pytest.log")"

log "2. the demo on $DEV"
timeout 150 $PY -m pyro_vae.cli train --dataset fashion-mnist --arch mlp --epochs 3 --out "$W/demo" \
  --device "$DEV" --no-progress >> "$OUT/gpu_check.log" 2>&1 &&
timeout 120 $PY -m pyro_vae.cli evaluate "$W/demo" --iw-samples 200 --no-progress > "$W/demo/evaluate.log" 2>&1
log "demo: $(grep -o '"iw_log_likelihood": [-0-9.]*' "$W/demo/eval.json" 2>/dev/null)"
tar -czf "$OUT/demo.tar.gz" -C "$W/demo" $(cd "$W/demo" && ls *.png *.json *.jsonl *.log 2>/dev/null)

[ "$DEV" = cuda ] || { log "no GPU: the CUDA measurements are skipped"; exit 0; }
log "3. checkpoints across devices"
timeout 150 $PY benchmarks/portability.py --out "$W/port" --json "$OUT/portability_cuda.json" >> "$OUT/gpu_check.log" 2>&1
log "4. IW K=1000 on the 10 000 test images"
timeout 120 $PY benchmarks/iw_speed.py --device cuda --iw-samples 1000 --json "$OUT/iw_cuda.json" >> "$OUT/gpu_check.log" 2>&1
log "5. bf16 autocast"
timeout 120 $PY benchmarks/autocast.py --device cuda --epochs 5 --json "$OUT/autocast_cuda.json" >> "$OUT/gpu_check.log" 2>&1
log "6. speed, pyro_vae vs hand-written"
timeout 90 $PY benchmarks/speed.py --device cuda --epochs 3 --json "$OUT/speed_cuda.json" >> "$OUT/gpu_check.log" 2>&1
log "done"
