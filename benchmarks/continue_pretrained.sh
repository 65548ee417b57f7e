#!/usr/bin/env bash
# Continued pre-training on Fashion-MNIST (docs/continue_pretraining.md): a ViT pre-trained with DINO
# (fashion_mnist_vit.yaml with class-token features) is exported and started from as a released
# model (its timm weights file, heads not loaded), then continued for equal CPU time (a) naively,
# new heads and no warm-up, and (b) with the warm-up of configs/continue_pretrained.yaml: heads
# first against the frozen backbone, then the backbone's lr ramped up. Budgets are this process's
# CPU minutes on one thread (--clock cpu), so other load on the machine does not change them.
#   bash benchmarks/continue_pretrained.sh runs/continue   (32 CPU minutes of training and the
#   k-NN evaluations: about an hour of wall time on a 2-core machine)
set -euo pipefail
OUT="${1:-runs/continue}"
PRETRAIN_MIN="${PRETRAIN_MIN:-12}"
CONTINUE_MIN="${CONTINUE_MIN:-10}"
EVERY="${EVERY:-2}"
PY="${PYTHON:-python}"
VIT=(--config configs/fashion_mnist_vit.yaml --model.feature_grid=0 --clock cpu)
"$PY" benchmarks/fashion_mnist.py "${VIT[@]}" --minutes "$PRETRAIN_MIN" --eval-every "$PRETRAIN_MIN" \
  --out "$OUT/pretrain"
"$PY" -m lightning_dino export --ckpt "$OUT/pretrain/checkpoints/last.ckpt" --out "$OUT/released"
START=(--model.start_from "$OUT/released/model.safetensors" --model.warmup_epochs=0)
"$PY" benchmarks/fashion_mnist.py "${VIT[@]}" "${START[@]}" --minutes "$CONTINUE_MIN" \
  --eval-every "$EVERY" --out "$OUT/naive"
"$PY" benchmarks/fashion_mnist.py "${VIT[@]}" "${START[@]}" --minutes "$CONTINUE_MIN" \
  --eval-every "$EVERY" --model.freeze_backbone_steps=150 --model.backbone_warmup_steps=150 \
  --model.momentum_teacher=0.996 --out "$OUT/warm_up"
