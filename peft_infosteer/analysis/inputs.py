"""Turn the inputs of a flux analysis (plain texts or chat examples) into token ids.

A chat example (a list of ``{"role", "content"}`` messages) is rendered with the tokenizer's chat template and then
tokenized the way ``apply_chat_template(tokenize=True)`` does. Tokens that belong to the template's scaffolding
(role headers, separators, the default system prompt) rather than to a message's content are flagged as special, so
that they do not count as words of the conversation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tokens import special_token_ids

__all__ = ["EncodedText", "Example", "encode_examples", "read_examples"]

#: One input: a text, a list of chat messages, or a JSONL record ``{"text": ...}`` / ``{"messages": [...]}``.
Example = str | Sequence[Mapping[str, Any]] | Mapping[str, Any]


@dataclass
class EncodedText:
    """One tokenized input: the text the model sees, its token ids, and which tokens are special/scaffolding."""

    text: str
    token_ids: list[int]
    special: list[bool]


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal-style content parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def _as_messages(example: Example) -> tuple[str | None, list[Mapping[str, Any]] | None]:
    if isinstance(example, str):
        return example, None
    if isinstance(example, Mapping):
        if isinstance(example.get("text"), str):
            return example["text"], None
        if isinstance(example.get("messages"), Sequence) and not isinstance(example.get("messages"), str):
            return None, list(example["messages"])
        raise ValueError(f"an example must have a 'text' string or a 'messages' list, got keys {sorted(example)}")
    if isinstance(example, Sequence) and all(isinstance(m, Mapping) for m in example):
        return None, [m for m in example if isinstance(m, Mapping)]
    raise ValueError(f"an example must be a string, a list of chat messages or a dict, got {type(example).__name__}")


def _content_spans(rendered: str, messages: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for message in messages:
        content = _message_text(message.get("content"))
        for candidate in (content, content.strip()):
            if not candidate:
                continue
            start = rendered.find(candidate, pos)
            if start >= 0:
                spans.append((start, start + len(candidate)))
                pos = start + len(candidate)
                break
    return spans


def _encode_chat(tokenizer: Any, messages: list[Mapping[str, Any]]) -> tuple[str, list[int], list[bool] | None]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat examples need a tokenizer with a chat template; this tokenizer has none")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _content_spans(rendered, messages)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        enc = tokenizer(rendered, add_special_tokens=False)
        return rendered, list(enc["input_ids"]), None
    scaffolding = []
    for start, end in enc["offset_mapping"]:
        inside = any(start < s_end and end > s_start for s_start, s_end in spans) if end > start else False
        scaffolding.append(not inside)
    return rendered, list(enc["input_ids"]), scaffolding


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None) -> list[EncodedText]:
    """Tokenize texts (with the tokenizer's special tokens, e.g. BOS) and chat examples (through the chat template).

    ``max_length`` truncates each input to its first ``max_length`` tokens.

    >>> # encode_examples(tokenizer, ["The cat sat.", [{"role": "user", "content": "Hi"}]])
    """
    if isinstance(examples, (str, Mapping)):
        raise TypeError("examples must be a list of texts or chat examples, not a single one")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    specials = special_token_ids(tokenizer)
    out: list[EncodedText] = []
    for example in examples:
        text, messages = _as_messages(example)
        scaffolding: list[bool] | None = None
        if messages is not None:
            text, ids, scaffolding = _encode_chat(tokenizer, messages)
        else:
            ids = list(tokenizer(text)["input_ids"])
        if max_length is not None:
            ids = ids[:max_length]
            scaffolding = None if scaffolding is None else scaffolding[:max_length]
        if not ids:
            raise ValueError(f"example {len(out)} has no tokens")
        special = [int(i) in specials or bool(scaffolding and scaffolding[n]) for n, i in enumerate(ids)]
        out.append(EncodedText(text=text or "", token_ids=[int(i) for i in ids], special=special))
    return out


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read a JSONL file with one ``{"text": ...}`` or ``{"messages": [...]}`` object per line (blank lines skipped).

    >>> # read_examples("texts.jsonl") -> [{"text": "The cat sat."}, {"messages": [...]}]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file not found: {path}")
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not (
                isinstance(record.get("text"), str) or isinstance(record.get("messages"), list)
            ):
                raise ValueError(f'{path}:{lineno}: expected {{"text": "..."}} or {{"messages": [...]}}')
            examples.append(record)
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples
