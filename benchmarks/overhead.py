"""What does InfoSteer cost? Training-step time and peak memory of LoRA SFT versus LoRA + each InfoSteer mode.

All modes train the same LoRA on the same batches; they are built once and stepped in interleaved order (mode A,
B, C, ... then again, rotating the order each repeat), so that slow phases of a shared machine hit every mode alike.
Ratios are taken per repeat against the LoRA step of the same repeat, then summarised by the median and the
interquartile range.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` over one step (weights, optimizer state and activations).
- CPU: the allocator's live bytes, followed through one step with ``torch.profiler`` (``profile_memory=True`` records
  every allocation and free of PyTorch's CPU allocator); the peak of the step is added to the bytes held before the
  step (parameters, buffers, gradients, optimizer state). This is the CPU analogue of ``max_memory_allocated`` and,
  unlike the process RSS, is per mode even though all modes live in one process. The profiled step is separate from
  the timed ones.

The fused regularizer (closed-form backward, ``peft_infosteer.ops.fused_information_flux``) is compared with the same
formula in plain autograd (``peft_infosteer.ops.information_flux``): inside a full training step (the ``entropy``
mode with the plain-autograd flux swapped in) and on a single layer's key vectors.

    python benchmarks/overhead.py                           # SmolLM2-135M, batch 4 x 512, CPU
    python benchmarks/overhead.py --quick --json out.json   # tiny random model, < 60 s
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --load-in-4bit --name smollm2-cuda
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import common  # first: sets the offline environment before transformers is imported
import numpy as np
import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"

# mode -> InfoSteer settings (None: plain LoRA); "entropy-naive" is "entropy" with the plain-autograd flux
MODES: dict[str, dict[str, Any] | None] = {
    "lora": None,
    "entropy": {"intervention": "none", "entropy_weight": 0.1},
    "gain": {"intervention": "gain", "entropy_weight": 0.0},
    "flatten": {"intervention": "flatten", "flatten_strength": 0.1, "entropy_weight": 0.0},
    "gain+entropy": {"intervention": "gain", "entropy_weight": 0.1},
    "entropy-naive": {"intervention": "none", "entropy_weight": 0.1},
}
TARGETS = {"entropy": {"time": 1.10, "peak_memory": 1.05}, "gain": {"time": 1.05}, "flatten": {"time": 1.05}}


@contextlib.contextmanager
def naive_flux():
    """Swap the fused flux for the plain-autograd reference inside the regularizer (same formula, same mask)."""
    from peft_infosteer import ops, regularizer

    def plain(k: torch.Tensor, usage: str = "abs", temperature: float = 1.0):
        flux = ops.information_flux(k, usage, temperature)
        valid = torch.ones_like(flux, dtype=torch.bool) if usage == "softmax" else k.abs().amax(-1) > 0
        return torch.where(valid, flux, torch.zeros_like(flux)), valid

    original = regularizer.fused_information_flux
    regularizer.fused_information_flux = plain
    try:
        yield
    finally:
        regularizer.fused_information_flux = original


def tiny_model_dir(tmp: Path) -> Path:
    """A tiny random Llama (saved once) for ``--quick``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp / "tiny-llama"
    if not (out / "config.json").is_file():
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=512,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


def build(mode: str, args: argparse.Namespace, model_dir: Path):
    from peft import LoraConfig, get_peft_model

    from peft_infosteer import InfoSteerConfig

    kwargs: dict[str, Any] = {}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=common.DTYPES[args.dtype], bnb_4bit_quant_type="nf4"
        )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if not args.load_in_4bit:
        base = base.to(args.device)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    settings = MODES[mode]
    model = get_peft_model(base, lora if settings is None else InfoSteerConfig(lora=lora, **settings))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return model, optimizer


