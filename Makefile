# The two commands: `make demo` and `make test`. Both set everything up first.
# `make docs` builds the API reference (Sphinx) into docs/_build/html.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
DEMO   ?= runs/demo
DEMO_EPOCHS ?= 3
DEMO_IW ?= 200

.PHONY: demo test setup data graphviz docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 7 ]; then \
	  echo "warning: $$free GiB free on this disk; the environment (torch with its CUDA libraries) needs about 6.5 GiB"; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST: Debian's package where apt can install it; otherwise torchvision downloads it at first use.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "apt-get could not install dataset-fashion-mnist; torchvision will download the data"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "apt-get could not install dataset-fashion-mnist; torchvision will download the data"; \
	else \
	  echo "dataset-fashion-mnist is not installed and apt needs root; torchvision will download the data"; \
	fi

# graphviz's dot program, which pyro.render_model needs for model.png (make demo installs it where apt can)
graphviz:
	@if command -v dot >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null \
	    || echo "apt-get could not install graphviz; runs will say model.png was not written"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null \
	    || echo "apt-get could not install graphviz; runs will say model.png was not written"; \
	else \
	  echo "graphviz is not installed and apt needs root; runs will say model.png was not written"; \
	fi

demo: setup data graphviz
	$(BIN)/pyro-vae train --dataset fashion-mnist --arch mlp --epochs $(DEMO_EPOCHS) --out $(DEMO) --overwrite
	$(BIN)/pyro-vae evaluate $(DEMO) --iw-samples $(DEMO_IW)
	@echo "Pictures and metrics are in $(DEMO)/: samples.png reconstructions.png levels.png curves.png model.png metrics.jsonl eval.json"

test: setup data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2  # two workers of one thread: 5.3 min against 8-9 serially on 2 cores

# The API reference, one page per module (docs/api/), warnings as errors. -E: a fresh
# environment every time, so that a warning in a page Sphinx would not re-read still fails.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -E -W --keep-going -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
