#!/usr/bin/env bash
# Quick start, command 1: install into .venv (first time only), then run the offline InfoSteer demo on the real
# SmolLM2-135M-Instruct. Extra arguments go to `peft-infosteer demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "${PEFT_INFOSTEER_VENV:-$ROOT/.venv}/bin/peft-infosteer" demo "$@"
