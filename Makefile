# lightning_dino: `make quickstart` trains on Fashion-MNIST and prints the k-NN accuracy;
# `make test` gets Fashion-MNIST (some tests train on it), runs the linter and the test suite
# (`make test-all` adds the slow multi-rank tier);
# `make docs` builds the documentation site.
# All create .venv when it is missing.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
QUICKSTART_DIR := runs/quickstart

.PHONY: venv test test-tier2 test-all lint docs quickstart fashion-mnist clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(PY) -m ruff check .

test: venv fashion-mnist lint
	$(PY) -m pytest -q -m "not tier2"

# The second tier: the slow checks that start two CPU ranks (DDP, sharded training) and the GPU
# script's dry run. `make test-all` is both tiers, as CI runs them.
test-tier2: venv
	$(PY) -m pytest -q -m tier2

test-all: test test-tier2

# The documentation site (docs/ and the docstrings) into site/; --strict fails on any warning,
# such as a reference to a name that no longer exists.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,docs]'
	touch $@

docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict

# Fashion-MNIST: Debian's package when we are root on Debian (works offline from the package
# mirror), torchvision's downloader into data/ otherwise.
fashion-mnist: venv
	@if [ -f $(FMNIST_SYSTEM)/train-images-idx3-ubyte.gz ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST is present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
		$(PY) -c "import torchvision; torchvision.datasets.FashionMNIST('data', train=True, download=True); torchvision.datasets.FashionMNIST('data', train=False, download=True)"; \
	fi

quickstart: venv fashion-mnist
	$(PY) -m lightning_dino fit --config configs/quickstart.yaml
	$(PY) -m lightning_dino knn --config configs/quickstart.yaml --ckpt $(QUICKSTART_DIR)/checkpoints/last.ckpt

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache site build dist
