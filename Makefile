# `make run`: set up .venv and run the main job, the miniature scaling study (`dit-scaling study`, into
# studies/fmnist-default; run again, it resumes or re-renders).  `make test`: set up .venv (with dev extras) and
# run the tests, one worker per core (each test file stays on one worker, so its module fixtures are built once).
# `make paper`: the analysis of the paper's own numbers (compute table, Fig. 8's fit, a plan, every figure).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SLURMCTLD := /usr/sbin/slurmctld

.PHONY: run paper test lint clean

# The embedded default data: Debian's dataset-fashion-mnist (needs root, as on CI; else install it yourself).
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; \
	fi

# A real SLURM for the launcher's tests (tests/slurm_cluster.py starts a one-node cluster): Debian's packages.
$(SLURMCTLD):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; \
	else \
		echo "SLURM is missing: run 'sudo apt-get install slurmctld slurmd slurm-client munge'" >&2; exit 1; \
	fi

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -qq -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -qq -e ".[dev]"
	touch $@ $(VENV)/.installed-core

run: $(VENV)/.installed-core $(FASHION_MNIST)
	$(BIN)/dit-scaling study

paper: $(VENV)/.installed-core
	$(BIN)/dit-scaling flops
	$(BIN)/dit-scaling fit runs/paper --x gflops --y fid
	$(BIN)/dit-scaling plan --compute 1e11
	$(BIN)/dit-scaling figures runs/paper

test: $(VENV)/.installed-dev $(FASHION_MNIST) $(SLURMCTLD)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
