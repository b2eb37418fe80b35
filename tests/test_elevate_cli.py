"""``peft-infosteer train`` flags of the paper's intervention: parsed into the config, validated before anything loads,
and an end-to-end run with ``--intervention elevate`` that writes them to ``adapter_config.json``."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_model_with_tokenizer

from peft_infosteer import cli
from peft_infosteer.commands.train import build_infosteer_config, make_parser


def _config(*flags: str):
    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu", "--bf16", "False", *flags]
    parsed = make_parser().parse_args_and_config(args=argv)
    _, _, model_args, _, infosteer_args = parsed
    return build_infosteer_config(model_args, infosteer_args)


def test_defaults_are_the_papers():
    config = _config()
    assert (config.intervention, config.elevate_fraction, config.elevate_scale) == ("elevate", 0.01, 1.0)
    assert (config.elevate_rank, config.elevate_at_inference, config.entropy_weight) == ("magnitude", True, 0.0)


def test_elevate_flags_reach_the_config():
    config = _config(
        "--intervention", "elevate", "--elevate_fraction", "0.02", "--elevate_scale", "5",
        "--elevate_rank", "value", "--elevate_at_inference", "False", "--entropy_weight", "0.05",
    )  # fmt: skip
    assert (config.intervention, config.elevate_fraction, config.elevate_scale) == ("elevate", 0.02, 5.0)
    assert (config.elevate_rank, config.elevate_at_inference, config.entropy_weight) == ("value", False, 0.05)
    assert config.is_mergeable


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (("--elevate_fraction", "0"), "elevate_fraction"),
        (("--elevate_fraction", "1.5"), "elevate_fraction"),
        (("--elevate_scale", "-1"), "elevate_scale"),
        (("--elevate_scale", "nan"), "elevate_scale"),
        (("--elevate_scale", "inf"), "elevate_scale"),
        (("--elevate_rank", "abs"), "elevate_rank"),
        (("--intervention", "gain", "--elevate_scale", "2"), "elevate_scale"),
        (("--intervention", "flatten", "--elevate_fraction", "0.05"), "elevate_fraction"),
    ],
)
def test_bad_flags_raise_naming_the_field(flags, field):
    with pytest.raises(ValueError, match=field):
        _config(*flags)


def test_bad_flag_is_a_one_line_error_before_loading_anything(tmp_path, capsys):
    # the model directory does not exist: the flags are checked first, so the error names the flag
    code = cli.main(
        [
            "train", "--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", str(tmp_path / "none.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--intervention", "gain", "--elevate_scale", "2",
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "elevate_scale" in err and "Traceback" not in err


def _jsonl(path, n=8):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.slow
def test_train_with_elevate_end_to_end_then_merge(tmp_path, capsys):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "base")
    out = tmp_path / "adapter"
    code = cli.main(
        [
            "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(_jsonl(tmp_path / "d.jsonl")),
            "--output_dir", str(out), "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear",
            "--intervention", "elevate", "--elevate_fraction", "0.05", "--elevate_scale", "2.0",
            "--elevate_at_inference", "False", "--entropy_weight", "0.01",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
            "--bf16", "False", "--max_length", "48", "--logging_steps", "1", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["intervention"] == "elevate" and saved["lora"]["r"] == 4
    assert (saved["elevate_fraction"], saved["elevate_scale"], saved["elevate_at_inference"]) == (0.05, 2.0, False)
    assert saved["entropy_weight"] == 0.01
    # training-only elevate merges
    assert cli.main(["merge", "--adapter", str(out), "--base", str(model_dir), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    # one acting at inference cannot: a one-line error naming the field
    saved["elevate_at_inference"] = True
    (out / "adapter_config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert cli.main(["merge", "--adapter", str(out), "--base", str(model_dir), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "elevate_at_inference" in err and "Traceback" not in err and not (tmp_path / "m2").exists()
