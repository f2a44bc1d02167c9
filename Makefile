# mrcnn_edu — two commands: `make lab` opens the course, `make test` runs every test.
# Both create .venv on first use and reinstall only when the dependency files change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mrcnn_edu-installed
# These exact versions are what the course is tested with (pip takes them from local disk on
# the project's machines; elsewhere they come from PyPI).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup lab test book casestudy weights clean help

help:
	@echo "make lab    set up (first time only) and open the course in JupyterLab"
	@echo "make test   set up (first time only) and run the whole test suite"
	@echo "make book   render executed HTML copies of the notebooks into book/"
	@echo "make casestudy  the oil-tank case study end to end: runs/casestudy/report.md (~25 min on 2 cores)"
	@echo "make weights    rebuild the shipped weights in data/weights/ (shapes_small, tanks_small)"
	@echo "make clean  remove the virtual environment and generated files"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || \
		{ echo "mrcnn_edu needs Python >= 3.10 (PYTHON=$(PYTHON)); run e.g. make PYTHON=python3.11 test"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo ">>> installing mrcnn_edu and its dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIN) -e ".[dev]"
	@touch $(STAMP)

# JupyterLab refuses to run as root unless told; containers often run as root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	cd notebooks && ../$(BIN)/jupyter lab $(LAB_ARGS) 00_course_map.ipynb

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Executed HTML copies of every notebook in book/ (full mode unless MRCNN_EDU_FAST=1).
book: $(STAMP)
	mkdir -p book
	MRCNN_EDU_BATCH=1 $(BIN)/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=1800 \
		--output-dir book notebooks/*.ipynb

# The case study headless: synthetic data (cached in data/cache/oil_tanks), three-stage training
# (resumed if interrupted), COCO evaluation, tiled scene inference, error analysis, fill levels;
# writes runs/casestudy/report.md, metrics.json and figures/. CASESTUDY_ARGS="--fast" for a smoke run.
CASESTUDY_ARGS ?=

casestudy: $(STAMP)
	$(BIN)/python -m mrcnn_edu.cli casestudy $(CASESTUDY_ARGS)

# The shipped weights (safetensors + card), rebuilt from scratch by the project's own training code:
# the toy shapes model (configs/shapes_*.json, ~9 min) and the case-study model: the case study's data
# and model (configs/tanks_small.json) with a longer schedule (configs/tanks_weights.json: 12 epochs
# of all layers, cosine; ~30 min on 2 cores), scored on the test tiles into its card.
weights: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py --save data/weights/shapes_small.safetensors
	$(BIN)/python -m mrcnn_edu.cli casestudy --out runs/weights/tanks_small \
		--train-config configs/tanks_weights.json --save-weights data/weights/tanks_small.safetensors

clean:
	rm -rf $(VENV) build *.egg-info mrcnn_edu.egg-info .pytest_cache data/cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +
