#!/usr/bin/env bash
# GPU throughput of DINO ViT-S/16 (2x224 + 10x96 crops, bf16-mixed) on one GPU, in at most 8 min
# (9.5 with data/photos), through `lightning-dino benchmark` (docs/benchmark.md).
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

# The recipe: ImageNet ViT-S/16 (2x224 + 10x96 crops, 65536 prototypes, bf16-mixed) on one GPU;
# --dry-run: the tiny test recipe on the CPU, one timed step (checks that every step runs).
BENCH=("$PY" -m lightning_dino benchmark)
if [ "${1:-}" = "--dry-run" ]; then
  RECIPE=(--config tests/conf/tiny_vit.yaml --trainer.accelerator cpu)
  TIMED=(--steps 1 --warmup 1)
  GROW=(--max-batch-size 16)
  COMPILED=(--steps 1 --warmup 2)
  PIPELINE=(--data.num_workers 0 --data.synthetic_size 64 --data.batch_size 8)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  RECIPE=(--config imagenet_vits16 --trainer.devices 1 --trainer.strategy auto
          --data.n_local_crops 10 --model.freeze_last_layer 0)
  TIMED=(--steps 20 --warmup 5)
  GROW=()
  COMPILED=(--steps 20 --warmup 8 --data.batch_size 128)
  PIPELINE=(--data.num_workers 12 --data.synthetic_size 4096 --data.batch_size 128)
fi
"$PY" -c "import torch, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| lightning', lightning.__version__, '| timm', timm.__version__); import lightning_dino" || exit 1

# 1. The model alone (random crops): batch 64, 128... until one does not fit; then the largest
#    again with activation checkpointing (the memory it saves, the speed it costs).
step 140 "ViT-S/16, random crops, bf16-mixed: the largest batch, then activation checkpointing" \
  "${BENCH[@]}" "${RECIPE[@]}" "${TIMED[@]}" --find-batch-size "${GROW[@]}" --compare-checkpointing

# 2. torch.compile of the backbones; compile time is in the warm-up.
step 90 "the same with --model.compile true, batch 128" \
  "${BENCH[@]}" "${RECIPE[@]}" "${COMPILED[@]}" --model.compile true

# 3. The real data pipeline: MultiCropDataModule with workers on generated 256-px images.
for aug in per_sample batched; do
  step 50 "data pipeline on generated 256-px images, $aug augmentation, batch 128" \
    "${BENCH[@]}" "${RECIPE[@]}" "${TIMED[@]}" --real-data "${PIPELINE[@]}" \
    --data.dataset synthetic --data.synthetic_image_size 256 \
    --data.augmentation "$aug"
done
# Real photographs (500x375 JPEGs from benchmarks/photos.py; build them before, on a machine
# with PyPI, and carry data/photos): decode in the workers, crops and pixels on the GPU.
if [ -d data/photos ]; then
  for aug in device batched; do
    step 50 "real photographs, $aug augmentation, batch 128" \
      "${BENCH[@]}" "${RECIPE[@]}" "${TIMED[@]}" --real-data "${PIPELINE[@]}" \
      --data.dataset folder --data.data_dir data/photos --data.val_fraction 0 \
      --data.augmentation "$aug"
  done
fi

# 4. DINOv3's ViT-S/16 recipe (iBOT, KoLeo, RoPE): its largest batch.
if [ "${1:-}" != "--dry-run" ]; then
  step 70 "DINOv3 ViT-S/16 recipe, random crops: the largest batch" \
    "${BENCH[@]}" --config dinov3_vits16 --trainer.devices 1 --trainer.strategy auto \
    "${TIMED[@]}" --find-batch-size
fi

# 5. Side by side on the GPU: (a) DINO + Lightning, (b) per-view example-code loop, (c) bare loop.
CONFIG=$(mktemp --suffix=.yaml)
if [ "${1:-}" != "--dry-run" ]; then
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
step 70 "a/b/c side by side, batch 64" \
  "$PY" benchmarks/throughput.py --config "$CONFIG" "${ABC[@]}" --loader-batches 0 \
  --end-to-end-steps 0
rm -f "$CONFIG"
echo "log: $LOG"
