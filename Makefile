# Two commands work on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-full bench gpu-check gpu-train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	sh scripts/install_browser.sh $(VENV)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

demo-full: $(STAMP)
	$(BIN)/python -m pipelines.demo --full

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# every CUDA path, its figures in gpu_check/ (without CUDA: prints the plan, exits 0)
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --out gpu_check

# the shipped network and inputs (no identity loss) trained from scratch on one GPU in ~8 min, evaluated, exported with its model card into gpu_train/
# (DEGRADATION=real_mild for the camera model; without CUDA: prints the plan, exits 0)
DEGRADATION ?= bicubic
gpu-train: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --mode train --degradation $(DEGRADATION) --train-steps 6000 --budget-s 480 --out gpu_train

clean:
	rm -rf $(VENV) demo_out .pytest_cache
