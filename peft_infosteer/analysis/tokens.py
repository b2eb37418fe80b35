"""Token strings and token classes (content, function word, number, operator, punctuation, ...).

Classes are assigned to *words*, not to sub-word pieces: consecutive pieces without whitespace between them whose
boundary is alphanumeric on both sides (``"Ġinfo" + "steer"``, or the single digits ``"3" "1" "4"``) form one word,
and every piece of a word gets the word's class. So the ``"the"`` inside ``"theory"`` is not a function word.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FUNCTION_WORDS",
    "TOKEN_CLASSES",
    "classify_tokens",
    "display_token",
    "special_token_ids",
    "token_strings",
]

#: Every class a token can get, in the order plots and tables use.
TOKEN_CLASSES: tuple[str, ...] = (
    "content",
    "function",
    "number",
    "operator",
    "punctuation",
    "whitespace",
    "special",
    "other",
)

#: English function (closed-class) words: the NLTK English stop-word list (pronouns, determiners, prepositions,
#: conjunctions, auxiliaries and the contraction fragments it contains), plus the clitics that BPE tokenizers split
#: off (``'s``, ``'t``, ``n't``, ...) and a few modal verbs and prepositions that list lacks. Fixed here, never
#: downloaded, so results do not change with an NLTK version. Matching is case-insensitive.
FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
    himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
    that that'll these those am is are was were be been being have has had having do does did doing a an the and but
    if or because as until while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just don don't should
    should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
    haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
    weren weren't won won't wouldn wouldn't
    's 't n't 're 've 'll 'd 'm
    would could might must shall may also yet upon among within without via onto toward towards across along
    whether either neither every
    """.split()
)

# characters that make a token an operator: Unicode math symbols (+ = < > | ~ ± × ÷ ...) and the ASCII ones that
# Unicode files under punctuation
_OPERATOR_EXTRA = frozenset("-*/%^")
_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece word-start markers


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/PAD and added special tokens such as ``<|im_start|>``).

    >>> # special_token_ids(tokenizer) -> {0, 1, 2}
    """
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def token_strings(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The surface text of each token, leading spaces included (``" cat"``, not ``"Ġcat"``).

    A byte-level token holding part of a multi-byte character decodes to ``"\\ufffd"``.

    >>> # token_strings(tokenizer, tokenizer("The cat").input_ids) -> ['The', ' cat']
    """
    ids = [int(i) for i in token_ids]
    if not ids:
        return []
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for text, piece in zip(texts, pieces):
        # SentencePiece decoders drop the leading space of a lone "▁word" piece; put it back
        if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        out.append(text)
    return out


def display_token(text: str) -> str:
    """A one-line, visible label for a token: newlines as ``↵``, tabs as ``⇥``, a blank token as ``␣``.

    >>> display_token(" cat"), display_token("\\n"), display_token(" ")
    ('cat', '↵', '␣')
    """
    label = text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥").strip()
    return label if label else "␣"


def _char_kind(ch: str) -> str:
    if ch.isalpha():
        return "alpha"
    if ch.isdigit():
        return "digit"
    if ch.isspace():
        return "space"
    if ch in _OPERATOR_EXTRA or unicodedata.category(ch) == "Sm":
        return "operator"
    category = unicodedata.category(ch)
    if category[0] == "P" or category in ("Sc", "Sk"):
        return "punctuation"
    return "other"


def _strip_markers(text: str) -> str:
    for marker in _SPACE_MARKERS:
        text = text.replace(marker, " ")
    return text


def _is_wordlike(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _word_class(word: str) -> str:
    if word.lower() in FUNCTION_WORDS:
        return "function"
    if any(ch.isdigit() for ch in word) and all(ch.isdigit() or ch in ".,_" for ch in word):
        return "number"
    if any(ch.isalpha() for ch in word):
        return "content"
    return "number" if any(ch.isdigit() for ch in word) else "other"


def _symbol_class(text: str) -> str:
    kinds = {_char_kind(ch) for ch in text if not ch.isspace()}
    if not kinds:
        return "whitespace"
    if kinds == {"operator"}:
        return "operator"
    if kinds <= {"operator", "punctuation"}:
        return "punctuation"
    return "other"


def classify_tokens(tokens: Sequence[str], special: Sequence[bool] | None = None) -> list[str]:
    """Assign each token (its surface text) one of :data:`TOKEN_CLASSES`.

    Rules, in order: ``special`` tokens (chat-template and added special tokens, as flagged by ``special``); tokens of
    only whitespace; pieces of a word (see the module docstring) get the word's class: ``function`` if the word is in
    :data:`FUNCTION_WORDS`, ``number`` if it is digits (with ``.``/``,`` separators), else ``content``; a word that
    starts with an apostrophe (a clitic such as ``'s``) is classified on its own. Tokens without letters or digits are
    ``operator`` (only math symbols and ``- * / % ^``), ``punctuation`` (punctuation, currency and modifier symbols,
    possibly mixed with operators) or ``other`` (emoji, the replacement character of a split multi-byte character).
    A ``-`` between two letters with no space (``well-known``) is punctuation, not an operator.

    >>> classify_tokens(["The", " cat", ",", " and", " 3", "+", "4", "."])
    ['function', 'content', 'punctuation', 'function', 'number', 'operator', 'number', 'punctuation']
    """
    n = len(tokens)
    special = [False] * n if special is None else [bool(s) for s in special]
    if len(special) != n:
        raise ValueError(f"special has {len(special)} entries for {n} tokens")
    texts = [_strip_markers(t) for t in tokens]
    classes = ["other"] * n
    i = 0
    while i < n:
        text = texts[i]
        if special[i]:
            classes[i] = "special"
            i += 1
            continue
        if not text.strip():
            classes[i] = "whitespace"
            i += 1
            continue
        core = text.strip()
        if not _is_wordlike(core):
            cls = _symbol_class(core)
            if cls == "operator" and core == "-" and _hyphen_in_word(texts, special, i):
                cls = "punctuation"
            classes[i] = cls
            i += 1
            continue
        # a word: this piece plus following pieces glued to it (no space, alphanumeric on both sides of the seam)
        j = i + 1
        while j < n and (step := _glue(texts, special, j)):
            j += step
        word = "".join(texts[i:j]).strip()
        cls = _word_class(word)
        for m in range(i, j):
            classes[m] = cls
        i = j
    return classes


def _glue(texts: Sequence[str], special: Sequence[bool], j: int) -> int:
    """How many pieces from ``j`` on continue the word that ends with piece ``j - 1`` (0, 1 or 2)."""
    prev, cur = texts[j - 1], texts[j]
    if special[j] or not prev or not cur or not prev[-1].isalnum():
        return 0
    if cur[0].isalnum():
        return 1
    # a decimal point or thousands separator inside a number: "3" "." "14" is one word
    if cur in (".", ",") and prev[-1].isdigit() and j + 1 < len(texts) and not special[j + 1]:
        return 2 if texts[j + 1][:1].isdigit() else 0
    return 0


def _hyphen_in_word(texts: Sequence[str], special: Sequence[bool], i: int) -> bool:
    if i == 0 or i + 1 >= len(texts) or special[i - 1] or special[i + 1]:
        return False
    if texts[i] != "-":  # a space before or after the hyphen: a minus sign or a dash
        return False
    before, after = texts[i - 1], texts[i + 1]
    return bool(before) and bool(after) and before[-1].isalpha() and after[0].isalpha()
