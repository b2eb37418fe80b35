from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

# parallel workers (pytest-xdist, as scripts/test.sh runs the suite) share the cores: one thread each, and for the
# processes the tests start (set before torch is imported, so that its OpenMP pool is sized by it)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the eager closed-form math: deterministic and without compile time in every test process; test_compiled.py runs the
# compiled path (the default for users) against it
os.environ.setdefault("PEFT_INFOSTEER_COMPILE", "0")
# inductor's compile workers cost more than they save on two cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# bitsandbytes prints a harmless notice when its optional CPU kernel package is absent
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import peft_infosteer  # noqa: E402,F401  (registers the method)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the native CPU kernel of ``elevate`` once, up front (half a minute on a fresh machine): the processes that
    tests start, some with timeouts, then load the built kernel instead of each building it."""
    from peft_infosteer._native import native_elevate

    native_elevate()


@pytest.fixture
def tiny():
    """Factory: ``tiny(model_type="llama", num_layers=2, seed=0)`` -> a tiny random causal LM."""
    from tiny_models import tiny_model

    return tiny_model


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted real SmolLM2-135M-Instruct, or skip when the asset package is missing."""
    from peft_infosteer.assets import MissingAssetError, smollm2_model_dir

    try:
        return smollm2_model_dir()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
