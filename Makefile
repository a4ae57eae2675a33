# Two commands on a fresh machine: `make report` (the default pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
DEVICE ?= cpu

.PHONY: report test test-slow test-slurm lint dry-run benchmarks clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete
	@echo "report: $(CURDIR)/results/report/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The smoke DAG through SLURM on a single-node cluster on this machine (root; installs Debian's
# SLURM packages on first use; tests/slurm/stop-cluster.sh stops it again).
test-slurm: $(STAMP)
	bash tests/slurm/start-cluster.sh
	$(BIN)/python -m pytest -q -m slurm --durations=5 tests/test_slurm.py

lint: $(STAMP)
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n

benchmarks: $(STAMP)
	bash benchmarks/all.sh $(DEVICE)

clean:
	rm -rf results .snakemake
