# mlctl: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mlctl-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export DS_ACCELERATOR ?= $(if $(HAS_GPU),cuda,cpu)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick test-gpu test-cluster lint bench clean

setup: $(STAMP)

# NOTE: torch goes in first and on its own. Without a GPU, torch==2.13.0 resolves to the CPU wheel
# on disk; if deepspeed or transformers pulled torch in, pip would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(HAS_GPU)" ]; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev,demo,report,sentence-transformers]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m launcher.demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: setup
	$(BIN)/python -m pytest -m "not slow and not ray" $(PYTEST_ARGS)

# The GPU suite (tests/gpu): NCCL, bf16 and Ray on this node's GPUs; every test skips, with the
# reason, where there is no CUDA device.
test-gpu: setup
	DS_ACCELERATOR=cuda $(BIN)/python -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

# The cluster recipes for real: cluster/slurm.sbatch under a real Slurm (slurmctld + one slurmd per
# network namespace, including a requeue at the time limit), cluster/ray-cluster.yaml through
# `ray up`/`ray exec`/`ray down` with one sshd per namespace, and cluster/Dockerfile when a Docker
# daemon answers (tests/test_docker_image.py; skipped otherwise); needs root. Installs Debian's
# slurm-wlm, munge, openssh-server and rsync when missing (the package's own sshd service is not
# started: each test runs its own). See cluster/README.md.
test-cluster: setup
	@command -v slurmd >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null)
	@{ [ -x /usr/sbin/sshd ] && command -v rsync >/dev/null 2>&1; } || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null)
	@[ "$$(id -u)" != 0 ] || install -d -m 755 /run/sshd
	MLCTL_TEST_CLUSTER=1 $(BIN)/python -m pytest tests/test_slurm_recipe.py tests/test_rayup_recipe.py tests/test_docker_image.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check mlctl launcher tests bench docs
	$(BIN)/ruff format --check mlctl launcher tests bench docs
	$(BIN)/mypy mlctl launcher --ignore-missing-imports
	$(BIN)/mkdocs build --strict --quiet

bench: setup
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs demo_data .pytest_cache
