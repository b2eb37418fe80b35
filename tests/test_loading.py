"""Loading an InfoSteer adapter everywhere adapters load, in fresh interpreters and without ``import peft_infosteer``:
PeftModel, AutoPeftModelForCausalLM, lm-evaluation-harness (through the start-up hook, ``_peft_infosteer_autoload``),
and transformers' own paths (pipeline, ``load_adapter``, ``from_pretrained`` of an adapter directory), which load a
gain-only adapter exactly and refuse a LoRA-stacked one with one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tiny_sft import write_sft_assets
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import peft_infosteer
from peft_infosteer import InfoSteerConfig

IDS = torch.tensor([[5, 17, 33, 3, 42, 8, 60, 64]])


def _python(code: str, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    full_env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + tokenizer on disk, a gain-only and a gain+LoRA adapter for it (both away from identity)."""
    root = tmp_path_factory.mktemp("loading")
    model_dir, _ = write_sft_assets(root)
    adapters = {}
    for name, lora in (("gain", None), ("gain-lora", LoraConfig(r=2, target_modules="all-linear"))):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        model = get_peft_model(
            base, InfoSteerConfig(intervention="gain", init_weights=False, lora=lora, entropy_weight=0.1)
        )
        path = root / name
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
        with torch.no_grad():
            save_file({"logits": model(IDS).logits.contiguous()}, path / "expected.safetensors")
        adapters[name] = path
    return model_dir, adapters


def test_start_up_hook_is_installed_cheap_and_imports_nothing():
    code = "import sys; print(sorted(m for m in ('torch', 'peft', 'peft_infosteer') if m in sys.modules))"
    result = _python(code)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    importtime = _python("pass", PYTHONPROFILEIMPORTTIME="1").stderr
    line = next(line for line in importtime.splitlines() if line.rstrip().endswith("_peft_infosteer_autoload"))
    assert int(line.split("|")[1]) < 5000, line  # cumulative microseconds: well under 5 ms


@pytest.mark.parametrize("enabled", [True, False])
def test_import_peft_registers_the_method(enabled):
    code = "import peft, sys; print(hasattr(peft.PeftType, 'INFOSTEER'), 'peft_infosteer' in sys.modules)"
    result = _python(code, PEFT_INFOSTEER_AUTOLOAD="1" if enabled else "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ([str(enabled)] * 2)


def test_a_broken_plugin_never_breaks_import_peft():
    code = """
        import sys

        class Broken:  # makes `import peft_infosteer` fail, as a broken installation would
            def find_spec(self, name, path=None, target=None):
                if name == "peft_infosteer":
                    raise ImportError("simulated breakage")

        sys.meta_path.insert(0, Broken())
        import peft
        print("imported", hasattr(peft.PeftType, "INFOSTEER"))
    """
    result = _python(code)
    assert result.returncode == 0 and result.stdout.split() == ["imported", "False"], result.stderr
    assert "simulated breakage" in result.stderr and "PEFT_INFOSTEER_AUTOLOAD=0" in result.stderr


_LOAD_WITHOUT_IMPORT = """
    import sys
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir, adapter = sys.argv[1], sys.argv[2]
    ids = torch.tensor([[5, 17, 33, 3, 42, 8, 60, 64]])
    expected = load_file(f"{adapter}/expected.safetensors")["logits"]
    for model in (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter),
        AutoPeftModelForCausalLM.from_pretrained(adapter),
    ):
        assert type(model.base_model).__name__ == "InfoSteerModel"
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    print("OK", "peft_infosteer" in sys.modules)
"""


@pytest.mark.parametrize("kind", ["gain", "gain-lora"])
def test_peft_loaders_in_a_fresh_interpreter_without_the_import(assets, kind):
    model_dir, adapters = assets
    result = _python(_LOAD_WITHOUT_IMPORT, str(model_dir), str(adapters[kind]))
    assert result.returncode == 0 and result.stdout.split() == ["OK", "True"], result.stderr[-3000:]
    # without the hook PEFT cannot reach the plugin: the KeyError the model card explains
    off = _python(_LOAD_WITHOUT_IMPORT, str(model_dir), str(adapters[kind]), PEFT_INFOSTEER_AUTOLOAD="0")
    assert off.returncode != 0 and "KeyError: 'INFOSTEER'" in off.stderr


def _expected(adapter: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(adapter / "expected.safetensors")["logits"]


def test_transformers_paths_load_a_gain_only_adapter_exactly(assets):
    model_dir, adapters = assets
    adapter = adapters["gain"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        base.load_adapter(str(adapter))
        assert torch.equal(base(IDS).logits, _expected(adapter))
        direct = AutoModelForCausalLM.from_pretrained(str(adapter))
        assert torch.equal(direct(IDS).logits, _expected(adapter))
        generator = pipeline("text-generation", model=str(adapter), device="cpu")
        assert torch.equal(generator.model(IDS).logits, _expected(adapter))
        assert isinstance(generator("What is 2 plus 2?", max_new_tokens=3)[0]["generated_text"], str)


def test_transformers_paths_refuse_a_lora_stacked_adapter_naming_the_way(assets):
    model_dir, adapters = assets
    adapter = str(adapters["gain-lora"])
    attempts = (
        lambda: AutoModelForCausalLM.from_pretrained(model_dir).load_adapter(adapter),
        lambda: AutoModelForCausalLM.from_pretrained(adapter),
        lambda: pipeline("text-generation", model=adapter, device="cpu"),
    )
    for attempt in attempts:
        with pytest.raises(ValueError, match=r"PeftModel\.from_pretrained.*AutoPeftModelForCausalLM"):
            attempt()
    # and the way it names works, pipeline included
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(adapter), device="cpu")
    with torch.no_grad():
        assert torch.equal(generator.model(IDS).logits, _expected(Path(adapter)))


_TASK = """
task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{' ' + answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def _continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized the way lm-evaluation-harness's HF backend does it."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole))))


@pytest.mark.slow
def test_lm_evaluation_harness_loads_an_infosteer_adapter_without_the_import(assets, tmp_path):
    model_dir, adapters = assets
    adapter = adapters["gain-lora"]
    docs = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(3)]
    data = tmp_path / "tiny_ll.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_ll.yaml").write_text(_TASK.format(data=data))
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},peft={adapter},dtype=float32",
        "--tasks", "tiny_ll", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4",
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_tiny_ll_*.jsonl") for line in f.open()]
    got = {s["doc"]["question"]: s["resps"][0][0][0] for s in samples}
    assert len(got) == len(docs)
    # what lm-eval computed is the log-likelihood under the full adapter (gain and stacked LoRA) ...
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steered = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for doc in docs:
        want = _continuation_loglik(steered, tokenizer, doc["question"], " " + doc["answer"])
        assert float(got[doc["question"]]) == pytest.approx(want, abs=1e-4)
        # ... which differs from the base model's, so the check above can tell them apart
        assert abs(want - _continuation_loglik(base, tokenizer, doc["question"], " " + doc["answer"])) > 1e-3


def test_model_card_says_how_loading_works(assets):
    _, adapters = assets
    card = (adapters["gain-lora"] / "README.md").read_text()
    assert "pip install peft-infosteer" in card and "KeyError: 'INFOSTEER'" in card
    assert "PeftModel.from_pretrained" in card and "AutoPeftModelForCausalLM" in card
    assert peft_infosteer.__version__ in card
