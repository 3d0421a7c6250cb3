# speechkd: `make test` installs (if needed) and runs the test suite; `make demo` runs the default recipe.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export OMP_WAIT_POLICY := PASSIVE
RECIPE ?= recipes/commands_mvq.yaml

.PHONY: install test demo bench clean

$(VENV)/.installed: requirements.txt requirements-bench.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c constraints.txt
	$(PIP) install -q -c constraints.txt -r requirements.txt -r requirements-bench.txt
	$(PIP) install -q -c constraints.txt --no-deps -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/speechkd run $(RECIPE)

bench: install
	$(PY) benchmarks/quantizer_bench.py

clean:
	rm -rf $(VENV) exp
