r"""What does InfoSteer cost? Training steps, the flux op, generation and elevate's selection, against plain LoRA.

One run measures five things (a sixth on request), each with interleaved repeats (every variant once per repeat, the
order rotated each repeat, so that slow phases of a shared machine hit every variant alike) and ratios taken per
repeat against the baseline of the same repeat, summarised by the median and the interquartile range:

1. **Training step** (forward, backward, AdamW step) of each InfoSteer mode against plain LoRA SFT: the same LoRA
   (r=16 on all linear layers, same initialisation) on the same fixed batches (random token ids, every token in the
   loss). Modes: ``entropy`` (the regularizer alone), ``gain``, ``flatten``, ``elevate`` (interventions alone;
   ``elevate`` is the paper's, at its defaults p = 0.01, alpha = 1), ``gain+entropy``. Twice: **eager** (the model
   as it comes, the InfoSteer math compiled by ``peft_infosteer.ops`` as the package does by default) against eager
   LoRA, and **compiled** (the whole training forward under ``torch.compile(model)``; the backward is compiled with
   it) against compiled LoRA. An eager and a compiled variant of a mode share one model and optimizer.
   ``entropy-closed-form`` is the eager ``entropy`` step with ``ops.set_compiled_math(False)``: the eager
   closed-form functions instead of the compiled math, inside a real step.
2. **The flux op alone** on one layer's keys ``[batch * seq, d_ff]``, forward + backward: the eager closed-form
   function (``_closed_form.FusedFlux``), the same formula in plain autograd (``ops.information_flux``, the
   baseline), the compiled path (``ops.fused_information_flux`` with compiled math) and plain autograd under
   ``torch.compile``.
3. **Generation**: greedy ``generate`` at batch 1 and 4, a fixed prompt length, exactly ``--new-tokens`` new tokens
   (``min_new_tokens`` equal), under ``torch.no_grad()``: plain LoRA (unmerged), InfoSteer ``gain`` + LoRA unmerged
   (``entropy_weight > 0`` in its config: inference must do no flux work, checked on the flux tracker), that
   InfoSteer model merged (``merge_and_unload()``), ``elevate`` + LoRA unmerged (``elevate_at_inference=True``: the
   selection runs on every generated token) and training-only ``elevate`` + LoRA (``elevate_at_inference=False``:
   must add nothing, and generate LoRA's tokens exactly). LoRA weights and gains are randomised first (LoRA B is 0
   and gains are 1 at initialisation), so that merged and unmerged do real work.
4. **Where the compiled step's time goes** (``kernels``, not in the default parts): one compiled training step per
   mode and repeat under ``torch.profiler``, interleaved, its self time summed by kind: matrix products, attention,
   the compiler's fused elementwise kernels, the rest. The modes do the same matrix products and attention, so the
   difference in fused-kernel time is what steering adds, measured without the noise of the matrix products, which
   dominates whole-step ratios on a shared CPU. ``--layers 2`` keeps the first two decoder layers (real weights)
   for a quick per-layer number.
5. **Selecting the bottom p%** (``selection``): on key tensors ``[rows, d_ff]`` (the training step's rows and one
   decode step's), float32 and bfloat16: ``torch.topk(|k|, m, largest=False)`` (what ``elevate``'s ATen path uses,
   the baseline), ``torch.kthvalue`` + a threshold mask, a full ``torch.sort``, and an exact threshold search
   (bisection on the bit patterns of ``|k|``, one counting pass per bit); each selection alone, forward only. Beside
   them the whole ``elevate`` forward + backward (``ops.elevate_keys``: on CPU the native kernel), the same on the
   ATen path (``elevate-aten``), its plain-autograd reference, and the layer it sits in: the LoRA output projection
   ``d_ff -> hidden`` forward + backward, the baseline of the ``elevate`` rows.

Everything (compiles included) is warmed up before timing; warm-up time is reported separately. Graphs compiled
after the warm-up (in the timed and memory steps) are counted; they should be 0.

Peak memory (parts 1, 2 and 5):

- CUDA: ``torch.cuda.max_memory_allocated`` over one step, minus what was allocated before.
- CPU: the allocator's live bytes, followed through one step with ``torch.profiler`` (``profile_memory=True`` records
  every allocation and free of PyTorch's CPU allocator); for a training step the peak is added to the bytes held
  before the step (parameters, buffers, gradients, optimizer state). This is the CPU analogue of
  ``max_memory_allocated`` and, unlike the process RSS, is per variant although all live in one process. The
  profiled step is separate from the timed ones.

    python -m benchmarks.overhead --threads 1               # SmolLM2-135M, batch 4 x 512, CPU
    python -m benchmarks.overhead --quick --json out.json   # tiny random model, < 60 s with a warm compile cache
    python -m benchmarks.overhead --device cuda --dtype bfloat16 --load-in-4bit --name smollm2-cuda-4bit
    python -m benchmarks.overhead --threads 1 --parts kernels --modes gain,gain+entropy --layers 2
    python -m benchmarks.overhead --threads 1 --parts eager,compiled,generation,selection --modes elevate \
        --repeats 10 --name smollm2-cpu-elevate              # issue 19: elevate against LoRA (benchmarks/README.md)
"""

from __future__ import annotations

import os

# inductor's parallel compile workers cost more than they save on a machine with few cores
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import contextlib
import gc
import json
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/overhead.py), not with -m: resolve the relative imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import common  # first of the project imports: sets the offline environment before transformers is imported

# isort: split
import numpy as np
import torch

from .common import interleaved, rotated, sync, warm_up
from .stats import median_iqr, paired_ratios

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
PARTS = ("eager", "compiled", "op", "generation", "selection", "kernels")
DEFAULT_PARTS = PARTS[:5]  # "kernels" profiles compiled steps on request

