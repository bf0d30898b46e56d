# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build installs in seconds; a looser requirement would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-all bench-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/difflab demo --out out/demo

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

test-all: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m ''

# Benchmark environment with the peers (k-diffusion imports torchvision, which needs its own torch build).
bench-env:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# k-diffusion imports clip, which needs pkg_resources (gone from setuptools 81 on).
	.venv-bench/bin/python -m pip install --quiet 'setuptools<81' k-diffusion==0.1.1.post1 -e '.[bench]' pytest

clean:
	rm -rf $(VENV) .venv-bench out
