# official_conadv: `make test` runs the suite, `make train` the offline default run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1 installs requirements-gpu.txt (TensorFlow's CUDA extra, several GB)
# instead of requirements.txt: `make venv GPU=1`. Once installed, the venv
# stays a GPU venv (until `make clean`) without repeating GPU=1.
GPU ?= $(if $(wildcard $(VENV)/.installed-gpu),1)
STAMP := $(VENV)/.installed$(if $(filter-out 0,$(GPU)),-gpu)
# Extra flags for `make train`, e.g. TRAIN_FLAGS=--strategy=mirrored.
TRAIN_FLAGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# GPUs are hidden per recipe (CUDA_VISIBLE_DEVICES= in front of the command),
# not for the whole Makefile: `make train` sees every GPU (or those the
# caller's CUDA_VISIBLE_DEVICES names); `make test` and `make rehearse` run on
# CPU only. official_conadv/gpu_setup_test.py runs these recipes to check it.
CPU_ONLY := CUDA_VISIBLE_DEVICES=

.PHONY: venv test train rehearse clean

# The venv is rebuilt whenever its requirements file (or pyproject.toml) is
# newer than it. The exact pins come first, then this checkout itself as an
# editable package (no dependencies: they are the pins), so
# `import official_conadv` works in the venv from any directory.
EDITABLE := $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(EDITABLE)
	touch $@

# requirements-gpu.txt includes requirements.txt.
$(VENV)/.installed-gpu: requirements-gpu.txt requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-gpu.txt
	$(EDITABLE)
	touch $@

venv: $(STAMP)

# CPU only, also on a GPU machine: the suite's expected values and its
# 2-replica Mirrored checks are for the 2 logical CPUs that conftest.py makes.
# Whole files per worker, longest first (conftest.py's FILE_SECONDS) instead
# of xdist's order by number of tests, so both workers finish together.
# Then the JAX suite (*_jax_test.py) in its own processes on Keras' JAX
# backend (conftest.py: a process serves one backend).
test: $(STAMP)
	$(CPU_ONLY) $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder official_conadv benchmarks experiments
	$(CPU_ONLY) KERAS_BACKEND=jax $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder official_conadv benchmarks experiments

train: $(STAMP)
	$(PY) -m official_conadv.train --experiment=mnist_resnet_conadv --model_dir=runs/mnist_resnet_conadv $(TRAIN_FLAGS)

# Every paper row (imagenet_resnet50_*) at toy scale with its own loop shape:
# exact steps, exact evaluation, SIGTERM + exact resume; on one device, then on
# a 2-replica MirroredStrategy. 40-55 min on 2 cores (docs/rehearsal.md). CPU
# only, also on a GPU machine: the 2 replicas are logical CPUs, and the
# rehearsal's results are CPU results that a GPU run (other kernels, TF32)
# would not repeat.
rehearse: $(STAMP)
	$(CPU_ONLY) $(PY) -m official_conadv.rehearse --replicas=1 --output=runs/rehearse/one_device.json
	$(CPU_ONLY) $(PY) -m official_conadv.rehearse --replicas=2 --output=runs/rehearse/mirrored.json

clean:
	rm -rf $(VENV) runs .pytest_cache