# mode -> InfoSteer settings (None: plain LoRA)
MODES: dict[str, dict[str, Any] | None] = {
    "lora": None,
    "entropy": {"intervention": "none", "entropy_weight": 0.1},
    "gain": {"intervention": "gain", "entropy_weight": 0.0},
    "flatten": {"intervention": "flatten", "flatten_strength": 0.1, "entropy_weight": 0.0},
    "gain+entropy": {"intervention": "gain", "entropy_weight": 0.1},
    # the paper's intervention at its defaults, spelled out so that the results record them
    "elevate": {"intervention": "elevate", "elevate_fraction": 0.01, "elevate_scale": 1.0, "entropy_weight": 0.0},
}
CLOSED_FORM = "entropy-closed-form"  # the eager entropy step with ops.set_compiled_math(False)
# median ratio to the LoRA step of the same kind; a variant's own entry ("eager/elevate") before its mode's. The
# memory target is the peak-memory ratio.
TIME_TARGETS = {
    "entropy": 1.03,
    "gain+entropy": 1.03,
    "gain": 1.02,
    "flatten": 1.02,
    "eager/elevate": 1.05,
    "compiled/elevate": 1.03,
}
MEMORY_TARGETS = {"entropy": 1.05, "elevate": 1.03}
# generation: InfoSteer + LoRA unmerged against plain LoRA, time per generate call. "infosteer" (gain, regularizer in
# the config) is also merged; the elevate adapters are generated unmerged (elevate_at_inference=True cannot merge).
GENERATION_SETTINGS = {"intervention": "gain", "entropy_weight": 0.1}
GENERATION_ELEVATE = {
    "elevate": {"intervention": "elevate", "elevate_at_inference": True},
    "elevate-training-only": {"intervention": "elevate", "elevate_at_inference": False},
}
GENERATION_TARGETS = {"infosteer": 1.03, "elevate": 1.05, "elevate-training-only": 1.02}
OP_BASELINE = "plain-autograd"
SELECTIONS = ("topk", "kthvalue+mask", "sort", "threshold-search+mask")
SELECTION_BASELINE = SELECTIONS[0]  # what elevate selects with
ELEVATE_BASELINE = "lora-down-proj"  # the layer elevate sits in


# ---- timing -------------------------------------------------------------------------------------------------------
# interleaved repeats and warm-up (common.py), median/IQR of per-repeat ratios (stats.py): shared with the other
# benchmarks


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- memory -------------------------------------------------------------------------------------------------------


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak extra bytes held by PyTorch's CPU allocator while ``fn()`` runs (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def extra_peak_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak bytes allocated by ``fn()`` on top of what was allocated before it."""
    gc.collect()
    if not device.startswith("cuda"):
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state (each storage once)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ---- models -------------------------------------------------------------------------------------------------------


def tiny_model_dir(tmp: Path, layers: int = 2) -> Path:
    """A tiny random Llama (saved once) for ``--quick``; few layers, since compile time grows with the layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp / f"tiny-llama-{layers}-layers"
    if not (out / "config.json").is_file():
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=512,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


def load_base(args: argparse.Namespace, model_dir: Path) -> torch.nn.Module:
    """float32 weights (or a 4-bit base computing in ``--dtype``), the first ``--layers`` decoder layers."""
    return common.load_model(
        model_dir, args.device, load_in_4bit=args.load_in_4bit, compute_dtype=args.dtype, layers=args.layers
    )


def peft_model(settings: dict[str, Any] | None, args: argparse.Namespace, model_dir: Path) -> Any:
    """Plain LoRA (``settings=None``) or InfoSteer with the same LoRA stacked, on a fresh base model."""
    from peft import LoraConfig, get_peft_model

    from peft_infosteer import InfoSteerConfig

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    config = lora if settings is None else InfoSteerConfig(lora=lora, **settings)
    return get_peft_model(load_base(args, model_dir), config)


def ffn_width(model: torch.nn.Module) -> int:
    """``d_ff``: the input width of the first FFN output projection."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith("down_proj.base_layer"):
            return int(module.in_features)
    raise ValueError("no down_proj found: pass a Llama-style model")


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    return torch.autocast(args.device_type, dtype=common.DTYPES[args.dtype], enabled=args.dtype != "float32")


@contextlib.contextmanager
def closed_form_math():
    """The eager closed-form InfoSteer functions instead of the compiled math, for the duration of the block."""
    from peft_infosteer import ops

    before = ops.compiled_math_enabled()
    ops.set_compiled_math(False)
    try:
        yield
    finally:
        ops.set_compiled_math(before)


# ---- part 1: training steps ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One timed kind of training step: a mode, eager or under ``torch.compile(model)``."""

    name: str  # "eager/gain", "compiled/gain", "eager/entropy-closed-form"
    baseline: str  # the LoRA variant of the same kind
    model: Any
    forward: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    closed_form: bool = False


def training_variants(args: argparse.Namespace, model_dir: Path, parts: Sequence[str]) -> dict[str, Variant]:
    """One model + optimizer per mode, shared by its eager and compiled variants (of ``parts``); eager ones first."""
    built = {}
    for mode in args.modes:
        model = peft_model(MODES[mode], args, model_dir).train()
        built[mode] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5))
    variants: dict[str, Variant] = {}
    if "eager" in parts:
        for mode, (model, optimizer) in built.items():
            variants[f"eager/{mode}"] = Variant(f"eager/{mode}", "eager/lora", model, model, optimizer)
            if mode == "entropy":
                name = f"eager/{CLOSED_FORM}"
                variants[name] = Variant(name, "eager/lora", model, model, optimizer, closed_form=True)
    if "compiled" in parts:
        for mode, (model, optimizer) in built.items():
            name = f"compiled/{mode}"
            variants[name] = Variant(name, "compiled/lora", model, torch.compile(model), optimizer)
    return variants


