"""``import peft_infosteer`` makes INFOSTEER a real PEFT method, idempotently and in any import order."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerModel
from peft_infosteer._registration import ensure_peft_type, register

TESTS_DIR = Path(__file__).parent


def _run_scripts(*scripts: str, timeout: float = 120) -> list[str]:
    """Run Python scripts in fresh interpreters, concurrently; return their stdout, fail with their stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    # the start-up hook off: these scripts control the order in which peft and the plugin are imported themselves
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PEFT_INFOSTEER_AUTOLOAD="0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for s in scripts
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{err[-4000:]}"
        outputs.append(out)
    return outputs


def test_peft_type_and_mappings():
    assert PeftType.INFOSTEER is peft_infosteer.INFOSTEER
    assert PeftType["INFOSTEER"] is PeftType("INFOSTEER") is PeftType.INFOSTEER
    assert PeftType.INFOSTEER == "INFOSTEER" and PeftType.INFOSTEER.value == "INFOSTEER"
    assert "INFOSTEER" in list(PeftType)
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.INFOSTEER] == "infosteer_"
    assert list(PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("infosteer_") == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.INFOSTEER] is InfoSteerConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.INFOSTEER] is InfoSteerModel
    # existing members are untouched
    assert PeftType.LORA.value == "LORA" and PeftType("LORA") is PeftType.LORA


def test_registering_twice_is_harmless(tiny):
    members = list(PeftType)
    register(InfoSteerConfig, InfoSteerModel)
    register(InfoSteerConfig, InfoSteerModel)
    assert ensure_peft_type() is PeftType.INFOSTEER
    importlib.reload(peft_infosteer)
    assert list(PeftType) == members
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.INFOSTEER] is InfoSteerConfig
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    assert isinstance(model.base_model, InfoSteerModel)


def test_fresh_process_import_orders_and_future_peft_member(tmp_path, tiny):
    get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain")).save_pretrained(tmp_path)
    peft_first = f"""
        import sys
        import peft
        from peft import PeftConfig, PeftModel, PeftType
        assert "INFOSTEER" not in PeftType.__members__ and "peft_infosteer" not in sys.modules
        try:  # without the plugin PEFT cannot resolve the type
            PeftConfig.from_pretrained({str(tmp_path)!r})
        except KeyError as exc:
            assert "INFOSTEER" in str(exc)
        else:
            raise AssertionError("loaded an INFOSTEER adapter without the plugin?")
        import peft_infosteer
        import peft_infosteer  # a second import is a no-op
        from tiny_models import tiny_model
        assert type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__ == "InfoSteerConfig"
        loaded = PeftModel.from_pretrained(tiny_model("llama"), {str(tmp_path)!r})
        assert type(loaded.base_model).__name__ == "InfoSteerModel"
        print("OK", PeftType.INFOSTEER.value)
    """
    # A future PEFT that ships its own INFOSTEER member (and method) before the plugin is imported.
    future_peft = """
        import enum, tempfile, torch
        from dataclasses import dataclass
        from peft import PeftConfig, PeftModel, get_peft_model
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.tuners.tuners_utils import BaseTuner
        from peft.utils import register_peft_method
        from peft.utils.peft_types import PeftType

        member = str.__new__(PeftType, "INFOSTEER")
        member._name_ = member._value_ = "INFOSTEER"
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_names_.append("INFOSTEER")
        PeftType._member_map_["INFOSTEER"] = member
        PeftType._value2member_map_["INFOSTEER"] = member
        type.__setattr__(PeftType, "INFOSTEER", member)

        @dataclass
        class UpstreamConfig(PeftConfig):
            def __post_init__(self):
                super().__post_init__()
                self.peft_type = PeftType.INFOSTEER

        class UpstreamModel(BaseTuner):
            prefix = "infosteer_"

        register_peft_method(name="infosteer", config_cls=UpstreamConfig, model_cls=UpstreamModel,
                             prefix="infosteer_", is_mixed_compatible=True)

        import peft_infosteer
        from peft_infosteer import InfoSteerConfig, InfoSteerModel
        from tiny_models import tiny_model

        assert peft_infosteer.INFOSTEER is member is PeftType.INFOSTEER
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is InfoSteerConfig
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is InfoSteerModel
        from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "infosteer_"
        assert member not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING  # no stale foreign class left behind
        base = tiny_model("llama")
        model = get_peft_model(base, InfoSteerConfig(intervention="gain"))
        assert isinstance(model.base_model, InfoSteerModel)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        ids = torch.arange(3, 12).reshape(1, -1)
        with torch.no_grad():
            expected = model(ids).logits
        out = tempfile.mkdtemp()
        model.save_pretrained(out)
        assert type(PeftConfig.from_pretrained(out)) is InfoSteerConfig
        loaded = PeftModel.from_pretrained(tiny_model("llama"), out)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
        print("OK", PeftType.INFOSTEER.value)
    """
    # (importing the plugin before peft is what test_persistence's fresh process does)
    outputs = _run_scripts(peft_first, future_peft)
    assert [o.strip().splitlines()[-1] for o in outputs] == ["OK INFOSTEER"] * 2


