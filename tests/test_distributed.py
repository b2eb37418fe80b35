"""Multi-process training through the existing engines: DDP (``accelerate launch``, gloo), FSDP2, DeepSpeed ZeRO.

Everything runs on CPU in separate processes on a tiny Llama written to disk (see ``tiny_sft.py``):

- DDP: ``examples/sft_infosteer.py`` under ``accelerate launch`` with 2 processes x batch 2 gives the same adapter and
  the same logged flux as 1 process x batch 4; the logged flux covers both ranks even on an epoch's last batch.
- FSDP2: accelerate cannot run FSDP on CPU (it enables FSDP only for accelerator devices), so the engine underneath,
  ``torch.distributed.fsdp.fully_shard``, is driven directly under ``torchrun``: sharded gradients equal the
  single-process ones.
- DeepSpeed (only where ``deepspeed`` is installed; it is not a dependency): ZeRO-3 with gradient checkpointing is
  refused before training, ZeRO-3 without it and ZeRO-2 with it give the plain single-process update.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_sft import write_sft_assets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sft_infosteer.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


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


def _sft_flags(model_dir: Path, data: Path, out: Path, batch: int, entropy_weight: float = 0.5) -> list[str]:
    # SGD with a constant learning rate of 1 and no clipping: the saved adapter is a direct image of the gradients.
    # TRL's default gradient checkpointing (non-reentrant) stays on; bf16 is off because TRL enables it even on CPU.
    return [
        *("--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)),
        *("--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules"),
        *("all-linear", "--entropy_weight", str(entropy_weight), "--intervention", "gain"),
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


_EPOCH_END_SCRIPT = textwrap.dedent(
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
    term = trainer._infosteer_term

    def recording_term(tuner, recorder, *rest):
        flux_sum, count = recorder.totals()
        local.append((float(flux_sum), float(count)))
        return term(tuner, recorder, *rest)

    trainer._infosteer_term = recording_term
    trainer.train()
    rank = dist.get_rank()
    for step, (flux_sum, count) in enumerate(local, start=1):
        print(f"LOCAL rank={{rank}} step={{step}} sum={{flux_sum!r}} count={{count!r}}", flush=True)
    if rank == 0:
        for h in trainer.state.log_history:
            if "infosteer/flux" in h:
                print(f"LOGGED step={{h['step']}} flux={{h['infosteer/flux']!r}}", flush=True)
    # an orderly teardown: left to interpreter exit, a rank of a loaded machine can abort in c10d's threads
    dist.barrier()
    dist.destroy_process_group()
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
    for line in output.splitlines():
        if line.startswith(("LOCAL", "LOGGED")):
            fields = dict(field.split("=", 1) for field in line.split()[1:])
            if line.startswith("LOCAL"):
                stats = (float(fields["sum"]), float(fields["count"]))
                local.setdefault(int(fields["step"]), {})[int(fields["rank"])] = stats
            else:
                logged[int(fields["step"])] = float(fields["flux"])
    assert sorted(logged) == [1, 2] and all(sorted(ranks) == [0, 1] for ranks in local.values()), output[-3000:]
    for step, ranks in local.items():
        expected = sum(s for s, _ in ranks.values()) / sum(c for _, c in ranks.values())
        assert logged[step] == pytest.approx(expected, rel=1e-6), (step, ranks)
        # and either rank alone would have been a different number: the check above can tell them apart
        for flux_sum, count in ranks.values():
            assert abs(flux_sum / count - logged[step]) > 1e-5


_FSDP2_SCRIPT = textwrap.dedent(
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
        config = peft_infosteer.InfoSteerConfig(intervention="gain", entropy_weight=2.0, lora=lora)
        return get_peft_model(tiny_model("llama"), config).train()

    def loss_of(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss + peft_infosteer.infosteer_loss(model)

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
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp2_sharded_gradients_match_single_process(tmp_path):
    script = tmp_path / "fsdp2_check.py"
    script.write_text(_FSDP2_SCRIPT.format(tests=str(Path(__file__).parent)))
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


def test_zero3_refusal_names_deepspeed_and_the_alternatives():
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model

    from peft_infosteer import InfoSteerConfig
    from peft_infosteer.trainer import check_gradient_checkpointing

    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2)))
    # what TRL leaves in the arguments for a PEFT model under ZeRO-3 with gradient checkpointing
    args = SimpleNamespace(
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        deepspeed_plugin=SimpleNamespace(zero_stage=3),
    )
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3.*ZeRO-2 or FSDP.*gradient_checkpointing=False"):
        check_gradient_checkpointing(args, model.base_model)
    args.deepspeed_plugin.zero_stage = 2  # ZeRO-2 keeps the transformers default (non-reentrant)
    args.gradient_checkpointing_kwargs = {}
    check_gradient_checkpointing(args, model.base_model)


_DEEPSPEED_SCRIPT = textwrap.dedent(
    """
    import sys
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer

    model_dir, data, out, stage, gc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "gc"
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data)["train"]

    def train(deepspeed):
        args = SFTConfig(
            output_dir=out, max_steps=1, per_device_train_batch_size=4, optim="sgd", learning_rate=1.0,
            lr_scheduler_type="constant", max_grad_norm=0.0, bf16=False, report_to=[], save_strategy="no", seed=0,
            max_length=48, gradient_checkpointing=gc, dataloader_num_workers=0, deepspeed=deepspeed,
        )
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        trainer = InfoSteerSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
            processing_class=tok, peft_config=InfoSteerConfig(entropy_weight=2.0, intervention="gain", lora=lora),
        )
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        params = [p for p in model.parameters() if p.requires_grad]
        if deepspeed:
            import deepspeed as ds

            with ds.zero.GatheredParameters(params):
                return {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
        return {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}

    zero = {{"zero_optimization": {{"stage": stage}}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}}
    try:
        got = train(zero)
    except ValueError as exc:
        print("REFUSED", exc)
        raise SystemExit(0)
    want = train(None)
    print("MAXDIFF", max((got[k].float() - want[k].float()).abs().max().item() for k in want), len(want))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional; pip install deepspeed)")
@pytest.mark.parametrize(("stage", "checkpointing"), [(3, "gc"), (3, "no-gc"), (2, "gc")])
def test_deepspeed_zero(tmp_path, stage, checkpointing):
    model_dir, data = write_sft_assets(tmp_path)
    script = tmp_path / "deepspeed_check.py"
    script.write_text(_DEEPSPEED_SCRIPT.format())
    # one process: DeepSpeed's CPU accelerator, with the process-group variables it would otherwise get from MPI
    output = _run(
        [sys.executable, str(script), str(model_dir), str(data), str(tmp_path / "out"), str(stage), checkpointing],
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    if stage == 3 and checkpointing == "gc":
        assert "REFUSED" in output and "DeepSpeed ZeRO-3" in output, output[-3000:]
        return
    line = next(line for line in output.splitlines() if line.startswith("MAXDIFF"))
    maxdiff, count = float(line.split()[1]), int(line.split()[2])
    assert count > 0 and maxdiff <= 1e-6
