# Two entry points on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DEMO_DIR ?= demo_out

.PHONY: demo test install lint bench-mtd bench-weak bench-service bench-calibration clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The pinned CPU build first: a looser requirement would pull a multi-GB CUDA build.
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/demo.py --out $(DEMO_DIR)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Fit, evaluate and benchmark on ../shared/data/mtd (figures for the README / issue notes)
bench-mtd: install
	$(PY) tools/bench_mtd.py --out runs/mtd

# Weak labels on MTD: the same 10 defects as masks, blocks, rotated boxes, boxes, tags (reuses runs/mtd)
bench-weak: install
	$(PY) tools/bench_weak.py --base runs/mtd --out runs/weak

# The running edge service on CPU: frames/s and grab-to-delivery latency through a real broker
bench-service: install
	$(PY) tools/bench_service.py

# Field calibration on MTD: 50 good frames on top of the demo product's bundle (needs make demo first)
bench-calibration: install
	$(PY) tools/bench_calibration.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
