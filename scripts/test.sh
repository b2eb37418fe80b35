#!/usr/bin/env bash
# Quick start, command 2: install into .venv (first time only), then run the test suite (unit tests on tiny random
# models plus integration tests on the real SmolLM2-135M-Instruct). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${PEFT_INFOSTEER_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
