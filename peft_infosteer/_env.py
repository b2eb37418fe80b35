"""The package's on/off environment switches, read one way.

``PEFT_INFOSTEER_COMPILE`` (:mod:`peft_infosteer.ops`) and ``PEFT_INFOSTEER_NATIVE``
(:mod:`peft_infosteer._native`) are read through :func:`env_flag`. The start-up hook
``_peft_infosteer_autoload`` is a standalone top-level module that must not import this package, so it keeps its own
copy of :data:`OFF_VALUES` for ``PEFT_INFOSTEER_AUTOLOAD``; ``tests/test_registration.py`` checks that both read the
same values the same way. When a switched-on fast path fails and falls back, :func:`fallback_reason` words the
cause the same way in both warnings.
"""

from __future__ import annotations

import os

__all__ = ["OFF_VALUES", "env_flag", "fallback_reason"]

OFF_VALUES: tuple[str, ...] = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = True) -> bool:
    """Whether the switch ``name`` is on: off for ``0``, ``false``, ``no`` or ``off`` (any case, spaces around
    ignored), on for any other value, ``default`` when the variable is unset.

    >>> env_flag("PEFT_INFOSTEER_NEVER_SET_ANYWHERE")
    True
    """
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in OFF_VALUES


def fallback_reason(exc: BaseException) -> str:
    """The one-line cause a fast path's fallback warning names: the exception's type and its message's first line.

    >>> fallback_reason(OSError("ninja not found\\nsee the log"))
    'OSError: ninja not found'
    """
    message = str(exc)
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
