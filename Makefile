# official_conadv: `make test` runs the suite, `make train` the offline default run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Tests run on CPU; keep TF quiet and deterministic-friendly.
export TF_CPP_MIN_LOG_LEVEL ?= 2
export CUDA_VISIBLE_DEVICES ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test train rehearse clean

# The venv is rebuilt whenever requirements.txt is newer than it.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile official_conadv benchmarks experiments

train: $(VENV)/.installed
	$(PY) -m official_conadv.train --experiment=mnist_resnet_conadv --model_dir=runs/mnist_resnet_conadv

# Every paper row (imagenet_resnet50_*) at toy scale with its own loop shape:
# exact steps, exact evaluation, SIGTERM + exact resume; on one device, then on
# a 2-replica MirroredStrategy. About 50 min on 2 cores.
rehearse: $(VENV)/.installed
	$(PY) -m official_conadv.rehearse --replicas=1 --output=runs/rehearse/one_device.json
	$(PY) -m official_conadv.rehearse --replicas=2 --output=runs/rehearse/mirrored.json

clean:
	rm -rf $(VENV) runs .pytest_cache
