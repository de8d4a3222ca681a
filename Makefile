# Two entry points do all set-up on a fresh machine: `make demo` (main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR := cpu
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean gpu-wheels gpu-check system-deps slurm-up slurm-down

venv: $(VENV)/.installed

# torch first (the local CPU wheel), then the exact lock without resolution, then the package itself.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q --no-deps -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m pytest -q tests

# Main job: DeepSpeed ZeRO-2 on 2 CPU ranks (gloo). On GPUs drop DS_ACCELERATOR and set --num_gpus.
demo: venv
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train_qa.py --ds_config ds_configs/zero2.json --steps 60 $(DEMO_ARGS)

# Debian's Slurm, munge and iproute2 for the real two-node cluster (tests/integrations/test_slurm_cluster.py and
# benchmarks/bench_network.py); root only, and only what is missing.
SYSTEM_TOOLS := slurmctld slurmd sbatch munged ip tc nsenter
system-deps:
	@missing=0; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || [ -x /usr/sbin/$$t ] || missing=1; done; \
	if [ $$missing = 0 ]; then echo "system-deps: all present"; \
	elif [ "$$(id -u)" != 0 ]; then echo "system-deps: not root; the Slurm tests will skip (apt-get install slurmctld slurmd slurm-client munge iproute2)"; \
	else DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	     DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux; fi

# A throwaway two-node Slurm cluster on this host (root): each node in its own network namespace. Then
# `export SLURM_CONF=/tmp/sg-slurm/slurm.conf` and sbatch as usual; SLURM_RATE=1gbit shapes the link between nodes.
SLURM_RATE ?= unlimited
slurm-up: venv system-deps
	$(PY) -m sg_distributed.tools.local_slurm up --dir /tmp/sg-slurm --rate $(SLURM_RATE)

slurm-down: venv
	$(PY) -m sg_distributed.tools.local_slurm down --dir /tmp/sg-slurm

bench: venv
	$(PY) benchmarks/bench_methods.py

# GPU check on a lent machine (see benchmarks/gpu_check.py). Here: download the wheels the GPU machine lacks
# and the small assets into .whl/ (git-ignored). There (device tool: carry [".whl"], command "make gpu-check"):
# the image's python3, no venv; GPU_CHECK_ARGS="--dry-run" prints every command instead.
GPU_PYTHON ?= python3
gpu-wheels: venv
	$(PY) benchmarks/gpu_check.py --prepare .whl

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels .whl $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache outputs
