#!/usr/bin/env bash
# Density rows on one GPU (issue 12): train several rows of the table side by side for a fixed time
# (each row one process; SIGINT at the deadline writes its checkpoint), then evaluate each row's best
# validation epoch at K=5000 on the whole test set, one row at a time (each evaluation sizes its chunks
# from the card's whole memory). Brings back at most 8 files under $OUT: rows.tar.gz (every row's
# config.json, metrics.jsonl, eval.json, pictures and logs) and, as far as 64 MiB allow, the rows'
# checkpoint.pt in 16 MB pieces (ckpt.tar.00, .01, ...) to resume them elsewhere with --resume, then their best.pt
# without the optimizer's state (what evaluate reads).
#
#   TRAIN_S=360 EVAL_S=150 OUT=/tmp/gpu bash benchmarks/density_gpu.sh        # on the lent GPU machine
#   TRAIN_S=20 K=10 LIMIT=100 OUT=/tmp/gpu bash benchmarks/density_gpu.sh     # a dry run on the CPU
#
# Unpack here with: cat ckpt.tar.* | tar -x -C ~/runs/density; tar -xzf rows.tar.gz -C ~/runs/density
#
# ONLY="convhvae-standard convhvae-vamp" trains only the rows named; SEED=DIR holding NAME.tar.xz (a run folder:
# config.json, metrics.jsonl, checkpoint.pt) goes on with that row (--resume) instead of starting it afresh.
# RUNS=DIR trains in DIR (default a new temporary folder): an earlier call's folder, on a machine still warm.
# What travels is at most 64 MiB: the tree (7 MB), the wheels, the data as xz (26.5 MB) and both ConvHVAE rows'
# packed checkpoints (33.4 MB) are more; then seed one row in a first short call (mkdir -p /tmp/dens; RUNS=/tmp/dens
# SEED=... ONLY=that row TRAIN_S=20; the data stays on the warm machine) and the other in the next (same RUNS).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; TRAIN_S=${TRAIN_S:-360}; EVAL_S=${EVAL_S:-150}; K=${K:-5000}; LIMIT=${LIMIT:-}
mkdir -p "$OUT"
R=${RUNS:-$(mktemp -d)}
[ -d "$R" ] || { echo "RUNS=$R: no such folder (a machine given back keeps nothing from an earlier call)"; exit 2; }
. benchmarks/device_env.sh  # wheels, data, PY
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
log() { echo "== $(date -u +%T) $*" | tee -a "$R/density_gpu.log"; }
log "device $DEV: $($PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")"

