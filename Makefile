# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create and reuse .venv at the repository root; the install re-runs only when
# pyproject.toml or constraints.txt change.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.xent-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench install clean

install: $(STAMP)

# pip shows what it downloads and installs (about 1-2 minutes the first time, with the CPU build of torch).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { echo "creating $(VENV) (python3 -m venv)"; python3 -m venv $(VENV); }
	@echo "installing xent, its extras and the test tools into $(VENV) (1-2 minutes the first time)..."
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[all,keras,test]'
	touch $(STAMP)
	@echo "installed: the commands are in $(VENV)/bin (source $(VENV)/bin/activate, or run $(VENV)/bin/xent)"

demo: $(STAMP)
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
