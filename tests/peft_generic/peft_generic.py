"""Run PEFT's own generic tuner tests (``tests/`` of the installed peft's sdist) against a third-party method.

Nothing of PEFT's tests is copied: ``scripts/fetch_peft_tests.sh`` (run by ``scripts/setup.sh``, or here on first
use) unpacks them from the sdist of the installed peft as the namespace package ``peft_tests``; this module imports
them and re-parametrizes their test methods with the plugin's own ``TEST_CASES`` rows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

FETCH = Path(__file__).resolve().parents[2] / "scripts" / "fetch_peft_tests.sh"
CACHE = Path(os.environ.get("PEFT_INFOSTEER_CACHE") or Path.home() / ".cache" / "peft-infosteer") / "peft-tests"


# ---- locating and importing PEFT's tests --------------------------------------------------------------------------


def peft_tests_root() -> Path:
    """Directory holding the ``peft_tests`` package for the installed peft version (fetched on first use)."""
    version = importlib.metadata.version("peft")
    root = CACHE / f"peft-{version}"
    if not (root / ".complete").exists():  # fetched by scripts/setup.sh; here for a venv made another way
        subprocess.run(["bash", str(FETCH), sys.executable, str(CACHE)], check=True, stdout=subprocess.DEVNULL)
    return root


@contextlib.contextmanager
def _stub_module(name: str, **attrs):
    """Put a throw-away module into ``sys.modules`` while PEFT's tests import it, then remove it again.

    ``peft_tests.testing_common`` does ``from diffusers import StableDiffusionPipeline`` at import time, only to
    ``isinstance``-check Stable Diffusion pipelines in ``_test_disable_adapter``. Nothing we run builds one, so an empty
    class is exact; the stub is removed afterwards so that ``find_spec("diffusers")`` in transformers/peft stays None.
    """
    try:
        importlib.import_module(name)
        yield  # the real package is installed: use it
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    try:
        yield
    finally:
        sys.modules.pop(name, None)


@functools.cache
def import_peft_test_module(name: str) -> types.ModuleType:
    """``import peft_tests.<name>`` from the fetched sdist, e.g. ``import_peft_test_module("test_custom_models")``."""
    root = str(peft_tests_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    with _stub_module("diffusers", StableDiffusionPipeline=type("StableDiffusionPipeline", (), {})):
        importlib.import_module("peft_tests.testing_common")
    return importlib.import_module(f"peft_tests.{name}")


def mark_offline(model_ids: Iterable[str]) -> None:
    """Make PEFT's ``hub_online_once`` treat these ids as already fetched, i.e. never switch the Hub back online."""
    testing_utils = import_peft_test_module("testing_utils")
    for model_id in model_ids:
        testing_utils._HUB_MODEL_ACCESSES.setdefault(model_id, 1)


# ---- adopting PEFT's test methods with our own cases --------------------------------------------------------------


def _argnames(spec) -> tuple[str, ...]:
    return tuple(a.strip() for a in spec.split(",")) if isinstance(spec, str) else tuple(spec)


