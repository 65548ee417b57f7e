#!/usr/bin/env bash
# The wheel is the product: build it, install it alone (no extras) in a fresh venv outside the
# checkout, and train from a packaged recipe, export and evaluate there, as a new user would.
#   bash .ci/check_wheel.sh            (PYTHON=python3.12 to choose the interpreter)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/lightning_dino-*.whl)"
echo "$WHEEL"

echo "== installing it in a fresh venv: torch first, then the wheel alone"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
export PATH="$WORK/venv/bin:$PATH"
"$VPY" -m pip install -q $TORCH_PINS
"$VPY" -m pip install -q "$WHEEL"

cd "$WORK"  # not a clone: no configs/ here
VERSION="$("$VPY" -c 'from lightning_dino.version import __version__; print(__version__)')"
test "$(lightning-dino --version)" = "lightning-dino $VERSION"
"$VPY" - <<'PY'
import sys

import lightning_dino

for optional in ("litdata", "matplotlib"):
    assert optional not in sys.modules, f"import lightning_dino imported {optional}"
try:
    lightning_dino.prepare_streaming_dataset("no_such_folder", "out")
except ImportError as error:
    assert "lightning-dino[streaming]" in str(error), error
else:
    raise AssertionError("prepare without litdata did not name the [streaming] extra")
print("import lightning_dino: no optional dependency imported; the missing extra is named")
PY
lightning-dino configs
lightning-dino configs --name quickstart --out edited.yaml
test -f edited.yaml

echo "== a tiny fit from the packaged quickstart recipe, then export and knn"
TINY_DATA="--data.dataset synthetic --data.synthetic_size 32 --data.synthetic_image_size 32
  --data.global_crop_size 32 --data.local_crop_size 16 --data.eval_resize 32
  --data.batch_size 16 --data.num_workers 0"
# shellcheck disable=SC2086
lightning-dino fit --config quickstart $TINY_DATA --trainer.max_steps 2 \
  --trainer.enable_progress_bar false
CKPT=runs/quickstart/checkpoints/last.ckpt
test -f "$CKPT"
lightning-dino export --ckpt "$CKPT" --out exports/quickstart
test -f exports/quickstart/model.safetensors
cat > tiny.yaml <<'YAML'
data:
  dataset: synthetic
  synthetic_size: 32
  synthetic_image_size: 32
  global_crop_size: 32
  local_crop_size: 16
  eval_resize: 32
  batch_size: 16
  num_workers: 0
YAML
lightning-dino knn --ckpt "$CKPT" --config tiny.yaml
echo "wheel check passed: $WHEEL"
