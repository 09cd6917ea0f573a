# Every target sets itself up: a local .venv with torch==2.13.0 (the CPU wheel) and hcdiag installed editable.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hcdiag-installed
OUT ?= demo-out

.PHONY: demo test test-slow test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,cluster]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hcdiag verify --preset smoke --datasets synthetic --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache build *.egg-info
