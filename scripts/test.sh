#!/usr/bin/env bash
# Quick start, command 2: install into .venv (first time only), then run the test suite (unit tests on tiny random
# models plus integration tests on the real SmolLM2-135M-Instruct), in parallel workers (pytest-xdist): one per core, at
# most 4, or $PYTEST_WORKERS. Extra arguments go to pytest (a later `-n 0` runs everything in this one process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
cores="$(nproc)"
workers="${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
# worksteal: the few tests of a minute or more do not leave one worker with a long tail of queued tests
exec "${PEFT_INFOSTEER_VENV:-$ROOT/.venv}/bin/python" -m pytest -n "$workers" --dist worksteal "$@"
