"""``import peft_infosteer`` makes INFOSTEER a real PEFT method, idempotently and in any import order."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
