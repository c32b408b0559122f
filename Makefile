# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create and reuse .venv at the repository root. `make demo` installs what the demo needs (the
# `demo` extra: transformers, matplotlib, rich, mauve-text); `make test` everything (all extras, Keras
# with JAX and TensorFlow, the test tools). Each install re-runs only when pyproject.toml or
# constraints.txt change.
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP_DEMO := $(VENV)/.xent-demo-installed
STAMP      := $(VENV)/.xent-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench install install-demo clean

install: $(STAMP)

install-demo: $(STAMP_DEMO)

$(PY):
	@echo "creating $(VENV) (python3 -m venv)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip

# pip shows what it downloads and installs (the CPU build of torch, pinned by constraints.txt).
$(STAMP_DEMO): pyproject.toml constraints.txt | $(PY)
	@echo "installing xent and what the demo needs into $(VENV)..."
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[demo]'
	touch $(STAMP_DEMO)

# everything: the demo's packages too, so a later `make demo` installs nothing
$(STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "installing xent, every extra (Keras, JAX, TensorFlow included) and the test tools into $(VENV)..."
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[all,keras,trl,test]'
	touch $(STAMP) $(STAMP_DEMO)
	@echo "installed: the commands are in $(VENV)/bin (source $(VENV)/bin/activate, or run $(VENV)/bin/xent)"

demo: $(STAMP_DEMO)
	$(VENV)/bin/xent demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# pytest exits 5 when it collected no test: say so loudly, but do not call it a failure.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: NO TESTS RAN (exit 5)"; else exit $$rc; fi; }

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/linear_cross_entropy.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
