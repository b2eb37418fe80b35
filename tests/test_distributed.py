"""Multi-process training through the existing engines: DDP (``accelerate launch``, gloo), FSDP2, DeepSpeed ZeRO.

Everything runs on CPU in separate processes on a tiny Llama written to disk (see ``tiny_sft.py``):

- DDP: ``examples/sft_infosteer.py`` (``InfoSteerSFTTrainer``) and a plain ``trl.SFTTrainer`` under ``accelerate
  launch`` with 2 processes x batch 2 give the same adapter as 1 process x batch 4, and the same logged flux; the
  logged flux covers both ranks even on an epoch's last batch.
- FSDP2: accelerate cannot run FSDP on CPU (it enables FSDP only for accelerator devices), so the engine underneath,
  ``torch.distributed.fsdp.fully_shard``, is driven directly under ``torchrun``: sharded gradients equal the
  single-process ones.
- DeepSpeed (CPU accelerator, gloo, 2 processes; ``scripts/setup.sh`` installs it): ZeRO-2 with non-reentrant and
  ZeRO-3 with reentrant gradient checkpointing (what TRL uses for PEFT under ZeRO-3) give the plain single-process
  update, regularizer included.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import legacy_lambda
from safetensors.torch import load_file
from tiny_sft import write_sft_assets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sft_infosteer.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# the regularizer strengths these comparisons were tuned with before 0.2.0 (0.5 and 2.0 times the mean normalised
# flux), in the paper's lambda on the 2 layers of d_ff 64 of tiny_sft's model: stronger ones amplify the reordered sums
# of the all-reduce beyond the tolerances over two SGD steps at learning rate 1
LAMBDA_DDP = legacy_lambda(0.5, [64, 64])
LAMBDA_ZERO = legacy_lambda(2.0, [64, 64])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 400, **env: str) -> str:
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **env,
    }
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{output[-4000:]}"
    return output


# Every script below ends with this once its results are printed. Under a process group, gloo can abort a rank whose
# peer tears down first, and c10d's threads can abort at interpreter finalization ("terminate called without an active
# exception", seen on a loaded two-core machine after training had finished): so the ranks meet, the group goes, and
# the process ends without finalization. A run without a process group ends normally.
_END_RANK = textwrap.dedent(
    """
    import os as _os
    import sys as _sys


    def end_rank():
        import torch.distributed as _dist

        if not _dist.is_initialized():
            return
        _dist.barrier()
        _dist.destroy_process_group()
        _sys.stdout.flush()
        _sys.stderr.flush()
        _os._exit(0)

    """
)


# the paper's intervention with a visible effect on these tiny layers (d_ff 64: ceil(5%) = 4 keys per token, twice the
# mean)
_ELEVATE_FLAGS = ("--elevate_fraction", "0.05", "--elevate_scale", "2.0")


def _sft_flags(
    model_dir: Path, data: Path, out: Path, batch: int, entropy_weight: float = LAMBDA_DDP, intervention: str = "gain"
) -> list[str]:
    # SGD with a constant learning rate of 1 and no clipping: the saved adapter is a direct image of the gradients.
    # TRL's default gradient checkpointing (non-reentrant) stays on; bf16 is off because TRL enables it even on CPU.
    return [
        *("--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)),
        *("--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules"),
        *("all-linear", "--entropy_weight", str(entropy_weight), "--intervention", intervention),
        *(_ELEVATE_FLAGS if intervention == "elevate" else ()),
        *("--max_steps", "2", "--per_device_train_batch_size", str(batch), "--optim", "sgd", "--learning_rate", "1.0"),
        *("--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--bf16", "False", "--seed", "0"),
        *("--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none"),
        *("--max_length", "48", "--dataloader_num_workers", "0", "--use_cpu", "True"),
    ]


def _run_example_in_process(flags: list[str]) -> None:
    """The single-process reference: the same example script, run in this process (no start-up cost)."""
    spec = importlib.util.spec_from_file_location("sft_infosteer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from peft_infosteer.commands.train import InfoSteerArguments

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, InfoSteerArguments))
    example.main(*parser.parse_args_and_config(args=flags))


def _flux_log(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [h["infosteer/flux"] for h in state["log_history"] if "infosteer/flux" in h]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    model_dir, data = write_sft_assets(tmp_path)
    ddp, single, single_no_reg, rank0_alone = (tmp_path / n for n in ("ddp", "single", "no_reg", "rank0"))

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), str(EXAMPLE)]
    _run(launch + _sft_flags(model_dir, data, ddp, batch=2))
    # each rank saved its RNG state: two processes really trained together
    assert sorted(p.name for p in (ddp / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]

    _run_example_in_process(_sft_flags(model_dir, data, single, batch=4))
    _run_example_in_process(_sft_flags(model_dir, data, single_no_reg, batch=4, entropy_weight=0.0))
    _run_example_in_process(_sft_flags(model_dir, data, rank0_alone, batch=2))

    got = load_file(ddp / "adapter_model.safetensors")
    want = load_file(single / "adapter_model.safetensors")
    no_reg = load_file(single_no_reg / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any("infosteer_gain" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    # the regularizer moves the gains by far more than that tolerance, so the match above tests its DDP scaling
    reg_share = max((want[k] - no_reg[k]).abs().max().item() for k in want if "infosteer_gain" in k)
    assert reg_share > 100 * 1e-6

    # the logged flux is the mean over both ranks' tokens (= the global batch), not rank 0's own
    ddp_flux, single_flux, rank0_flux = _flux_log(ddp), _flux_log(single), _flux_log(rank0_alone)
    assert len(ddp_flux) == 2
    assert ddp_flux == pytest.approx(single_flux, rel=1e-5)
    assert abs(ddp_flux[0] - rank0_flux[0]) > 1e-4


_PLAIN_SFT_SCRIPT = _END_RANK + textwrap.dedent(
    """
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

    from peft_infosteer.commands.train import InfoSteerArguments, build_infosteer_config, load_sft_dataset

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, InfoSteerArguments))
    script_args, training_args, model_args, _, infosteer_args = parser.parse_args_and_config()
    trainer = SFTTrainer(  # TRL's own trainer: nothing from peft_infosteer but the config
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=load_sft_dataset(script_args.dataset_name)["train"],
        peft_config=build_infosteer_config(model_args, infosteer_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    end_rank()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("intervention", ["gain", "elevate"])
def test_ddp_with_a_plain_sft_trainer_matches_one_process(tmp_path, intervention):
    model_dir, data = write_sft_assets(tmp_path)
    script = tmp_path / "plain_sft.py"
    script.write_text(_PLAIN_SFT_SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), str(script)]
    _run(launch + _sft_flags(model_dir, data, tmp_path / "ddp", batch=2, intervention=intervention))
    _run_example_in_process(_sft_flags(model_dir, data, tmp_path / "single", batch=4, intervention=intervention))
    got = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any("lora_B" in k for k in got)
    assert any("infosteer_gain" in k for k in got) == (intervention == "gain")
    saved = json.loads((tmp_path / "ddp" / "adapter_config.json").read_text())
    assert saved["intervention"] == intervention
    if intervention == "elevate":
        assert (saved["elevate_fraction"], saved["elevate_scale"]) == (0.05, 2.0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


_TARGET_SCRIPT = _END_RANK + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    import peft_infosteer
    from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer

    model_dir, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    args = SFTConfig(
        output_dir=out, max_steps=3, per_device_train_batch_size=batch, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, max_length=48, seed=0, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear")
    trainer = InfoSteerSFTTrainer(
        model=model_dir, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=InfoSteerConfig(intervention="gain", flux_target_rise=0.01, entropy_weight=1.0, lora=lora),
    )
    trainer.train()
    target = peft_infosteer.find_infosteer_model(trainer.model).flux_target
    rank = dist.get_rank() if dist.is_initialized() else 0
    line = f"TARGET rank={{rank}} start={{target.flux_start!r}} weight={{target.weight!r}} steps={{target.steps}}"
    print(line, flush=True)
    end_rank()
    """
)


@pytest.mark.slow
def test_ddp_flux_target_is_identical_on_every_rank_and_matches_one_process(tmp_path):
    model_dir, data = write_sft_assets(tmp_path)
    script = tmp_path / "target.py"
    script.write_text(_TARGET_SCRIPT.format())
    results = {}
    for processes, batch in ((2, 2), (1, 4)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_port", str(_free_port()), str(script), str(model_dir), str(data), str(tmp_path / "out")]
        output = _run([*cmd, str(batch)])
        number = r"[-+0-9.eE]+"
        found = re.findall(rf"TARGET rank=(\d+) start=({number}) weight=({number}) steps=(\d+)", output)
        assert len(found) == processes, output[-3000:]
        results[processes] = {int(r): (float(s), float(w), int(n)) for r, s, w, n in found}
    ranks = results[2]
    assert ranks[0] == ranks[1]  # identical on every rank: the step window is summed over ranks
    start, weight, steps = results[1][0]
    assert steps == ranks[0][2] == 3 and weight != 1.0
    assert ranks[0][0] == pytest.approx(start, rel=1e-5) and ranks[0][1] == pytest.approx(weight, rel=1e-4)


_EPOCH_END_SCRIPT = _END_RANK + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer

    model_dir, data, out = sys.argv[1:4]
    args = SFTConfig(
        output_dir=out, num_train_epochs=1, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, max_length=48, seed=0, dataloader_num_workers=0,
    )
    config = InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules="all-linear"))
    trainer = InfoSteerSFTTrainer(
        model=model_dir, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
        processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=config,
    )
    local = []
    tracker = trainer.model.base_model.flux_tracker
    take = tracker.take_window

    def recording_take(mode):
        window = take(mode)
        if mode == "train" and window is not None:
            local.append((float(window[0]), float(window[1])))
        return window

    tracker.take_window = recording_take
    trainer.train()
    rank = dist.get_rank()
    for step, (flux_sum, count) in enumerate(local, start=1):
        print(f"LOCAL rank={{rank}} step={{step}} sum={{flux_sum!r}} count={{count!r}}", flush=True)
    if rank == 0:
        for h in trainer.state.log_history:
            if "infosteer/flux" in h:
                print(f"LOGGED step={{h['step']}} flux={{h['infosteer/flux']!r}}", flush=True)
    end_rank()
    """
)


@pytest.mark.slow
def test_ddp_flux_metric_covers_every_rank_at_the_end_of_an_epoch(tmp_path):
    # 5 examples, 2 processes x batch 2: the last step of the epoch has a remainder of 1 example. accelerate's
    # gather_for_metrics would then keep only rank 0's statistics; the metric must still count both ranks' tokens.
    model_dir, data = write_sft_assets(tmp_path, n_rows=5)
    script = tmp_path / "epoch_end.py"
    script.write_text(_EPOCH_END_SCRIPT.format())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    output = _run([*cmd, str(script), str(model_dir), str(data), str(tmp_path / "out")])
    local: dict[int, dict[int, tuple[float, float]]] = {}  # step -> rank -> (flux sum, token count)
    logged: dict[int, float] = {}
    # the two ranks share stdout and their lines can run together: match records, not lines
    number = r"[-+0-9.eE]+"
    records = re.findall(rf"LOCAL rank=(\d) step=(\d+) sum=({number}) count=({number})", output)
    for rank, step, flux_sum, count in records:
        local.setdefault(int(step), {})[int(rank)] = (float(flux_sum), float(count))
    for step, flux in re.findall(rf"LOGGED step=(\d+) flux=({number})", output):
        logged[int(step)] = float(flux)
    every_rank = all(sorted(ranks) == [0, 1] for ranks in local.values())
    assert sorted(logged) == sorted(local) == [1, 2] and every_rank, output[-3000:]
    for step, ranks in local.items():
        expected = sum(s for s, _ in ranks.values()) / sum(c for _, c in ranks.values())
        assert logged[step] == pytest.approx(expected, rel=1e-6), (step, ranks)
        # and either rank alone would have been a different number: the check above can tell them apart
        for flux_sum, count in ranks.values():
            assert abs(flux_sum / count - logged[step]) > 1e-5


_FSDP2_SCRIPT = _END_RANK + textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model

    import peft_infosteer

    def build():
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        config = peft_infosteer.InfoSteerConfig(intervention="gain", entropy_weight={entropy_weight!r}, lora=lora)
        return get_peft_model(tiny_model("llama"), config).train()

    def loss_of(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss  # the regularizer is in its backward

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(3, 128, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    shards = [slice(2 * r, 2 * r + 2) for r in range(world)]

    reference = build()
    (sum(loss_of(reference, ids[s], labels[s]) for s in shards) / world).backward()
    expected = {{n: p.grad for n, p in reference.named_parameters() if p.requires_grad}}

    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss_of(model, ids[shards[rank]], labels[shards[rank]]).backward()
    diffs, kinds = [], set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            kinds.add(type(param).__name__)
            diffs.append((param.grad.full_tensor() - expected[name]).abs().max().item())
    gain_norm = sum(g.norm().item() for n, g in expected.items() if "infosteer_gain" in n)
    # one write per rank: the two processes share stdout
    print(
        f"RESULT rank={{rank}} params={{len(diffs)}} kinds={{sorted(kinds)}} maxdiff={{max(diffs)}} gain={{gain_norm}}",
        flush=True,
    )
    end_rank()
    """
)


@pytest.mark.slow
def test_fsdp2_sharded_gradients_match_single_process(tmp_path):
    script = tmp_path / "fsdp2_check.py"
    script.write_text(_FSDP2_SCRIPT.format(tests=str(Path(__file__).parent), entropy_weight=LAMBDA_ZERO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    output = _run([*cmd, "--master_port", str(_free_port()), str(script)])
    # match records anywhere: the ranks' lines may still interleave in the captured output
    number = r"[-+0-9.eE]+|nan|inf"
    pattern = rf"RESULT rank=(\d+) params=(\d+) kinds=(\[[^\]]*\]) maxdiff=({number}) gain=({number})"
    results = re.findall(pattern, output)
    assert len(results) == 2, output[-3000:]
    for rank, params, kinds, maxdiff, gain in results:
        values = {"rank": rank, "params": params, "kinds": kinds, "maxdiff": maxdiff, "gain": gain}
        assert values["kinds"] == "['DTensor']"  # the adapter parameters really are sharded
        assert int(values["params"]) > 0
        assert float(values["maxdiff"]) <= 1e-6
        assert float(values["gain"]) > 1e-3  # and there is a regularizer gradient to compare


_DEEPSPEED_SCRIPT = _END_RANK + textwrap.dedent(
    """
    # One rank of a tiny InfoSteer SFT run (plain trl.SFTTrainer) under DeepSpeed ZeRO on CPU, or the plain reference.
    # python script.py MODEL_DIR DATA OUT STAGE GC   (STAGE 0: no DeepSpeed; GC: none | reentrant | non-reentrant)
    import importlib, json, os, sys

    model_dir, data, out, stage, gc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peft_infosteer import InfoSteerConfig

    ds_config = None
    if stage:
        # deepspeed.comm compiles a shared-memory all-reduce at start-up that only inference uses (about a minute on
        # two cores); training goes through gloo
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # without a GPU, transformers builds accelerate's state with no backend and sees one process where DeepSpeed
        # sees two; a state built first with gloo (reused through use_configured_state) gives both the real size
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        zero = {{"stage": stage}}
        if stage == 3:
            zero["stage3_param_persistence_threshold"] = 0  # else the tiny parameters stay whole on every rank
        ds_config = {{
            "zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {{"enabled": "auto"}},
        }}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = SFTConfig(
        output_dir=out, max_steps=2, per_device_train_batch_size=4 // world, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, bf16=False, report_to=[], save_strategy="no", seed=0,
        logging_steps=1, max_length=48, dataloader_num_workers=0, gradient_checkpointing=gc != "none",
        # transformers 5 reads activation_checkpointing_kwargs; TRL forces use_reentrant=True for PEFT under ZeRO-3
        # only on a dict that was passed in, so pass the mode explicitly
        gradient_checkpointing_kwargs={{"use_reentrant": gc == "reentrant"}} if gc != "none" else None,
        deepspeed=ds_config, accelerator_config={{"use_configured_state": True}} if stage else None,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    intervention = os.environ["INTERVENTION"]
    steering = {{"intervention": intervention}}
    if intervention == "elevate":
        steering.update(elevate_fraction=0.05, elevate_scale=2.0)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
        train_dataset=load_dataset("json", data_files=data)["train"],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=InfoSteerConfig(entropy_weight=float(os.environ["ENTROPY_WEIGHT"]), lora=lora, **steering),
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    info = {{
        "world": args.world_size,
        "engine": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "reentrant": sorted({{str(m._gradient_checkpointing_func.keywords.get("use_reentrant"))
                             for m in model.modules() if getattr(m, "gradient_checkpointing", False)}}),
    }}
    if stage == 3:
        import deepspeed

        first = next(p for n, p in params if ("infosteer_gain" if intervention == "gain" else "lora_B") in n)
        info["partitioned"] = [first.numel(), first.ds_numel, first.ds_tensor.numel()]
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            weights = {{n: p.detach().clone() for n, p in params}}
    else:
        weights = {{n: p.detach().clone() for n, p in params}}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(f"RESULT {{json.dumps(info)}}", flush=True)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(weights, os.path.join(out, "adapter.safetensors"))
    end_rank()
    """
)


def _deepspeed_run(
    tmp_path, model_dir, data, name, stage, gc, entropy_weight=LAMBDA_ZERO, processes=1, intervention="gain"
):
    script = tmp_path / "deepspeed_check.py"
    script.write_text(_DEEPSPEED_SCRIPT.format())
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    output = _run(
        [*cmd, str(script), str(model_dir), str(data), str(out), str(stage), gc],
        ENTROPY_WEIGHT=str(entropy_weight),
        INTERVENTION=intervention,
    )
    # the ranks share stdout: records may run together on one line, so find them anywhere (they hold no nested dict)
    results = [json.loads(record) for record in re.findall(r"RESULT (\{[^{}]*\})", output)]
    assert len(results) == processes, output[-3000:]
    return results, load_file(out / "adapter.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed; scripts/setup.sh installs it")
@pytest.mark.parametrize(
    ("stage", "checkpointing", "intervention"),
    [
        (2, "non-reentrant", "gain"),
        (3, "reentrant", "gain"),
        (2, "non-reentrant", "elevate"),
        (3, "reentrant", "elevate"),
    ],
)
def test_deepspeed_zero_two_processes_match_one_plain_process(tmp_path, stage, checkpointing, intervention):
    """ZeRO-3 + reentrant checkpointing is what TRL uses for PEFT under ZeRO-3: the regularizer must train there, and
    the paper's elevate (with the stacked LoRA it trains) too."""
    model_dir, data = write_sft_assets(tmp_path)
    run = functools.partial(_deepspeed_run, tmp_path, model_dir, data, intervention=intervention)
    (reference,), want = run("reference", 0, "none")
    if intervention == "gain":  # the regularizer's share in the gains (elevate's LoRA-only run skips this: runtime)
        _, no_reg = run("no-reg", 0, "none", entropy_weight=0.0)
    results, got = run("zero", stage, checkpointing, processes=2)
    assert all(r["world"] == 2 and r["engine"] == "DeepSpeedEngine" for r in results)
    assert results[0]["reentrant"] == [str(checkpointing == "reentrant")]
    assert results[0]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    if stage == 3:  # really partitioned: the gain is empty outside a gather, half of it on each rank
        numel, ds_numel, local = results[0]["partitioned"]
        assert numel == 0 and local == ds_numel // 2
    assert sorted(got) == sorted(want) and any("lora_B" in k for k in got)
    assert any("infosteer_gain" in k for k in got) == (intervention == "gain")
    # two steps of SGD at learning rate 1 amplify the reordered sums of the all-reduce: a few 1e-6 remain
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    if intervention == "gain":
        # the regularizer moves the gains by far more than that tolerance, so the match above tests it
        share = max((want[k] - no_reg[k]).abs().max().item() for k in want if "infosteer_gain" in k)
        assert share > 100 * 1e-5, share
