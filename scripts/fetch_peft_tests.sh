#!/usr/bin/env bash
# Fetch PEFT's own generic tests (tests/*.py of the *installed* peft version) from its sdist on PyPI.
# One command, nothing vendored: re-run after upgrading peft. Usage: fetch_peft_tests.sh [PYTHON] [DEST]
#   DEST/peft-<version>/peft_tests/{testing_common,testing_utils,test_custom_models,test_decoder_models,...}.py
# The tests dir is unpacked under the package name `peft_tests` (a namespace package: the sdist ships no
# tests/__init__.py), so its relative imports (`from .testing_common import ...`) work and the name cannot clash
# with the project's own `tests` directory.
set -euo pipefail
PY="${1:-python}"
DEST="${2:-${PEFT_INFOSTEER_CACHE:-$HOME/.cache/peft-infosteer}/peft-tests}"
V="$("$PY" -c 'import importlib.metadata as m; print(m.version("peft"))')"
OUT="$DEST/peft-$V"
if [[ -f "$OUT/.complete" ]]; then echo "$OUT/peft_tests"; exit 0; fi
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps "peft==$V" -d "$TMP" >&2
rm -rf "$OUT"; mkdir -p "$OUT/peft_tests"
tar xzf "$TMP/peft-$V.tar.gz" -C "$OUT/peft_tests" --strip-components=2 "peft-$V/tests"
touch "$OUT/.complete"
echo "$OUT/peft_tests"
