# gravl-dr: `make demo` runs the main job on embedded defaults; `make test` runs the whole suite;
# `make unit` runs the pure tier in seconds.
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: demo test unit lint typecheck pytest venv system system-test bench clean

$(VENV)/.installed: pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
	@# The venv's interpreter must be executable by the PostgreSQL server user, which runs
	@# archive_command/restore_command (gravl-dr wal-push/wal-fetch): prefer the system Python.
	@test -x $(PY) || uv venv -q --python "$$(bash scripts/pick-python.sh)" $(VENV)
	uv pip install -q --compile-bytecode --python $(PY) -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

system:
	@bash scripts/system-deps.sh

system-test:
	@bash scripts/system-deps.sh test

demo: system venv
	$(VENV)/bin/gravl-dr demo

lint: venv
	$(VENV)/bin/ruff check flows tasks deployments tests bench scripts
	$(VENV)/bin/ruff format --check flows tasks deployments tests bench scripts

typecheck: venv
	$(VENV)/bin/mypy flows tasks deployments tests bench

# The pure tier: no server, no CLI process; seconds, not minutes (the tiers are set in tests/conftest.py).
unit: venv
	$(VENV)/bin/pytest -q -m unit tests

pytest: system-test venv
	$(VENV)/bin/pytest -q tests

test: lint typecheck pytest

bench: system-test venv
	$(PY) bench/backup.py --scale 20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
