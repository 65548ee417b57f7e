#!/usr/bin/env bash
# GPU throughput of DINO ViT-S/16 (2x224 + 10x96 crops, bf16-mixed) on one GPU, in at most ~8 min.
#
#   bash benchmarks/gpu.sh            # on a machine with one GPU
#   bash benchmarks/gpu.sh --dry-run  # tiny models on the CPU: checks that every step runs
#
# Prints, for each step: images/s, peak GPU memory and MFU (FLOP/s over the card's dense bf16
# peak: 989 TFLOP/s for H100 SXM and H200). Every step has its own time limit, so a slow or
# failing step costs at most its share and the script goes on. Needs torch, lightning, timm,
# torchvision and pyyaml (python3 on the lent H100/H200 machines has them); the package is used
# from this checkout (PYTHONPATH), not installed. If $OUT is set, the log is also written there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOG=${OUT:-/tmp}/gpu_benchmark.log
exec > >(tee "$LOG") 2>&1

step() {  # step SECONDS TITLE COMMAND...: run with a time limit, report failures, go on
  local limit=$1 title=$2
  shift 2
  echo "== $title (limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=KILL "$limit" "$@" 2>&1 |
    grep -v -E "^(GPU available|TPU available|HPU available|LOCAL_RANK|💡|\`Trainer.fit\` stopped)"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || echo "!! step failed or timed out (exit $status)"
  echo "   ($((SECONDS - start)) s)"
}

DRY=()
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--device cpu --dry-run)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
"$PY" -c "import torch, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| lightning', lightning.__version__, '| timm', timm.__version__); import lightning_dino" || exit 1

# 1. The model alone: random crops already on the GPU; batch 64, 128... until one does not fit.
step 110 "ViT-S/16, synthetic GPU-resident crops, bf16-mixed" \
  "$PY" benchmarks/gpu_throughput.py --batch-sizes 64 128 256 512 --steps 20 --warmup 5 "${DRY[@]}"

# 2. torch.compile of the backbones (DINO(compile=True)); compile time is in the warm-up.
step 110 "the same with --model.compile true, batch 128" \
  "$PY" benchmarks/gpu_throughput.py --compile --batch-sizes 128 --steps 20 --warmup 8 "${DRY[@]}"

# 3. The real data pipeline: MultiCropDataModule with workers on generated 256-px images.
step 70 "data pipeline, per-sample torchvision v2 augmentation (the reference's)" \
  "$PY" benchmarks/gpu_throughput.py --data pipeline --augmentation per_sample \
  --batch-sizes 128 --steps 10 --warmup 3 "${DRY[@]}"
step 70 "data pipeline, batched augmentation in the workers" \
  "$PY" benchmarks/gpu_throughput.py --data pipeline --augmentation batched \
  --batch-sizes 128 --steps 10 --warmup 3 "${DRY[@]}"
# Real photographs (500x375 JPEGs from benchmarks/photos.py; build them before, on a machine
# with PyPI, and carry data/photos): decode in the workers, crops and pixels on the GPU.
if [ -d data/photos ]; then
  for aug in device batched; do
    step 70 "real photographs, $aug augmentation" \
      "$PY" benchmarks/gpu_throughput.py --data pipeline --photos data/photos --augmentation "$aug" \
      --batch-sizes 128 --steps 10 --warmup 3 "${DRY[@]}"
  done
fi

# 4. Side by side on the GPU: (a) DINO + Lightning, (b) per-view example-code loop, (c) bare loop.
CONFIG=$(mktemp --suffix=.yaml)
if [ ${#DRY[@]} -eq 0 ]; then
  cat > "$CONFIG" <<'YAML'
trainer: {log_every_n_steps: 20}
model: {backbone: vit_small_patch16_224, out_dim: 65536, freeze_last_layer: 0, warmup_epochs: 0}
data: {dataset: synthetic, batch_size: 64, global_crop_size: 224, local_crop_size: 96,
       n_local_crops: 10}
YAML
  ABC=(--steps 10 --rounds 3)
else
  cp tests/conf/tiny_vit.yaml "$CONFIG"
  ABC=(--steps 1 --rounds 1 --warmup 1 --device cpu)
fi
step 100 "a/b/c side by side, batch 64" \
  "$PY" benchmarks/throughput.py --config "$CONFIG" "${ABC[@]}" --loader-batches 0 \
  --end-to-end-steps 0
rm -f "$CONFIG"
echo "log: $LOG"
