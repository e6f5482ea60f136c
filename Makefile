# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
ARGS ?=
# make test spreads test files over this many pytest-xdist workers (each starts its own servers); 0: one process.
TEST_WORKERS ?= 2

.PHONY: demo test lint bench env clean

.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

env: .venv/.installed

demo: .venv/.installed
	$(PY) -m devtools.demo $(ARGS)

test: .venv/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=60 $(ARGS)

lint: .venv/.installed
	.venv/bin/ruff check .

bench: .venv/.installed
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf .venv .run .pytest_cache
