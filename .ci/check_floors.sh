#!/usr/bin/env bash
# The declared lower bounds are tested: install the lowest allowed lightning, timm, torchmetrics,
# jsonargparse and safetensors (.ci/floors.txt; torch and torchvision at this project's pins)
# into a separate venv and run the fast tests (-m "not slow") against them.
#   bash .ci/check_floors.sh            (PYTHON=python3.12 to choose the interpreter)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q $TORCH_PINS
"$VPY" -m pip install -q -r "$REPO/.ci/floors.txt" "$REPO[dev]"
# Every pinned floor is what got installed (a resolver conflict would have failed above).
"$VPY" - "$REPO/.ci/floors.txt" <<'PY'
import re
import sys
from importlib.metadata import version

for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, pinned = re.match(r"([\w-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
        assert version(name) == pinned, f"{name}: {version(name)} installed, floor {pinned}"
        print(f"{name}=={version(name)}")
PY
cd "$REPO"
"$VPY" -m pytest -q -m "not slow" -p no:cacheprovider