def make_batches(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random token batches (the cost does not depend on the text); every token is in the loss."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.n_batches):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
        batches.append({"input_ids": ids.to(args.device), "labels": ids.to(args.device)})
    return batches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(mode: str, model, optimizer, batch, args: argparse.Namespace) -> None:
    ctx = naive_flux() if mode == "entropy-naive" else contextlib.nullcontext()
    with ctx, torch.autocast(args.device_type, dtype=common.DTYPES[args.dtype], enabled=args.dtype != "float32"):
        out = model(**batch)
        out.loss.float().backward()  # the regularizer, when on, is already in this backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _static_bytes(model, optimizer) -> int:
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


def cpu_step_peak(fn) -> int:
    """Peak extra bytes held by PyTorch's CPU allocator while ``fn()`` runs (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_memory(mode, model, optimizer, batch, args) -> dict[str, float]:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(mode, model, optimizer, batch, args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "step_extra_bytes": peak - before, "static_bytes": before}
    static = _static_bytes(model, optimizer)
    extra = cpu_step_peak(lambda: step(mode, model, optimizer, batch, args))
    return {"peak_bytes": static + extra, "step_extra_bytes": extra, "static_bytes": static}


def fused_vs_naive_op(args: argparse.Namespace, d_ff: int) -> dict[str, Any]:
    """Forward + backward of the flux of one layer's key vectors: fused closed form vs plain autograd."""
    from peft_infosteer.ops import fused_information_flux, information_flux

    g = torch.Generator().manual_seed(0)
    dtype = common.DTYPES[args.dtype]
    k = torch.randn(args.batch_size * args.seq_len, d_ff, generator=g).to(args.device, dtype).requires_grad_(True)

    def fused():
        flux, _ = fused_information_flux(k)
        flux.mean().backward()
        k.grad = None

    def naive():
        information_flux(k).mean().backward()
        k.grad = None

    fns = {"fused": fused, "naive": naive}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.op_repeats):
        for name, fn in fns.items():
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    mem = {}
    for name, fn in fns.items():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            mem[name] = torch.cuda.max_memory_allocated() - before
        else:
            mem[name] = cpu_step_peak(fn)
    ratios = [f / n for f, n in zip(times["fused"], times["naive"])]
    return {
        "shape": list(k.shape),
        "dtype": args.dtype,
        "time_s": {n: float(np.median(v)) for n, v in times.items()},
        "extra_peak_bytes": mem,
        "time": _summary(ratios)["median"],
        "time_summary": _summary(ratios),
        "peak_memory": mem["fused"] / max(mem["naive"], 1),
    }