def _clone(fn: Callable, cases: dict, precheck: Callable | None, test_name: str) -> Callable:
    """A copy of PEFT's test method, re-parametrized with ``cases`` and preceded by ``precheck`` (skips)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def test(self, *args, **kwargs):
        if precheck is not None:
            bound = signature.bind(self, *args, **kwargs)
            precheck(test_name, dict(bound.arguments))
        return fn(self, *args, **kwargs)

    test.__signature__ = signature
    del test.__wrapped__  # pytest must not unwrap to PEFT's function and its TEST_CASES marks
    marks = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize" and _argnames(mark.args[0]) in cases:
            values, ids = cases[_argnames(mark.args[0])]
            marks.append(pytest.mark.parametrize(mark.args[0], values, ids=ids).mark)
        else:
            marks.append(mark)  # other parametrizations (dtype, is_trainable, ...) and skipif marks stay
    test.pytestmark = marks
    return test


def adopt_peft_tests(
    cases: dict[str, tuple[list, list[str] | None]],
    generic: Iterable[list],
    opt_in: Iterable[str] = (),
    precheck: Callable[[str, dict], None] | None = None,
    not_applicable: dict[str, str] | None = None,
):
    """Class decorator for a subclass of one of PEFT's test classes.

    An inherited ``test_*`` method is adopted when PEFT parametrizes it over one of its method-generic lists
    (``generic``: e.g. ``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``, ``ALL_CONFIGS``; matched by identity) or when it is
    named in ``opt_in`` (a test over a hand-picked list of PEFT methods that applies to ours too). ``cases`` maps
    PEFT's argnames (``"test_name, model_id, config_cls, config_kwargs"``, ``"config_cls,config_kwargs"``, ...) to our
    ``(argvalues, ids)``; an adopted test gets those instead of PEFT's and keeps its other parametrizations (dtype,
    is_trainable, ...). ``precheck(test, args)`` runs first and may ``pytest.skip`` one case; ``not_applicable`` maps a
    test to the reason it is skipped as a whole. Other inherited tests (tests of one specific PEFT method, Hub models)
    are not collected; their names are kept in ``cls.peft_dropped_tests``.
    """
    cases = {_argnames(k): v for k, v in cases.items()}
    generic_ids = {id(values) for values in generic}
    opt_in = set(opt_in)
    not_applicable = dict(not_applicable or {})

    def decorate(cls):
        adopted, dropped = [], []
        for name in sorted(dir(cls)):
            if not name.startswith("test_") or name in cls.__dict__:
                continue  # tests the subclass defines itself are left alone
            fn = getattr(cls, name)
            if not callable(fn):
                continue
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            ours = [m for m in marks if _argnames(m.args[0]) in cases]
            if not ours or not (name in opt_in or any(id(m.args[1]) in generic_ids for m in ours)):
                setattr(cls, name, None)  # not collected
                dropped.append(name)
                continue
            test = _clone(fn, cases, precheck, name)
            if name in not_applicable:
                test = pytest.mark.skip(reason=not_applicable.pop(name))(test)
            setattr(cls, name, test)
            adopted.append(name)
        unknown = sorted(set(not_applicable) | (opt_in - set(adopted)))
        if unknown:
            raise ValueError(f"{cls.__name__}: these PEFT tests do not exist (any more?): {unknown}")
        cls.peft_adopted_tests, cls.peft_dropped_tests = tuple(adopted), tuple(dropped)
        return cls

    return decorate


# ---- tiny decoder models instead of the Hub's tiny-random models -------------------------------------------------

# PEFT's ids -> our local model built from a config. The directory names avoid the substring "gpt2": PEFT's
# `_skip_if_conv1d_not_supported` skips every method but LoRA/IA3/LoHa/LoKr when "gpt2" is in the id, and InfoSteer
# does support Conv1D, so the merge tests must run on GPT-2 too.
TINY_DECODERS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "gpt-2": ("gpt2", dict(n_embd=32, n_head=4, n_inner=64, n_positions=64)),
}


def tiny_decoder_dir(key: str) -> str:
    """Save (once) a tiny random causal LM built from a config; return its directory, used as PEFT's ``model_id``.

    A real directory keeps every code path of PEFT's tests unpatched: ``AutoModelForCausalLM.from_pretrained(model_id)``
    loads the same weights each time, ``config._name_or_path == base_model_name_or_path`` (model card check), and
    PEFT's ``save_embedding_layers="auto"`` finds ``config.json`` locally instead of asking the Hub.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = TINY_DECODERS[key]
    path = CACHE / "tiny-models" / f"tiny-{key}"
    if not (path / "config.json").exists():
        layer_key = {"gpt2": "n_layer"}.get(model_type, "num_hidden_layers")
        config = AutoConfig.for_model(
            model_type, **{layer_key: 2}, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # PEFT's generate-based tests only look at the first scores or check that generate runs: 4 new tokens
        # instead of transformers' default 20 make them ~4x faster (generate dominates the decoder tests' time)
        model.generation_config.max_new_tokens = 4
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: parallel workers never see a half-written model
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker was first
    return str(path)