# What `import peft` leaves behind, for comparing a process with the start-up hook against one without: every function
# reachable as an attribute of an upstream module or of a class defined there (by where its code lives, so a wrapper is
# told from the original even when functools.wraps copied the name), and the state of every logger and warning filter.
_UPSTREAM_STATE = """
    import hashlib, json, logging, sys, types, warnings
    import peft

    UPSTREAM = ("peft", "transformers", "huggingface_hub", "accelerate", "safetensors", "torch", "bitsandbytes")

    def where(obj):
        if isinstance(obj, property):
            obj = obj.fget
        elif isinstance(obj, (classmethod, staticmethod)):
            obj = obj.__func__
        if not isinstance(obj, types.FunctionType):
            return None
        return f"{obj.__module__}.{obj.__qualname__}@{obj.__code__.co_filename}:{obj.__code__.co_firstlineno}"

    functions = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(UPSTREAM) or name.startswith("peft_infosteer"):
            continue
        found = []
        for attr, value in list(vars(module).items()):
            if where(value) is not None:
                found.append(f"{attr}={where(value)}")
            elif isinstance(value, type) and value.__module__ == name:
                found += [f"{attr}.{a}={where(v)}" for a, v in list(vars(value).items()) if where(v) is not None]
        functions[name] = hashlib.sha256("\\n".join(sorted(found)).encode()).hexdigest()

    def state(logger):
        filters = [where(f) or type(f).__qualname__ for f in logger.filters]
        handlers = [f"{type(h).__qualname__}:{h.level}" for h in logger.handlers]
        return [logger.level, logger.disabled, logger.propagate, filters, handlers]

    loggers = {name: state(logger) for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    loggers["<root>"] = state(logging.root)
    print(json.dumps({
        "registered": "INFOSTEER" in peft.PeftType.__members__,
        "functions": functions,
        "loggers": loggers,
        "logging.disable": logging.root.manager.disable,
        "warnings.filters": [repr(f) for f in warnings.filters],
        "card method": where(peft.PeftModel.create_or_update_model_card),
    }))
"""