def component_costs(args: argparse.Namespace, d_ff: int, n_layers: int, repeats: int = 21) -> dict[str, Any]:
    """Forward + backward time of each InfoSteer piece on one layer's keys, min and median of ``repeats``.

    Short, repeated timings resolve per-layer costs that whole-step timings on a shared machine cannot; multiplied by
    the number of layers they give the expected extra time per step.
    """
    from peft_infosteer.ops import flatten_keys, fused_information_flux, gain_keys

    def plain_flatten(k: torch.Tensor, a: float) -> torch.Tensor:
        mean_abs = k.abs().mean(dim=-1, keepdim=True, dtype=torch.float32).to(k.dtype)
        return k * (1.0 - a) + torch.sign(k) * (a * mean_abs)

    dtype = common.DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(args.batch_size, args.seq_len, d_ff, generator=g).to(args.device, dtype)
    grad = torch.randn(k0.shape, generator=g).to(args.device, dtype)
    gain = torch.ones(d_ff, device=args.device, requires_grad=True)

    def with_backward(f):
        def fn():
            k = k0.clone().requires_grad_(True)
            f(k).backward(grad)

        return fn

    def flux_no_grad():
        with torch.no_grad():
            fused_information_flux(k0)

    def flux_with_grad():
        k = k0.clone().requires_grad_(True)
        fused_information_flux(k)[0].sum().backward()

    pieces = {
        "baseline: clone + identity backward": with_backward(lambda k: k * 1.0),
        "flatten, plain autograd": with_backward(lambda k: plain_flatten(k, 0.1)),
        "flatten, fused backward (ops.flatten_keys)": with_backward(lambda k: flatten_keys(k, 0.1)),
        "gain (ops.gain_keys)": with_backward(lambda k: gain_keys(k, gain)),
        "flux forward without grad (flux logging when entropy_weight=0)": flux_no_grad,
        "flux forward + backward (the regularizer)": flux_with_grad,
    }
    out: dict[str, Any] = {"shape": list(k0.shape), "dtype": args.dtype, "layers": n_layers, "ms_per_layer": {}}
    for name, fn in pieces.items():
        fn()
        times = []
        for _ in range(repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times.append(1e3 * (time.perf_counter() - t0))
        out["ms_per_layer"][name] = {"min": float(min(times)), "median": float(np.median(times))}
    return out


def _summary(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(min(values)), "n": len(values)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a local transformers checkpoint dir")
    p.add_argument("--name", default=None, help="results sub-directory of benchmarks/results (default: model alias)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary JSON here")
    p.add_argument(
        "--modes",
        default="lora,entropy,gain,flatten,entropy-naive",
        help="comma-separated subset of " + ", ".join(MODES),
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=6, help="timed steps per mode (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    p.add_argument("--n-batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--op-repeats", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(common.DTYPES), default="float32", help="autocast dtype")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit base (QLoRA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny random model, few repeats (< 60 s)")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/<name>/")
    p.add_argument(
        "--components-only",
        action="store_true",
        help="only time the per-layer pieces (writes components.json next to results.json)",
    )
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    if "lora" not in args.modes:
        args.modes.insert(0, "lora")
    if args.quick:
        args.batch_size, args.seq_len, args.repeats, args.warmup, args.op_repeats = 2, 64, 5, 1, 5
        args.threads = args.threads or 1  # tiny ops: extra threads only add scheduling noise
    args.device_type = torch.device(args.device).type
    if args.name is None:
        alias = args.model if args.model in common.MODEL_ALIASES else Path(args.model).name
        args.name = "quick" if args.quick else f"{alias}-{args.device_type}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = common.environment_info(args.device).get("load_average")
    if args.quick:
        import tempfile

        model_dir = tiny_model_dir(Path(tempfile.gettempdir()) / "peft-infosteer-overhead")
    else:
        model_dir = common.resolve_model_dir(args.model)
    if args.components_only:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        comp = component_costs(args, config.intermediate_size, config.num_hidden_layers)
        comp["environment"] = common.environment_info(args.device)
        text = json.dumps(comp, indent=1)
        if not args.no_save:
            out = RESULTS_ROOT / "overhead" / args.name
            out.mkdir(parents=True, exist_ok=True)
            (out / "components.json").write_text(text)
        print(text)
        return 0
    print(f"overhead: {model_dir}, modes {args.modes}, batch {args.batch_size} x {args.seq_len}, {args.device}")
    built = {m: build(m, args, model_dir) for m in args.modes}
    vocab = built["lora"][0].get_input_embeddings().weight.shape[0]
    batches = make_batches(args, vocab)
    tokens = args.batch_size * args.seq_len

    for mode, (model, opt) in built.items():
        for i in range(args.warmup):
            step(mode, model, opt, batches[i % len(batches)], args)

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        order = args.modes[r % len(args.modes) :] + args.modes[: r % len(args.modes)]
        batch = batches[r % len(batches)]
        for mode in order:
            model, opt = built[mode]
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(mode, model, opt, batch, args)
            _sync(args.device)
            times[mode].append(time.perf_counter() - t0)
            cpu_times[mode].append(time.process_time() - c0)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in args.modes))

    memory = {m: measure_memory(m, *built[m], batches[0], args) for m in args.modes}
    d_ff = next(
        mod.in_features
        for name, mod in built["lora"][0].named_modules()
        if isinstance(mod, torch.nn.Linear) and name.endswith("down_proj.base_layer")
    )
    del built
    gc.collect()
    op = fused_vs_naive_op(args, d_ff)

    ratios: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for mode in args.modes:
        if mode == "lora":
            continue
        time_ratio = [t / b for t, b in zip(times[mode], times["lora"])]
        cpu_ratio = [t / b for t, b in zip(cpu_times[mode], cpu_times["lora"])]
        ratios[mode] = {
            "time": _summary(time_ratio)["median"],
            "peak_memory": memory[mode]["peak_bytes"] / memory["lora"]["peak_bytes"],
        }
        details[mode] = {
            "time_ratio": _summary(time_ratio),
            "cpu_time_ratio": _summary(cpu_ratio),
            "step_extra_memory_ratio": memory[mode]["step_extra_bytes"] / max(memory["lora"]["step_extra_bytes"], 1),
        }
    fused_vs_naive = None
    if "entropy" in times and "entropy-naive" in times:
        r = [f / n for f, n in zip(times["entropy"], times["entropy-naive"])]
        rc = [f / n for f, n in zip(cpu_times["entropy"], cpu_times["entropy-naive"])]
        fused_vs_naive = {
            "time": _summary(r)["median"],
            "cpu_time_ratio": _summary(rc),
            "peak_memory": memory["entropy"]["peak_bytes"] / memory["entropy-naive"]["peak_bytes"],
            "time_ratio": _summary(r),
            "step_extra_memory_ratio": memory["entropy"]["step_extra_bytes"]
            / max(memory["entropy-naive"]["step_extra_bytes"], 1),
        }
    targets = {
        mode: {k: {"target": v, "measured": ratios[mode][k], "met": ratios[mode][k] <= v} for k, v in t.items()}
        for mode, t in TARGETS.items()
        if mode in ratios
    }
    result = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "ratios": ratios,
        "fused_vs_naive": fused_vs_naive,
        "fused_vs_naive_op": op,
        "ratio_details": details,
        "targets": targets,
        "step_time_s": {m: _summary(v) for m, v in times.items()},
        "step_cpu_time_s": {m: _summary(v) for m, v in cpu_times.items()},
        "tokens_per_s": {m: tokens / float(np.median(v)) for m, v in times.items()},
        "memory_bytes": memory,
        "memory_method": "cuda max_memory_allocated"
        if args.device.startswith("cuda")
        else "static tensor bytes + peak of CPU-allocator live bytes during one step (torch.profiler memory events)",
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "no_save")
        }
        | {"model_dir": str(model_dir), "mode_settings": {m: MODES[m] for m in args.modes}},
        "environment": common.environment_info(args.device) | {"load_average_before": load_before},
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if not args.no_save:
        out = RESULTS_ROOT / "overhead" / args.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text)
        (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# Overhead: {Path(s['model_dir']).name} on {result['device']}",
        "",
        f"Batch {s['batch_size']} x {s['seq_len']} tokens, LoRA r={s['lora_r']} on all linear layers, dtype "
        f"{s['dtype']}{', 4-bit base' if s['load_in_4bit'] else ''}; {s['repeats']} interleaved repeats per mode "
        f"after {s['warmup']} warm-up steps. Load average before/after: {result['environment']['load_average_before']}"
        f" / {result['environment'].get('load_average')} on {result['environment']['cpu_count']} CPUs.",
        "",
        "| mode | step time (median) | time vs LoRA: median [IQR] | CPU time vs LoRA: median [IQR] | peak memory | "
        "memory vs LoRA | step-extra memory vs LoRA | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, st in result["step_time_s"].items():
        mem = result["memory_bytes"][mode]["peak_bytes"] / 2**20
        if mode == "lora":
            lines.append(f"| lora | {st['median']:.3f} s | 1 | 1 | {mem:.0f} MiB | 1 | 1 | |")
            continue
        d = result["ratio_details"][mode]
        t, c = d["time_ratio"], d["cpu_time_ratio"]
        target = result["targets"].get(mode, {})
        tgt = ", ".join(f"{k} <= {v['target']}: {'met' if v['met'] else 'MISSED'}" for k, v in target.items())
        lines.append(
            f"| {mode} | {st['median']:.3f} s | {t['median']:.3f} [{t['q1']:.3f}, {t['q3']:.3f}] | "
            f"{c['median']:.3f} [{c['q1']:.3f}, {c['q3']:.3f}] | {mem:.0f} MiB | "
            f"{result['ratios'][mode]['peak_memory']:.3f} | {d['step_extra_memory_ratio']:.3f} | {tgt} |"
        )
    fv, op = result["fused_vs_naive"], result["fused_vs_naive_op"]
    lines.append("")
    if fv:
        lines.append(
            f"Fused vs plain-autograd regularizer inside the training step (entropy / entropy-naive): time "
            f"{fv['time']:.3f} [IQR {fv['time_ratio']['q1']:.3f}, {fv['time_ratio']['q3']:.3f}], peak memory "
            f"{fv['peak_memory']:.3f}, step-extra memory {fv['step_extra_memory_ratio']:.3f}."
        )
    lines.append(
        f"Fused vs plain autograd on one layer's keys {op['shape']} ({op['dtype']}), forward + backward: time "
        f"{op['time']:.3f} ({1e3 * op['time_s']['fused']:.1f} ms vs {1e3 * op['time_s']['naive']:.1f} ms), extra peak "
        f"memory {op['peak_memory']:.3f} ({op['extra_peak_bytes']['fused'] / 2**20:.1f} MiB vs "
        f"{op['extra_peak_bytes']['naive'] / 2**20:.1f} MiB)."
    )
    lines.append("")
    lines.append(f"Memory: {result['memory_method']}. Wall time {result['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