def make_batches(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random token batches (the cost does not depend on the text); every token is in the loss."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.n_batches):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def train_step(variant: Variant, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    math = closed_form_math() if variant.closed_form else contextlib.nullcontext()
    with math, autocast(args):
        out = variant.forward(**batch)
        out.loss.float().backward()  # the regularizer, when on, is already in this backward
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def step_memory(variant: Variant, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, int]:
    static = static_bytes(variant.model, variant.optimizer)
    extra = extra_peak_bytes(lambda: train_step(variant, batch, args), args.device)
    return {"peak_bytes": static + extra, "step_extra_bytes": extra, "static_bytes": static}


def target_checks(ratios: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Met / missed for every variant that has a target (median time ratio, peak-memory ratio)."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in ratios.items():
        mode = name.split("/", 1)[1]
        checks = {}
        if (time_target := TIME_TARGETS.get(name, TIME_TARGETS.get(mode))) is not None:
            checks["time"] = (time_target, r["time"]["median"])
        if mode in MEMORY_TARGETS:
            checks["peak_memory"] = (MEMORY_TARGETS[mode], r["peak_memory"])
        if checks:
            out[name] = {k: {"target": t, "measured": m, "met": m <= t} for k, (t, m) in checks.items()}
    return out


def measure_training(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    variants = training_variants(args, model_dir, args.parts)
    any_model = next(iter(variants.values())).model
    batches = make_batches(args, any_model.get_input_embeddings().weight.shape[0])
    d_ff = ffn_width(any_model)

    def run(variant: Variant) -> Callable[[int], None]:
        return lambda r: train_step(variant, batches[r % len(batches)], args)

    fns = {name: run(v) for name, v in variants.items()}
    warmup = warm_up(fns, args.warmup, args.device)
    graphs = compiled_graphs()
    wall, cpu = interleaved(fns, args.repeats, args.device, label="training")
    memory = {name: step_memory(v, batches[0], args) for name, v in variants.items()}
    graphs_after_warmup = compiled_graphs() - graphs

    baseline = {name: v.baseline for name, v in variants.items()}
    time_ratios, cpu_ratios = paired_ratios(wall, baseline), paired_ratios(cpu, baseline)
    ratios = {
        name: {
            "baseline": baseline[name],
            "time": time_ratios[name],
            "cpu_time": cpu_ratios[name],
            "peak_memory": memory[name]["peak_bytes"] / memory[baseline[name]]["peak_bytes"],
            "step_extra_memory": memory[name]["step_extra_bytes"] / max(memory[baseline[name]]["step_extra_bytes"], 1),
        }
        for name in time_ratios
    }
    result: dict[str, Any] = {
        "d_ff": d_ff,
        "ratios": ratios,
        "targets": target_checks(ratios),
        "step_time_s": {n: median_iqr(v) for n, v in wall.items()},
        "step_cpu_time_s": {n: median_iqr(v) for n, v in cpu.items()},
        "tokens_per_s": {n: args.batch_size * args.seq_len / float(np.median(v)) for n, v in wall.items()},
        "memory_bytes": memory,
        "warmup_s": warmup,
        "graphs_compiled_after_warmup": graphs_after_warmup,
    }
    entropy, closed = "eager/entropy", f"eager/{CLOSED_FORM}"
    if entropy in wall and closed in wall:
        result["compiled_math_vs_closed_form"] = {
            "time": paired_ratios(wall, {entropy: closed})[entropy],
            "cpu_time": paired_ratios(cpu, {entropy: closed})[entropy],
            "peak_memory": memory[entropy]["peak_bytes"] / memory[closed]["peak_bytes"],
            "step_extra_memory": memory[entropy]["step_extra_bytes"] / max(memory[closed]["step_extra_bytes"], 1),
        }
    return result


# ---- part 2: the flux op alone ------------------------------------------------------------------------------------


def flux_op_functions(k: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Forward + backward of the flux of ``k`` (mean over rows), four implementations; each clears ``k.grad``."""
    from peft_infosteer import ops
    from peft_infosteer._closed_form import FusedFlux

    plain_compiled = torch.compile(ops.information_flux, dynamic=True)  # the package compiles its formula so too

    def closed_form() -> None:
        FusedFlux.apply(k, False, 1.0)[0].mean().backward()

    def plain() -> None:
        ops.information_flux(k).mean().backward()

    def compiled_path() -> None:
        ops.fused_information_flux(k)[0].mean().backward()

    def plain_under_compile() -> None:
        plain_compiled(k).mean().backward()

    def clearing(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            k.grad = None

        return run

    fns = {
        "closed-form": closed_form,
        OP_BASELINE: plain,
        "compiled": compiled_path,
        "plain-autograd-compiled": plain_under_compile,
    }
    return {name: clearing(fn) for name, fn in fns.items()}


def measure_op(args: argparse.Namespace, d_ff: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size * args.seq_len, d_ff)
    k = torch.randn(shape, generator=g).to(args.device, common.DTYPES[args.dtype]).requires_grad_(True)
    fns = flux_op_functions(k)
    timed = {name: (lambda r, fn=fn: fn()) for name, fn in fns.items()}
    warmup = warm_up(timed, args.warmup, args.device)
    graphs = compiled_graphs()
    wall, _ = interleaved(timed, args.op_repeats, args.device)
    memory = {name: extra_peak_bytes(fn, args.device) for name, fn in fns.items()}
    graphs_after_warmup = compiled_graphs() - graphs
    time_ratios = paired_ratios(wall, {name: OP_BASELINE for name in fns})
    return {
        "shape": list(shape),
        "dtype": args.dtype,
        "baseline": OP_BASELINE,
        "time_s": {n: median_iqr(v) for n, v in wall.items()},
        "extra_peak_bytes": memory,
        "ratios": {
            n: {"time": time_ratios[n], "peak_memory": memory[n] / max(memory[OP_BASELINE], 1)} for n in time_ratios
        },
        "warmup_s": warmup,
        "graphs_compiled_after_warmup": graphs_after_warmup,
    }


# ---- part 3: generation -------------------------------------------------------------------------------------------


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial LoRA weights and gains (LoRA B starts at 0, gains at 1), the same for the same layer everywhere.

    Each parameter gets its own generator seeded from its name without the InfoSteer wrapping (``base_layer.``), so
    plain LoRA and InfoSteer + LoRA get the same LoRA weights.
    """
    for name, p in model.named_parameters():
        if not any(key in name for key in ("lora_A", "lora_B", "infosteer_gain")):
            continue
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.replace("base_layer.", "").encode()))
        if "infosteer_gain" in name:
            value = torch.empty(p.shape).uniform_(0.5, 1.5, generator=g)
        else:
            value = torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in name else 1.0 / p.shape[-1] ** 0.5)
        with torch.no_grad():
            p.copy_(value.to(p.dtype))


def generation_models(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Plain LoRA, InfoSteer gain + LoRA unmerged, the same InfoSteer adapter merged into the weights, and the
    ``elevate`` adapters (at inference and training-only) + LoRA unmerged."""
    models = {"lora": peft_model(None, args, model_dir), "infosteer": peft_model(GENERATION_SETTINGS, args, model_dir)}
    if not args.load_in_4bit:  # InfoSteer refuses to merge into quantized weights
        merged = peft_model(GENERATION_SETTINGS, args, model_dir)
        randomise_adapters(merged)  # the same weights as the unmerged one: seeded by parameter name
        models["infosteer-merged"] = merged.merge_and_unload()
    models |= {name: peft_model(settings, args, model_dir) for name, settings in GENERATION_ELEVATE.items()}
    for name, model in models.items():
        if name != "infosteer-merged":
            randomise_adapters(model)
    return {name: model.eval() for name, model in models.items()}


def generation_config(model: Any, new_tokens: int) -> Any:
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def generate(model: Any, prompt: torch.Tensor, config: Any, args: argparse.Namespace) -> torch.Tensor:
    with torch.no_grad(), autocast(args):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def measure_generation(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    models = generation_models(args, model_dir)
    config = generation_config(models["lora"], args.new_tokens)
    vocab = models["lora"].get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    prompts = {bs: torch.randint(0, vocab, (bs, args.prompt_len), generator=g).to(args.device) for bs in args.gen_batch}
    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, bs: int) -> Callable[[int], None]:
        def fn(r: int) -> None:
            outputs[f"{bs}/{name}"] = generate(models[name], prompts[bs], config, args)

        return fn

    fns = {f"{bs}/{name}": run(name, bs) for bs in args.gen_batch for name in models}
    warmup = warm_up(fns, 1, args.device)
    wall, _ = interleaved(fns, args.gen_repeats, args.device, label="generation")
    lengths = {out.shape[1] - args.prompt_len for out in outputs.values()}
    if lengths != {args.new_tokens}:
        raise RuntimeError(f"generate produced {lengths} new tokens, expected exactly {args.new_tokens}")
    ratios = paired_ratios(wall, {name: f"{name.split('/')[0]}/lora" for name in fns})
    targets = {
        name: {"time": {"target": t, "measured": ratios[name]["median"], "met": ratios[name]["median"] <= t}}
        for name in ratios
        if (t := GENERATION_TARGETS.get(name.split("/", 1)[1])) is not None
    }
    tracker = models["infosteer"].base_model.flux_tracker
    result: dict[str, Any] = {
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "time_s": {n: median_iqr(v) for n, v in wall.items()},
        "tokens_per_s": {n: int(n.split("/")[0]) * args.new_tokens / float(np.median(v)) for n, v in wall.items()},
        "ratios": {n: {"baseline": f"{n.split('/')[0]}/lora", "time": r} for n, r in ratios.items()},
        "targets": targets,
        "warmup_s": warmup,
        # the unmerged InfoSteer model has entropy_weight > 0: generate() must not have measured any flux
        "flux_measured_during_generate": tracker.last is not None,
    }
    new = {name: out[:, args.prompt_len :] for name, out in outputs.items()}

    def same_tokens(a: str, b: str) -> float:
        """The fraction of generated tokens where models ``a`` and ``b`` agree, the lowest over batch sizes."""
        return float(min((new[f"{bs}/{a}"] == new[f"{bs}/{b}"]).float().mean() for bs in args.gen_batch))

    if "infosteer-merged" in models:
        result["merged_equals_unmerged_tokens"] = same_tokens("infosteer-merged", "infosteer")
    # training-only elevate must leave inference exactly LoRA's; elevate at inference changes tokens (information)
    result["elevate_training_only_equals_lora_tokens"] = same_tokens("elevate-training-only", "lora")
    result["elevate_equals_lora_tokens"] = same_tokens("elevate", "lora")
    return result


# ---- part 5: selecting the bottom p% ------------------------------------------------------------------------------


def threshold_search(a: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m``-th smallest value of each row of the non-negative ``a`` (as the same float), by an exact search.

    Non-negative floats order like their bit patterns as integers, so the threshold is built one bit at a time, high
    to low: a bit stays set while fewer than ``m`` patterns lie below the candidate. One counting pass per bit (15
    for bfloat16 / float16, 31 for float32); nothing is sorted.

    >>> a = torch.tensor([[0.5, 3.0, 0.0, 2.0, 0.25]])
    >>> [threshold_search(a, m).item() for m in (1, 2, 3, 5)]
    [0.0, 0.25, 0.5, 3.0]
    """
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"threshold_search: float32, bfloat16 or float16 keys, got {a.dtype}")
    wide = a.dtype == torch.float32
    bits = a.view(torch.int32) if wide else a.view(torch.int16).to(torch.int32)
    found = torch.zeros((*a.shape[:-1], 1), dtype=torch.int32, device=a.device)
    for bit in reversed(range(31 if wide else 15)):
        candidate = found + (1 << bit)
        below = (bits < candidate).sum(-1, keepdim=True)
        found = torch.where(below < m, candidate, found)
    return found.view(torch.float32) if wide else found.to(torch.int16).view(a.dtype)


def selection_functions(
    k: torch.Tensor, m: int, lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> dict[str, Callable[[], None]]:
    """Bottom-``m`` selections of ``|k|`` (forward only), and forward + backward of ``elevate`` and of the layer."""
    from peft_infosteer import ops
    from peft_infosteer._elevate import elevate_reference
    from peft_infosteer._native import native_kernel_enabled, set_native_kernel

    fraction = m / k.shape[-1]  # elevate_count(fraction, d) == m
    weight, lora_a, lora_b = lora
    grad_k = torch.randn_like(k)
    grad_y = torch.randn(k.shape[0], weight.shape[0], dtype=k.dtype, device=k.device)
    x = k.detach()

    def topk() -> None:
        torch.topk(x.abs(), m, dim=-1, largest=False, sorted=False)

    def kthvalue_mask() -> None:
        a = x.abs()
        _ = a <= torch.kthvalue(a, m, dim=-1, keepdim=True).values  # the mask that replaces the indices

    def full_sort() -> None:
        _ = torch.sort(x.abs(), dim=-1).indices[..., :m]

    def search_mask() -> None:
        a = x.abs()
        _ = a <= threshold_search(a, m)

    def elevate() -> None:
        ops.elevate_keys(k, fraction, 1.0).backward(grad_k)
        k.grad = None

    def elevate_aten() -> None:  # the same, with the ATen kernels the native CPU kernel replaces
        before = native_kernel_enabled()
        set_native_kernel(False)
        try:
            elevate()
        finally:
            set_native_kernel(before)

    def reference() -> None:
        elevate_reference(k, fraction, 1.0).backward(grad_k)
        k.grad = None

    def down_proj() -> None:
        # LoRA on the frozen output projection, as the training step runs it: dL/dk, dL/dA and dL/dB
        y = k @ weight.T + (k @ lora_a.T) @ lora_b.T * 2.0
        y.backward(grad_y)
        k.grad = lora_a.grad = lora_b.grad = None

    selections = dict(zip(SELECTIONS, (topk, kthvalue_mask, full_sort, search_mask)))
    return selections | {
        "elevate": elevate,
        "elevate-aten": elevate_aten,
        "elevate-reference": reference,
        ELEVATE_BASELINE: down_proj,
    }


def repeated(fn: Callable[[], None], calls: int) -> Callable[[int], None]:
    def run(r: int) -> None:
        for _ in range(calls):
            fn()

    return run


def measure_selection(args: argparse.Namespace, d_ff: int, hidden: int) -> dict[str, Any]:
    """Each selection and ``elevate`` on ``[rows, d_ff]`` keys per dtype and row count, interleaved within a group.

    A timed sample repeats a call until it has processed the largest row count's rows (one call for the training
    step's rows, many for a decode step's), so that small calls are not all timer and loop overhead.
    """
    from peft_infosteer._elevate import elevate_count

    m = elevate_count(MODES["elevate"]["elevate_fraction"], d_ff)
    most = max(args.selection_rows)
    g = torch.Generator().manual_seed(0)
    time_s: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, Any]] = {}
    memory: dict[str, int] = {}
    warmup: dict[str, dict[str, float]] = {}
    for dtype in args.selection_dtypes:
        torch_dtype = common.DTYPES[dtype]
        weight = (torch.randn(hidden, d_ff, generator=g) / d_ff**0.5).to(args.device, torch_dtype)
        lora_a = (torch.randn(args.lora_r, d_ff, generator=g) / d_ff**0.5).to(args.device, torch_dtype)
        lora_b = (torch.randn(hidden, args.lora_r, generator=g) * 0.02).to(args.device, torch_dtype)
        lora = (weight, lora_a.requires_grad_(True), lora_b.requires_grad_(True))
        for rows in args.selection_rows:
            k = torch.randn(rows, d_ff, generator=g).to(args.device, torch_dtype).requires_grad_(True)
            fns = selection_functions(k, m, lora)
            calls = max(1, most // rows)
            prefix = f"{dtype}/{rows}/"
            timed = {prefix + n: repeated(fn, calls) for n, fn in fns.items()}
            warmup |= warm_up(timed, args.warmup, args.device)
            wall, _ = interleaved(timed, args.op_repeats, args.device)
            time_s |= {n: median_iqr([t / calls for t in v]) for n, v in wall.items()}
            if rows == most:  # a decode step's keys take next to nothing; profiling costs time
                memory |= {prefix + n: extra_peak_bytes(fn, args.device) for n, fn in fns.items()}
            baseline = {prefix + n: prefix + (SELECTION_BASELINE if n in SELECTIONS else ELEVATE_BASELINE) for n in fns}
            ratios |= {n: {"baseline": baseline[n], "time": r} for n, r in paired_ratios(wall, baseline).items()}
    return {
        "d_ff": d_ff,
        "hidden": hidden,
        "m": m,
        "rows": args.selection_rows,
        "dtypes": args.selection_dtypes,
        "time_s": time_s,
        "ratios": ratios,
        "extra_peak_bytes": memory,
        "warmup_s": warmup,
    }


# ---- part 4: where the compiled step's time goes -------------------------------------------------------------------

KERNEL_KINDS = ("matmul", "attention", "fused", "other")


def kernel_kind(name: str) -> str:
    """The kind of a profiler event: a matrix product, attention, one of the compiler's fused kernels, or other."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if "cpp_fused" in name or "triton_" in name:
        return "fused"
    return "other"


def profiled_self_ms(fn: Callable[[], None], device: str) -> dict[str, float]:
    """Self time of ``fn()`` in milliseconds by :func:`kernel_kind` (device time on CUDA, host time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    out = dict.fromkeys(KERNEL_KINDS, 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        out[kernel_kind(event.key)] += us / 1000.0
    return out


def measure_kernels(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # names each fused CPU kernel in the profile
    variants = training_variants(args, model_dir, parts=["compiled"])
    any_model = next(iter(variants.values())).model
    batches = make_batches(args, any_model.get_input_embeddings().weight.shape[0])
    layers = any_model.config.num_hidden_layers
    fns = {name: (lambda r, v=v: train_step(v, batches[r % len(batches)], args)) for name, v in variants.items()}
    warm_up(fns, args.warmup, args.device)
    graphs = compiled_graphs()
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KERNEL_KINDS} for n in fns}
    names = list(fns)
    for r in range(args.repeats):
        for name in rotated(names, r):
            for kind, ms in profiled_self_ms(lambda name=name, r=r: fns[name](r), args.device).items():
                times[name][kind].append(ms)
        print(f"  kernels repeat {r + 1}/{args.repeats}")
    medians = {n: {k: float(np.median(v)) for k, v in kinds.items()} for n, kinds in times.items()}
    base = medians["compiled/lora"]
    return {
        "layers": layers,
        "self_ms_median": medians,
        "self_ms": times,
        "fused_extra_ms_per_layer": {
            n: (m["fused"] - base["fused"]) / max(layers, 1) for n, m in medians.items() if n != "compiled/lora"
        },
        "graphs_compiled_after_warmup": compiled_graphs() - graphs,
    }


# ---- command line -------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a local transformers checkpoint dir")
    p.add_argument("--name", default=None, help="results sub-directory of benchmarks/results/overhead")
    p.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/overhead/<name>/")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    modes = [m for m in MODES if m != "lora"]
    p.add_argument("--modes", default=",".join(modes), help="modes besides lora, a subset of " + ", ".join(modes))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=6, help="timed training steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compiles happen here)")
    p.add_argument("--n-batches", type=int, default=4, help="distinct training batches, cycled")
    p.add_argument("--op-repeats", type=int, default=20, help="timed forward + backward calls per flux op")
    p.add_argument("--gen-batch", type=_int_list, default=[1, 4], help="generation batch sizes (comma-separated)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (min = max)")
    p.add_argument("--gen-repeats", type=int, default=6, help="timed generate calls per variant and batch size")
    p.add_argument(
        "--selection-rows",
        type=_int_list,
        default=None,
        help="key rows of the selection part (comma-separated; default: batch x seq and the generation batch sizes)",
    )
    p.add_argument(
        "--selection-dtypes", default="float32,bfloat16", help="key dtypes of the selection part (comma-separated)"
    )
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(common.DTYPES), default="float32", help="autocast dtype")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit base (QLoRA); no merged model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (real weights)")
    p.add_argument("--quick", action="store_true", help="tiny random model, few repeats (< 60 s, warm compile cache)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.modes = ["lora"] + [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "lora"]
    for given, allowed, flag in ((args.parts, PARTS, "--parts"), (args.modes, tuple(MODES), "--modes")):
        if unknown := [x for x in given if x not in allowed]:
            p.error(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    if args.quick:
        args.batch_size, args.seq_len, args.repeats, args.warmup, args.n_batches = 2, 64, 3, 2, 2
        args.op_repeats, args.prompt_len, args.new_tokens, args.gen_repeats = 5, 16, 8, 3
        args.threads = args.threads or 1  # tiny ops: extra threads only add scheduling noise
        args.selection_rows = args.selection_rows or [args.batch_size * args.seq_len, 1]
    args.device_type = torch.device(args.device).type
    if args.selection_rows is None:  # the training step's rows, and one decode step's
        args.selection_rows = sorted({args.batch_size * args.seq_len, *args.gen_batch}, reverse=True)
    args.selection_dtypes = [x.strip() for x in args.selection_dtypes.split(",") if x.strip()]
    if unknown := [x for x in args.selection_dtypes if x not in common.DTYPES]:
        p.error(f"--selection-dtypes: unknown {unknown}; choose from {list(common.DTYPES)}")
    if args.name is None:
        args.name = "quick" if args.quick else f"{common.model_alias(args.model)}-{args.device_type}"
    return args


def timed_part(measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one part; add its wall time (warm-up included) and free its models before the next part."""
    t0 = time.perf_counter()
    result = measure(*args)
    gc.collect()
    return result | {"part_wall_time_s": round(time.perf_counter() - t0, 1)}


def settings_record(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "no_save")}
    return record | {
        "model_dir": str(model_dir),
        "mode_settings": {m: MODES[m] for m in args.modes},
        "generation_settings": {"infosteer": GENERATION_SETTINGS} | GENERATION_ELEVATE,
    }


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
    text = json.dumps(result, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if not args.no_save:
        out = RESULTS_ROOT / "overhead" / args.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text)
        (out / "results.md").write_text(markdown(result))


def elevate_kernel_used(device_type: str) -> str:
    """What ran ``elevate``: the native CPU kernel, or the ATen path (and why)."""
    from peft_infosteer._native import native_elevate, native_kernel_failure

    if device_type != "cpu":
        return "aten (accelerator)"
    if native_elevate() is not None:
        return "native CPU kernel"
    return f"aten ({native_kernel_failure() or 'switched off: PEFT_INFOSTEER_NATIVE=0'})"


def main(argv: list[str] | None = None) -> int:
    from peft_infosteer import ops

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops.set_compiled_math(True)  # the package default, whatever PEFT_INFOSTEER_COMPILE says
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one entry per model
    t_start = time.perf_counter()
    load_before = common.environment_info(args.device).get("load_average")
    if args.quick:
        import tempfile

        model_dir = tiny_model_dir(Path(tempfile.gettempdir()) / "peft-infosteer-overhead")
    else:
        model_dir = common.resolve_model_dir(args.model)
    print(f"overhead: {model_dir}, parts {args.parts}, modes {args.modes}, batch {args.batch_size} x {args.seq_len}")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device_type == "cuda" else args.device}
    if "eager" in args.parts or "compiled" in args.parts:
        result["training"] = timed_part(measure_training, args, model_dir)
    if "op" in args.parts:
        from transformers import AutoConfig

        d_ff = result.get("training", {}).get("d_ff") or AutoConfig.from_pretrained(model_dir).intermediate_size
        result["op"] = timed_part(measure_op, args, d_ff)
    if "generation" in args.parts:
        result["generation"] = timed_part(measure_generation, args, model_dir)
    if "selection" in args.parts:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        config = getattr(config, "text_config", config)  # multimodal configs (Gemma-3) nest the decoder's
        result["selection"] = timed_part(measure_selection, args, config.intermediate_size, config.hidden_size)
    if "kernels" in args.parts:
        result["kernels"] = timed_part(measure_kernels, args, model_dir)
    result["compiled_math_stayed_on"] = ops.compiled_math_enabled()  # False: compiling failed, the eager fallback ran
    result["elevate_kernel"] = elevate_kernel_used(args.device_type)
    result["memory_method"] = (
        "cuda max_memory_allocated"
        if args.device_type == "cuda"
        else "static tensor bytes + peak of CPU-allocator live bytes during one step (torch.profiler memory events)"
    )
    result["settings"] = settings_record(args, model_dir)
    result["environment"] = common.environment_info(args.device) | {"load_average_before": load_before}
    result["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    write(result, args)
    print(markdown(result))
    return 0


# ---- report -------------------------------------------------------------------------------------------------------


def _iqr(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _target_text(checks: dict[str, Any] | None) -> str:
    if not checks:
        return ""
    return ", ".join(f"{k} <= {v['target']}: {'met' if v['met'] else '**MISSED**'}" for k, v in checks.items())


def _training_table(training: dict[str, Any], kind: str) -> list[str]:
    names = [n for n in training["step_time_s"] if n.startswith(f"{kind}/")]
    if not names:
        return []
    lines = [
        "| mode | step time (median) | time vs LoRA: median [IQR] | CPU time vs LoRA | peak memory | memory vs LoRA | "
        "step-extra memory vs LoRA | warm-up (first step) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        st, mem, warm = training["step_time_s"][name], training["memory_bytes"][name], training["warmup_s"][name]
        first = f"{warm['total_s']:.1f} s ({warm['first_s']:.1f} s)"
        r = training["ratios"].get(name)
        if r is None:
            lines.append(f"| {name} | {st['median']:.3f} s | 1 | 1 | {_mib(mem['peak_bytes'])} | 1 | 1 | {first} | |")
            continue
        lines.append(
            f"| {name} | {st['median']:.3f} s | {_iqr(r['time'])} | {_iqr(r['cpu_time'])} | {_mib(mem['peak_bytes'])} "
            f"| {r['peak_memory']:.3f} | {r['step_extra_memory']:.3f} | {first} | "
            f"{_target_text(training['targets'].get(name))} |"
        )
    return lines


def _training_section(result: dict[str, Any]) -> list[str]:
    training, s = result["training"], result["settings"]
    lines = [
        "## 1. Training step against plain LoRA SFT",
        "",
        f"Batch {s['batch_size']} x {s['seq_len']} tokens, LoRA r={s['lora_r']} on all linear layers, dtype "
        f"{s['dtype']}{', 4-bit base' if s['load_in_4bit'] else ''}; {s['repeats']} interleaved repeats of every "
        f"variant after {s['warmup']} warm-up steps each; ratios per repeat against the LoRA step of the same kind "
        f"and repeat. Graphs compiled after the warm-up (timed and memory steps; should be 0): "
        f"{training['graphs_compiled_after_warmup']}.",
        "",
    ]
    for kind, title in (
        ("eager", "Eager model (the InfoSteer math compiled by the package, its default)"),
        ("compiled", "Whole training forward under `torch.compile(model)`, against compiled LoRA"),
    ):
        table = _training_table(training, kind)
        if table:
            lines += [f"### {title}", "", *table, ""]
    cf = training.get("compiled_math_vs_closed_form")
    if cf:
        lines += [
            f"Compiled InfoSteer math against the eager closed form inside the step (eager/entropy / "
            f"eager/{CLOSED_FORM}): time {_iqr(cf['time'])}, CPU time {_iqr(cf['cpu_time'])}, peak memory "
            f"{cf['peak_memory']:.3f}, step-extra memory {cf['step_extra_memory']:.3f}.",
            "",
        ]
    return lines


def _op_section(op: dict[str, Any]) -> list[str]:
    lines = [
        f"## 2. The flux op alone: one layer's keys {op['shape']} ({op['dtype']}), forward + backward",
        "",
        "| implementation | time (median) | time vs plain autograd: median [IQR] | extra peak memory | "
        "memory vs plain autograd | warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in op["time_s"].items():
        r = op["ratios"].get(name)
        ratio, mem_ratio = (_iqr(r["time"]), f"{r['peak_memory']:.3f}") if r else ("1", "1")
        lines.append(
            f"| {name} | {1e3 * t['median']:.2f} ms | {ratio} | {_mib(op['extra_peak_bytes'][name])} | {mem_ratio} | "
            f"{op['warmup_s'][name]['total_s']:.1f} s |"
        )
    lines += [
        "",
        "closed-form: `_closed_form.FusedFlux` (eager); plain-autograd: `ops.information_flux`; compiled: "
        "`ops.fused_information_flux` with compiled math; plain-autograd-compiled: `ops.information_flux` under "
        f"`torch.compile(dynamic=True)`. Graphs compiled after the warm-up: "
        f"{op['graphs_compiled_after_warmup']}.",
        "",
    ]
    return lines


def _generation_section(gen: dict[str, Any], repeats: int) -> list[str]:
    lines = [
        f"## 3. Generation: greedy, prompt {gen['prompt_len']} tokens, exactly {gen['new_tokens']} new tokens",
        "",
        f"{repeats} interleaved repeats after one warm-up call each; ratios per repeat against plain LoRA (unmerged) "
        "at the same batch size. LoRA weights and gains randomised; InfoSteer is `gain` with `entropy_weight > 0`; "
        "`elevate` and `elevate-training-only` are the paper's `elevate` with `elevate_at_inference` True / False, "
        "unmerged.",
        "",
        "| batch | model | time per generate (median) | tokens/s | time vs LoRA: median [IQR] | warm-up | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in gen["time_s"].items():
        bs, model = name.split("/", 1)
        r = gen["ratios"].get(name)
        lines.append(
            f"| {bs} | {model} | {t['median']:.3f} s | {gen['tokens_per_s'][name]:.1f} | "
            f"{_iqr(r['time']) if r else '1'} | {gen['warmup_s'][name]['total_s']:.1f} s | "
            f"{_target_text(gen['targets'].get(name))} |"
        )
    lines += ["", f"Flux measured during generate: {'**yes**' if gen['flux_measured_during_generate'] else 'no'}."]
    if "merged_equals_unmerged_tokens" in gen:
        lines[-1] += f" Merged and unmerged generate the same token: {gen['merged_equals_unmerged_tokens']:.1%}."
    if "elevate_training_only_equals_lora_tokens" in gen:
        only = gen["elevate_training_only_equals_lora_tokens"]
        lines[-1] += (
            f" Training-only `elevate` (`elevate_at_inference=False`) generates LoRA's token: {only:.1%}"
            f"{'' if only == 1.0 else ' (**should be 100%**)'}; `elevate` at inference: "
            f"{gen['elevate_equals_lora_tokens']:.1%} (p = 1% of the keys changed in every layer and token)."
        )
    return [*lines, ""]


def _selection_section(sel: dict[str, Any], repeats: int) -> list[str]:
    lines = [
        f"## 5. Selecting the bottom p%: m = {sel['m']} of d_ff = {sel['d_ff']} key coefficients per row",
        "",
        f"{repeats} interleaved repeats per dtype and row count, time per call (a small call repeated to "
        f"{max(sel['rows'])} rows per sample). Selections of `|k|`, forward only, against `topk` (what `elevate` "
        "uses); `elevate` (`ops.elevate_keys`) and its plain-autograd reference forward + backward, against the layer "
        f"it sits in: the LoRA output projection `{sel['d_ff']} -> {sel['hidden']}` forward + backward.",
        "",
        "| dtype | rows | implementation | time (median) | time vs baseline: median [IQR] | baseline | "
        "extra peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in sel["time_s"].items():
        dtype, rows, impl = name.split("/", 2)
        r = sel["ratios"].get(name)
        ratio, base = (_iqr(r["time"]), r["baseline"].split("/", 2)[2]) if r else ("1", "")
        lines.append(
            f"| {dtype} | {rows} | {impl} | {1e3 * t['median']:.3f} ms | {ratio} | {base} | "
            f"{_mib(sel['extra_peak_bytes'][name]) if name in sel['extra_peak_bytes'] else ''} |"
        )
    return [*lines, ""]


def _kernels_section(kernels: dict[str, Any], repeats: int) -> list[str]:
    lines = [
        f"## 4. Where the compiled step's time goes ({kernels['layers']} decoder layers)",
        "",
        f"Self time per training step (ms, median of {repeats} profiled steps per mode, interleaved) by kind. The "
        "modes do the same matrix products and attention; the fused kernels are where steering adds work.",
        "",
        "| mode | " + " | ".join(KERNEL_KINDS) + " | fused extra vs LoRA, per layer |",
        "|---|" + "---|" * (len(KERNEL_KINDS) + 1),
    ]
    for name, medians in kernels["self_ms_median"].items():
        extra = kernels["fused_extra_ms_per_layer"].get(name)
        cells = " | ".join(f"{medians[k]:.1f}" for k in KERNEL_KINDS)
        lines.append(f"| {name} | {cells} | {'' if extra is None else f'{extra:+.2f} ms'} |")
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["environment"]
    lines = [
        f"# Overhead: {Path(s['model_dir']).name} on {result['device']}",
        "",
        f"Load average before/after: {env['load_average_before']} / {env.get('load_average')} on {env['cpu_count']} "
        f"CPUs, {env['torch_threads']} torch threads. Compiled InfoSteer math stayed on: "
        f"{result['compiled_math_stayed_on']}. `elevate` ran on: {result.get('elevate_kernel', 'aten')}.",
        "",
    ]
    if "training" in result:
        lines += _training_section(result)
    if "op" in result:
        lines += _op_section(result["op"])
    if "generation" in result:
        lines += _generation_section(result["generation"], s["gen_repeats"])
    if "selection" in result:
        lines += _selection_section(result["selection"], s["op_repeats"])
    if "kernels" in result:
        lines += _kernels_section(result["kernels"], s["repeats"])
    lines.append(f"Memory: {result['memory_method']}. Wall time {result['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
