"""What would InfoSteer cost on a GPU? An estimate from counted bytes and FLOPs (no GPU needed).

The steered layer's extra work (the flux forward and backward, an intervention, the gradient accumulation into the
keys) is elementwise work plus one row reduction over the key coefficients ``k`` of shape ``[tokens, d_ff]``: on a
GPU it is bound by memory traffic, while the FFN's own matmuls are bound by compute. This script counts both on the
CPU, per token and per steered layer, in bf16:

- **Eager** (``PEFT_INFOSTEER_COMPILE=0``: the closed-form autograd functions, every op its own kernel): the bytes
  each aten operator reads and writes, counted with a ``TorchDispatchMode`` (views and allocations move nothing and
  are skipped; an in-place op reads and writes its argument). Run against a baseline that only feeds ``k`` to a
  consumer, so that the difference is what InfoSteer adds, including the accumulation of its gradient into ``k``'s.
- **Compiled**: the bytes of the kernels inductor generates, from its own count (``GraphLowering.count_bytes``,
  logged under ``TORCH_LOGS=inductor_metrics``: every buffer a fused kernel reads or writes, once). Two settings:
  the package default (an eager model, the InfoSteer math compiled as its own graphs; the accumulation of the flux
  gradient into ``k``'s stays an eager add, counted as above) and a whole compiled model (``torch.compile(model)``: the
  accumulation fuses into the backward kernel).
- **The FFN** of each model (gate, up, activation, down; frozen base weights as in LoRA training, gradients for the
  input only): FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` and activation bytes with the same dispatch
  counter, for forward + backward. Weight reads are amortised over ``--tokens-per-step`` tokens.

The times are then bytes / peak bandwidth and FLOPs / peak throughput of the GPU (``--peak-tflops``,
``--bandwidth``; defaults: NVIDIA H100 SXM, 989 TFLOP/s dense bf16, 3.35 TB/s HBM3). Both at peak: real matmuls
reach 50-80% of peak and memory-bound kernels 80-90% of bandwidth, so the real overhead is likely lower than the
ratio printed here. This is an estimate, not a measurement: run ``python -m benchmarks.overhead --device cuda
--dtype bfloat16`` to measure.

    python -m benchmarks.gpu_cost                  # writes results/overhead/gpu-cost-estimate.{json,md}
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.metrics as inductor_metrics  # benchmark only: inductor's byte count, no public API
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

if not __package__:  # run as a file (python benchmarks/gpu_cost.py), not with -m: import this checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_infosteer import ops

RESULTS = Path(__file__).resolve().parent / "results" / "overhead"

# (hidden size, FFN intermediate size, decoder layers), from the models' config.json
MODELS: dict[str, tuple[int, int, int]] = {
    "SmolLM2-135M": (576, 1536, 30),
    "Llama-3-8B": (4096, 14336, 32),
    "Qwen2.5-7B": (3584, 18944, 28),
}
MODES = ("entropy", "gain", "flatten", "gain+entropy")
ROWS = 64  # tokens in the counted tensors; every count below is linear in it


class ByteCounter(TorchDispatchMode):
    """Bytes read and written by every aten operator that runs under it (views and allocations skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if func.is_view or name in {"aten.detach", "aten.empty_like", "aten.empty", "aten.empty_strided"}:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "aten.copy_":  # writes its destination, reads the source
            inputs = inputs[1:]
        self.bytes += sum(t.numel() * t.element_size() for t in inputs + outputs)
        return out


def _steer(mode: str, k: torch.Tensor, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a steered layer does to its keys: the intervention, then the flux of what reaches the projection."""
    if "gain" in mode:
        k = ops.gain_keys(k, gain)
    if mode == "flatten":
        k = ops.flatten_keys(k, 0.1)
    flux = ops.fused_information_flux(k)[0] if "entropy" in mode else None
    return k, flux


def _step(mode: str | None, k: torch.Tensor, gain: torch.Tensor, consumer: torch.Tensor) -> torch.Tensor:
    """Forward + the scalar whose backward is the step: ``k'`` feeds a consumer (the projection's stand-in)."""
    flux = None
    if mode is not None:
        k, flux = _steer(mode, k, gain)
    loss = (k * consumer).sum(dtype=torch.float32)
    return loss - 100.0 * flux.sum() if flux is not None else loss


def _leaves(d_ff: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(ROWS, d_ff, generator=gen).to(torch.bfloat16).requires_grad_()
    gain = torch.ones(d_ff, requires_grad=True)
    consumer = torch.randn(ROWS, d_ff, generator=gen).to(torch.bfloat16)
    return k, gain, consumer


def eager_bytes(mode: str | None, d_ff: int) -> float:
    """Bytes per key coefficient of one training step's InfoSteer work, eager closed-form functions."""
    ops.set_compiled_math(False)
    k, gain, consumer = _leaves(d_ff)
    with ByteCounter() as counter:
        _step(mode, k, gain, consumer).backward()
    return counter.bytes / (ROWS * d_ff)


def _inductor_bytes(fn: Callable[[], Any]) -> int:
    inductor_metrics.reset()
    torch._dynamo.reset()
    ops._PROCESS.functions.clear()  # the package's compiled math, compiled afresh for this count
    fn()
    return int(inductor_metrics.num_bytes_accessed)


def accumulation_bytes(d_ff: int) -> float:
    """Bytes per coefficient of adding the flux gradient to the gradient ``k`` gets from its consumer (bf16)."""
    k, _, consumer = _leaves(d_ff)
    with ByteCounter() as counter:
        torch.add(consumer, k.detach())
    return counter.bytes / (ROWS * d_ff)


def compiled_bytes(mode: str, d_ff: int, whole_model: bool) -> float:
    """Bytes per key coefficient of the kernels inductor generates for one step's InfoSteer work.

    ``whole_model=False`` is the package default: the InfoSteer math compiled as its own graphs inside an eager model,
    so the accumulation of the flux gradient into ``k``'s gradient stays one eager add. ``whole_model=True``
    compiles the whole step (as ``torch.compile(model)`` does), against the same step without InfoSteer.
    """
    ops.set_compiled_math(True)
    if whole_model:
        steered = _inductor_bytes(lambda: torch.compile(_step, dynamic=False)(mode, *_leaves(d_ff)).backward())
        plain = _inductor_bytes(lambda: torch.compile(_step, dynamic=False)(None, *_leaves(d_ff)).backward())
        return (steered - plain) / (ROWS * d_ff)
    kernels = _inductor_bytes(lambda: _step(mode, *_leaves(d_ff)).backward())
    return kernels / (ROWS * d_ff) + (accumulation_bytes(d_ff) if "entropy" in mode else 0.0)


def ffn_cost(hidden: int, d_ff: int, tokens_per_step: int) -> dict[str, float]:
    """FLOPs and bytes per token of one SwiGLU FFN, forward + backward with frozen weights, in bf16."""
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=d_ff)).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(ROWS, hidden, dtype=torch.bfloat16, requires_grad=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
    with FlopCounterMode(display=False) as flops, ByteCounter() as counter:
        mlp(x).float().sum().backward()
    # the counter saw every weight read once in forward and once in backward (frozen: no weight gradient)
    activation_bytes = counter.bytes - 2 * weight_bytes
    return {
        "flops_per_token": flops.get_total_flops() / ROWS,
        "activation_bytes_per_token": activation_bytes / ROWS,
        "weight_bytes_per_token": 2 * weight_bytes / tokens_per_step,
    }


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    peak_flops = args.peak_tflops * 1e12
    bandwidth = args.bandwidth * 1e12
    rows: list[dict[str, Any]] = []
    for model, (hidden, d_ff, layers) in MODELS.items():
        ffn = ffn_cost(hidden, d_ff, args.tokens_per_step)
        ffn_bytes = ffn["activation_bytes_per_token"] + ffn["weight_bytes_per_token"]
        ffn_time = max(ffn["flops_per_token"] / peak_flops, ffn_bytes / bandwidth)
        for mode in MODES:
            row: dict[str, Any] = {"model": model, "hidden": hidden, "d_ff": d_ff, "layers": layers, "mode": mode}
            row.update({f"ffn_{key}": value for key, value in ffn.items()})
            row["ffn_time_per_token_ns"] = ffn_time * 1e9
            for path, per_elem in (
                ("eager", eager_bytes(mode, d_ff) - eager_bytes(None, d_ff)),
                ("compiled_math", compiled_bytes(mode, d_ff, whole_model=False)),
                ("compiled_model", compiled_bytes(mode, d_ff, whole_model=True)),
            ):
                extra_time = per_elem * d_ff / bandwidth
                row[f"{path}_bytes_per_coefficient"] = per_elem
                row[f"{path}_bytes_per_token"] = per_elem * d_ff
                row[f"{path}_overhead_vs_ffn"] = extra_time / ffn_time
            rows.append(row)
            print(
                f"{model:13s} {mode:13s} eager {row['eager_bytes_per_coefficient']:6.1f} B/coef "
                f"({row['eager_overhead_vs_ffn']:6.1%} of FFN time)  compiled math "
                f"{row['compiled_math_bytes_per_coefficient']:5.1f} ({row['compiled_math_overhead_vs_ffn']:6.1%})  "
                f"compiled model {row['compiled_model_bytes_per_coefficient']:5.1f} "
                f"({row['compiled_model_overhead_vs_ffn']:6.1%})",
                flush=True,
            )
    return {
        "kind": "gpu-cost-estimate",
        "assumptions": {
            "gpu": args.gpu,
            "peak_tflops_bf16_dense": args.peak_tflops,
            "bandwidth_tb_s": args.bandwidth,
            "tokens_per_step": args.tokens_per_step,
            "dtype": "bfloat16",
            "ffn_time": "max(FLOPs / peak, bytes / bandwidth), both at peak",
            "infosteer_time": "bytes / bandwidth at peak (elementwise + row reductions: memory bound)",
        },
        "torch": torch.__version__,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    a = result["assumptions"]
    lines = [
        f"Estimate (not a measurement) for {a['gpu']}: {a['peak_tflops_bf16_dense']} TFLOP/s dense bf16, "
        f"{a['bandwidth_tb_s']} TB/s; bf16 keys; {a['tokens_per_step']} tokens per step; torch {result['torch']}.",
        "Bytes are per key coefficient (per token per steered layer: times d_ff); overhead is the extra time "
        "against the FFN's own forward + backward time.",
        "",
        "| model | d / d_ff | mode | eager B/coef | eager overhead | compiled math B/coef | overhead "
        "| compiled model B/coef | overhead |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['hidden']} / {r['d_ff']} | {r['mode']} | {r['eager_bytes_per_coefficient']:.0f} "
            f"| {r['eager_overhead_vs_ffn']:.0%} | {r['compiled_math_bytes_per_coefficient']:.1f} "
            f"| {r['compiled_math_overhead_vs_ffn']:.1%} | {r['compiled_model_bytes_per_coefficient']:.1f} "
            f"| {r['compiled_model_overhead_vs_ffn']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="NVIDIA H100 SXM (assumed peak numbers)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s")
    parser.add_argument("--bandwidth", type=float, default=3.35, help="memory bandwidth, TB/s")
    parser.add_argument("--tokens-per-step", type=int, default=8192, help="tokens that share one read of the weights")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu-cost-estimate")
    args = parser.parse_args(argv)
    torch._logging.set_logs(inductor_metrics=True)  # makes inductor count the bytes of what it generates
    # a cached graph skips the lowering that counts its bytes: compile everything afresh
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    result = estimate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
