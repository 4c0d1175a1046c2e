# Two entry points on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# PyTorch, CPU build: asked from PyTorch's own CPU wheel index first, then as a plain pin (what a pip that sees
# only a mirror or a local wheel folder can resolve).  For a CUDA build set TORCH_INDEX to a CUDA index
# (e.g. make test TORCH_INDEX=https://download.pytorch.org/whl/cu126) or to nothing for PyPI's default.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
# SYSTEM_DEPS=no: do not install Mosquitto / systemd-analyze for the tests (those tests then skip)
SYSTEM_DEPS   ?= yes
DEMO_DIR ?= demo_out

.PHONY: demo test install system-deps torch-info lint proto screenshots fuzz bench-mtd bench-weak bench-service bench-cameras bench-calibration bench-dist bench-peer soak sweep clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the project's own range would otherwise pull a multi-GB CUDA build
	$(if $(TORCH_INDEX),$(PIP) install --quiet --timeout 20 --retries 1 --index-url $(TORCH_INDEX) \
	    torch==$(TORCH_VERSION) || )$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed torch-info

torch-info: $(VENV)/.installed
	@$(PY) -c "import torch; print('torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' \
	    if torch.version.cuda else '(CPU build)')"

system-deps:
	@$(if $(filter yes,$(SYSTEM_DEPS)),tools/system_deps.sh,echo "system-deps: skipped (SYSTEM_DEPS=$(SYSTEM_DEPS))")

demo: install
	$(PY) tools/demo.py --out $(DEMO_DIR)

test: install system-deps
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Property-based fuzzing of every input, over 10,000 generated cases (make test runs a small sample)
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider -m fuzz --hypothesis-show-statistics tests/test_fuzz.py

# The pages' screenshots in docs/pages/ (the browser tests take them)
screenshots: install system-deps
	WEAKREST_SCREENSHOTS=docs/pages $(PY) -m pytest -q -m pages

# Sparkplug B payload classes from the specification's schema (commit both files)
proto: install
	cd edge_runtime/publishing/sparkplug && ../../../$(PY) -m grpc_tools.protoc -I. --python_out=. sparkplug_b.proto

# Fit, evaluate and benchmark on ../shared/data/mtd (figures for the README / issue notes)
bench-mtd: install
	$(PY) tools/bench_mtd.py --out runs/mtd

# Weak labels on MTD: 10 defects as masks, boxes and tags, 3 seeds (--init / --cache reuse a sweep's fit)
bench-weak: install
	$(PY) tools/bench_weak.py --out runs/weak

# The running edge service on CPU: frames/s and grab-to-delivery latency through a real broker
bench-service: install
	$(PY) tools/bench_service.py

# Several cameras on one box: 1, 2 and 4 stations (one process each, as weakrest-edge@.service runs them) at
# CAMERA_FPS each on one bundle: per-station latency, memory shared and unique, every seq delivered
CAMERA_FPS ?= 10
bench-cameras: install
	$(PY) tools/bench_cameras.py --bundle $(BUNDLE) --images ../shared/data/mtd/test/good --fps $(CAMERA_FPS) \
	    --json runs/cameras/cameras.json

# Soak: the service at full rate on ../shared/data/mtd/test through a Mosquitto stopped and started every
# RESTART_MINUTES; a table per WINDOW_MINUTES, PASS/FAIL on RSS growth after warm-up (< 5 %) and missing seqs (none).
# BUNDLE: what make bench-mtd fits on MTD by default; runs/soak/soak.json gets every figure.
MINUTES ?= 60
RESTART_MINUTES ?= 10
WINDOW_MINUTES ?= 10
BUNDLE ?= runs/mtd/unsupervised
soak: install
	$(PY) tools/soak.py --minutes $(MINUTES) --broker-restart-minutes $(RESTART_MINUTES) \
	    --window-minutes $(WINDOW_MINUTES) --bundle $(BUNDLE) --out runs/soak/soak.json

# Our CPU frame time against anomalib PatchCore's ONNX export (../shared/peer), alternating in one run;
# the same MTD bundle as the soak by default
PEER_BUNDLE ?= $(BUNDLE)
bench-peer: install
	$(PY) tools/bench_peer.py --bundle $(PEER_BUNDLE) --rounds 5 --json runs/bench_peer.json

# Accuracy levers on ../shared/data/mtd, one table (runs/sweep/table.md); GRID=... for another grid
GRID ?= docs/sweeps/levers.yaml
sweep: install
	$(PY) tools/sweep.py --grid $(GRID) --out runs/sweep

# Fit time of 1 process against 2 under torchrun on ../shared/data/mtd, one after the other (runs/dist/report.json)
bench-dist: install
	$(PY) tools/bench_distributed.py --out runs/dist --nproc 2

# Field calibration on MTD: 50 good frames on top of the demo product's bundle (needs make demo first)
bench-calibration: install
	$(PY) tools/bench_calibration.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
