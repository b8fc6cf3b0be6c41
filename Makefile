# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; a looser spec pulls a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,train,eval,dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/instructglm demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/tokenize_speed.py
	$(PY) bench/model_step.py
	$(PY) bench/decode_speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
