# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create and reuse .venv at the repository root; the install re-runs only when
# pyproject.toml or constraints.txt change.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.xent-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,keras,test]'
	touch $(STAMP)

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
