#!/usr/bin/env bash
# Creates ./.venv with everything the demo, the tests and the benchmark need, on a bare machine with
# Python 3.11+. Uses uv when it can (fast), falling back to pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v uv >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv || true
fi

# Then the project itself, editable: its entry point registers the atlas_migration provider (connection
# types, hooks, triggers) with Airflow; the code keeps running from include/ (the pinned requirements
# already satisfy its loose dependencies, so this adds only the distribution's metadata and a path file).
if command -v uv >/dev/null 2>&1; then
  [ -x .venv/bin/python ] || uv venv --quiet --python "$PYTHON" .venv
  uv pip install --quiet --python .venv/bin/python -r requirements-dev.txt
  uv pip install --quiet --python .venv/bin/python -e .
else
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
fi
.venv/bin/python -c "import airflow, pymongo, moto; print('environment ready: airflow', airflow.__version__, '| pymongo', pymongo.version)"
.venv/bin/python -c "from importlib.metadata import version; print('provider mongo-to-atlas', version('mongo-to-atlas'), 'installed')"