def test_the_start_up_hook_registers_and_changes_nothing_else():
    """``import peft`` with the hook: INFOSTEER registered, nothing patched, no logging changed (fresh interpreters).

    Against a process with ``PEFT_INFOSTEER_AUTOLOAD=0``: the same function objects on every upstream module and class,
    the same loggers, filters, handlers and warning filters, and the same stderr (bitsandbytes' own notices included).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    code = textwrap.dedent(_UPSTREAM_STATE)
    procs = {
        switch: subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PEFT_INFOSTEER_AUTOLOAD": switch},
        )
        for switch in ("1", "0")
    }
    results = {}
    for switch, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        results[switch] = (json.loads(out), err)
    (hooked, hooked_err), (plain, plain_err) = results["1"], results["0"]
    assert hooked["registered"] and not plain["registered"]
    assert hooked["card method"] == plain["card method"] and "/peft/peft_model.py:" in plain["card method"]
    patched = [m for m, digest in plain["functions"].items() if hooked["functions"].get(m) != digest]
    assert not patched, f"upstream functions differ with the start-up hook in: {patched}"
    default = [0, False, True, [], []]  # a logger that only exists because one more module was imported
    changed = [n for n, s in hooked["loggers"].items() if s != plain["loggers"].get(n, default)]
    assert not changed, {n: (hooked["loggers"][n], plain["loggers"].get(n)) for n in changed}
    assert hooked["logging.disable"] == plain["logging.disable"]
    assert hooked["warnings.filters"] == plain["warnings.filters"]
    assert hooked_err == plain_err


@pytest.mark.parametrize("value", [None, "", "1", "0", "false", "FALSE", " no ", "Off", "yes", "true", "2", "offf"])
def test_the_hook_and_the_package_read_the_off_switch_alike(monkeypatch, value):
    import _peft_infosteer_autoload as hook
    from peft_infosteer._env import OFF_VALUES, env_flag

    assert hook.OFF_VALUES == OFF_VALUES
    if value is None:
        monkeypatch.delenv(hook.ENV, raising=False)
    else:
        monkeypatch.setenv(hook.ENV, value)
    assert hook.enabled() is env_flag(hook.ENV)
    assert env_flag(hook.ENV) is (value is None or value.strip().lower() not in ("0", "false", "no", "off"))


def test_the_package_does_not_import_the_hook_module():
    importers = []
    for path in Path(peft_infosteer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Constant) and node.value == "_peft_infosteer_autoload":  # __import__, importlib
                names.append(node.value)
            importers += [path.name for name in names if name.split(".")[0] == "_peft_infosteer_autoload"]
    assert not importers


_STARTUP_FILES = ("peft_infosteer_autoload.pth", "peft_infosteer_autoload.start")
_PROJECT_FILES = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "_build_pth.py")


def _build(project: Path, hook: str) -> Path:
    """Build a wheel of ``project`` with setuptools' PEP 517/660 ``hook``, offline; return it unpacked."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}('dist'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    unpacked = project / f"unpacked-{hook}"
    with zipfile.ZipFile(project / "dist" / result.stdout.split()[-1]) as wheel:
        wheel.extractall(unpacked)
    return unpacked


def test_wheels_ship_the_hook_and_an_editable_install_runs_the_project_file(tmp_path):
    root = TESTS_DIR.parent
    project = tmp_path / "project"
    shutil.copytree(root / "peft_infosteer", project / "peft_infosteer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in (*_PROJECT_FILES, "_peft_infosteer_autoload.py", *_STARTUP_FILES):
        shutil.copy2(root / name, project / name)
    hook = project / "_peft_infosteer_autoload.py"

    wheel = _build(project, "build_wheel")
    assert (wheel / hook.name).read_bytes() == hook.read_bytes()
    kernel = Path("peft_infosteer", "csrc", "elevate_cpu.cpp")  # built on first use, from the installed source
    assert (wheel / kernel).read_bytes() == (project / kernel).read_bytes()
    for name in _STARTUP_FILES:
        assert (wheel / name).read_bytes() == (project / name).read_bytes()

    site_dir = _build(project, "build_editable")
    assert all((site_dir / name).read_bytes() == (project / name).read_bytes() for name in _STARTUP_FILES)
    assert (site_dir / hook.name).read_bytes() != hook.read_bytes()  # a stub, not a copy that would go stale
    # `python -S`: only this site directory's .pth files run (the test interpreter's own installation stays out)
    probe = f"""
        import site, sys
        site.addsitedir({str(site_dir)!r})
        import _peft_infosteer_autoload as hook
        installed = any(type(f).__name__ == "_PeftImportHook" for f in sys.meta_path)
        heavy = [m for m in ("torch", "peft", "peft_infosteer") if m in sys.modules]
        print(hook.__file__, installed, getattr(hook, "EDITED", False), heavy)
    """

    def run(**env: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-S", "-c", textwrap.dedent(probe)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not a folder with the hook module in it
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PEFT_INFOSTEER_AUTOLOAD": "1", **env},
        )
        assert result.returncode == 0 and not result.stderr, result.stderr[-4000:]
        return result.stdout.strip().split(maxsplit=3)

    assert run() == [str(hook), "True", "False", "[]"]
    assert run(PEFT_INFOSTEER_AUTOLOAD="0") == [str(hook), "False", "False", "[]"]
    hook.write_text(hook.read_text(encoding="utf-8") + "\nEDITED = True\n", encoding="utf-8")
    assert run() == [str(hook), "True", "True", "[]"]  # the edit counts at the next start, with no reinstall
