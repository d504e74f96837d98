# Set-up and everyday commands. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of this version is what these machines carry; override for CUDA builds.
TORCH  ?= torch==2.13.0

.PHONY: install run test lint format bench proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Start a local cluster (etcd, controller, 2 PS, 2 agents), train the reference
# job, print its final loss and checkpoint, and stop everything.
run: install
	$(BIN)/elasticd up --ps 2 --agents 2 --submit examples/charlm.yaml --stop-when-done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# worksteal: the default scheduler handed one worker every long test (they sort first) while
# the others sat idle. The suite spends much of its time waiting on leases and processes (on 2 cores it kept
# 1.4 of them busy with 2 workers): a pytest-xdist worker per core, plus one (at most 4).
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(4, len(os.sched_getaffinity(0)) + 1))')

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist worksteal --durations=15

bench: install
	$(BIN)/pip install -q torchft numpy  # the torchft baseline of bench recovery
	$(BIN)/python -m bench membership --json
	$(BIN)/python -m bench ps --json
	$(BIN)/python -m bench allreduce --json
	$(BIN)/python -m bench checkpoint --json
	$(BIN)/python -m bench recovery --json

# Regenerate the committed gRPC modules from proto/.
proto: install
	$(BIN)/python -m elasticd.rpc.generate

clean:
	rm -rf $(VENV) .elasticd build *.egg-info