# name | flags, each as in benchmarks/density.py's ROWS (a test holds them to it); conv rows first: a CPU cannot train them
ROWS=(
  "convhvae-standard|--preset vampprior-convhvae"
  "convhvae-vamp|--preset vampprior-convhvae --prior vamp:500"
  "hvae-standard|--preset vampprior-hvae"
  "hvae-vamp|--preset vampprior-hvae --prior vamp:500"
  "hvae3-vamp|--preset vampprior-hvae --prior vamp:500 --latent-dims 40,40,40"
  "hvae-iaf|--preset vampprior-hvae --posterior iaf:2"
  "hvae3-standard|--preset vampprior-hvae --latent-dims 40,40,40"
  "hvae-paper-standard|--preset vampprior-hvae --arch gated-hvae --optimizer adam-normgrad"
  "hvae-paper-vamp|--preset vampprior-hvae --prior vamp-hardtanh:500 --arch gated-hvae --optimizer adam-normgrad"
)
if [ -n "${ONLY:-}" ]; then
  keep=(); for row in "${ROWS[@]}"; do [[ " $ONLY " == *" ${row%%|*} "* ]] && keep+=("$row"); done
  [ ${#keep[@]} -gt 0 ] || { echo "ONLY=$ONLY names none of the rows: ${ROWS[*]%%|*}"; exit 2; }
  ROWS=("${keep[@]}")
fi
for f in ${SEED:+"$SEED"/*.tar.xz}; do  # python's tarfile: the image may lack xz
  [ -f "$f" ] || { echo "SEED=$SEED holds no NAME.tar.xz"; exit 2; }
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" "$f" "$R"
  name=$(basename "$f" .tar.xz); log "seeded $name at epoch $(tail -n 1 "$R/$name/metrics.jsonl" | cut -c1-14)"
done
log "training ${#ROWS[@]} rows for ${TRAIN_S} s each"
for row in "${ROWS[@]}"; do
  name=${row%%|*}; flags=${row#*|}
  # a resumed run keeps the settings it was started with
  if [ -f "$R/$name/checkpoint.pt" ]; then flags="--resume"; else flags="$flags --seed 0"; fi
  # shellcheck disable=SC2086
  timeout -s INT -k 60 "$TRAIN_S" $PY -m pyro_vae.cli train --out "$R/$name" $flags --device "$DEV" \
    --checkpoint-every 2000 --no-progress > "$R/$name.train.log" 2>&1 &
done
wait
for row in "${ROWS[@]}"; do name=${row%%|*}; log "$name: $(tail -n 1 "$R/$name.train.log")"; done

log "evaluating at K=$K"
deadline=$(( $(date +%s) + EVAL_S ))
for row in "${ROWS[@]:2}" "${ROWS[@]:0:2}"; do  # the quick MLP rows first
  name=${row%%|*}; left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 5 ] || { log "$name: no time left to evaluate"; continue; }
  rm -f "$R/$name/eval.json"  # (one unpacked from SEED is of an earlier epoch)
  timeout "$left" $PY -m pyro_vae.cli evaluate "$R/$name" --iw-samples "$K" ${LIMIT:+--limit $LIMIT} \
    --no-progress > "$R/$name.eval.log" 2>&1
  status=$?  # 124: out of time
  log "$name: $(grep -o '"iw_log_likelihood": [-0-9.]*' "$R/$name/eval.json" 2>/dev/null || echo "not evaluated (status $status)")"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$R/density_gpu.log" 2>&1

cp "$R/density_gpu.log" "$OUT/"
(cd "$R" && tar -czf "$OUT/rows.tar.gz" --exclude='*.pt' -- *)
# checkpoints, conv rows first, as long as they fit in what comes back (8 files of 16 MiB, 64 MiB in all)
budget=$(( 60 * 1024 * 1024 - $(stat -c %s "$OUT/rows.tar.gz") )); picked=()
for row in "${ROWS[@]}"; do
  f="${row%%|*}/checkpoint.pt"; [ -f "$R/$f" ] || continue
  size=$(stat -c %s "$R/$f")
  if [ "$size" -le "$budget" ]; then picked+=("$f"); budget=$(( budget - size - 4096 )); fi
done
# then each row's best.pt (its best validation epoch, which evaluate reads) without the optimizer's state, which
# only a resume needs (a third of the file), so that a row's best epoch outlives the machine it ran on
S=$(mktemp -d); bests=()
for row in "${ROWS[@]}"; do
  name=${row%%|*}; [ -f "$R/$name/best.pt" ] || continue
  mkdir -p "$S/$name"
  $PY -c "import sys, torch; p = torch.load(sys.argv[1], map_location='cpu', weights_only=True); p.pop('optim', None)
torch.save(p, sys.argv[2])" "$R/$name/best.pt" "$S/$name/best.pt" || continue
  size=$(stat -c %s "$S/$name/best.pt")
  if [ "$size" -le "$budget" ]; then bests+=("$name/best.pt"); budget=$(( budget - size - 4096 )); fi
done
if [ $(( ${#picked[@]} + ${#bests[@]} )) -gt 0 ]; then
  tar -cf - -C "$R" "${picked[@]}" -C "$S" "${bests[@]}" | split -b 16000000 -d - "$OUT/ckpt.tar."
fi
log "checkpoints brought back: ${picked[*]:-none}; best epochs (weights only): ${bests[*]:-none}"
ls -la "$OUT"
