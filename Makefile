# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On machines that ship a local CPU wheel of torch, install it first so that pip does not
# resolve the multi-GB CUDA build; elsewhere (GPU machines) pip resolves torch normally.
# --no-compile: no byte-compiling of every installed module at install time (about half of the
# set-up here); Python compiles what it imports, once, on first use.
LOCAL_TORCH := $(firstword $(wildcard /opt/wheels/torch-2.13.0*cpu*.whl))

.PHONY: demo test bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(LOCAL_TORCH),)
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
endif
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/alignkit pipeline --config configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs
