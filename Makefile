# The two commands of the README: `make repro` runs the pipeline, `make test` runs the tests.
# Each creates the virtual environment and installs everything on first use.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp
# On an offline machine of this workplace the complete MNIST mirror lies beside the checkout.
MNIST_MIRROR ?= $(wildcard $(abspath ../shared/data/mnist))
export MNIST_MIRROR
# dvc.yaml's commands say `python`: make it the environment's, as an activated venv would.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test lint setup
setup: $(DEV_STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch and torchvision first, pinned to the builds this machine has on disk; pip shows its
	# progress (a few minutes on a fresh machine)
	$(BIN)/python -m pip install --progress-bar on torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --progress-bar on -e .
	touch $@

# The tests need the dev tools and the sweep's extra (Ray, psycopg, MLflow's auth app); the
# pipeline (`make repro`, `make smoke`) does not install them.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --progress-bar on -e '.[dev,sweep]'
	touch $@

# The YAML files DVC reads are checked first: an alias bomb would take `dvc repro` gigabytes.
repro: $(STAMP)
	$(BIN)/python -m aebench.yaml_bounds
	$(BIN)/dvc repro

# One pytest worker per core (pytest-xdist), each test file on one worker (its module fixtures,
# such as test_e2e_pipeline.py's `dvc repro` flow, built once); that flow, the longest, starts
# first (tests/conftest.py; `--no-loadscope-reorder` keeps the order). The 10 slowest tests are
# listed at the end (docs/code.md says why each is slow).
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder --durations=10

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# `make smoke`: the whole pipeline on 3,000 training images, one epoch, one replica, in a scratch
# copy (.smoke/) with its own mlflow.db: a change tried in minutes, the committed results untouched.
.PHONY: smoke
smoke: $(STAMP)
	$(BIN)/python -m aebench.smoke

# `make ui`: the MLflow UI on the store of the last run (named in .mlflow-last-store: after
# `make smoke` its .smoke/mlflow.db, after `dvc repro` this working copy's mlflow.db), or on
# `make ui STORE=folder-or-uri`; prints the store and the runs-list address in the "Model
# training" view.
STORE ?=
PORT ?= 5000
.PHONY: ui
ui: $(STAMP)
	$(BIN)/python -m aebench.tracking.ui $(STORE) --port $(PORT)

# `make plots` writes dvc_plots/index.html: the models' test-MSE curves overlaid, the PCA curve
# and the figures; `make plots REV=HEAD~1` draws the workspace against that revision instead.
# The page works offline: .dvc/config points DVC at .dvc/plots/offline.html (libraries inlined).
.PHONY: plots
plots: $(STAMP)
	$(BIN)/dvc plots $(if $(REV),diff $(REV),show) -o dvc_plots
