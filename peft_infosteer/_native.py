"""The native CPU kernel of ``elevate`` (``csrc/elevate_cpu.cpp``): built on first use, once per machine.

On CPU, ``elevate``'s forward and backward each run as one pass per row in C++ instead of seven or eight ATen kernels
(docs/benchmarks.md, "The paper's `elevate`"): at one token per call (generation) the kernels' count, not their
arithmetic, is the cost, and in a training step ``topk`` sorts more than the bottom 1% needs. Values are the ATen
path's up to float rounding of the mean, the selection is the same set except among tied keys (where the kernel
takes the lower indices), and gradients are the formula's (tested against both).

The first CPU call builds the kernel with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``; about half a
minute) into torch's extension cache, where later processes find it. ``PEFT_INFOSTEER_NATIVE=0`` (or
:func:`set_native_kernel`) keeps the ATen path. Where the build fails, InfoSteer warns once and uses the ATen path in
this process (same results, slower on CPU). Accelerator tensors always take the ATen path.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from types import ModuleType

from ._env import env_flag, fallback_reason

__all__ = ["native_elevate", "native_kernel_enabled", "native_kernel_failure", "set_native_kernel"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "elevate_cpu.cpp"
_NAME = "peft_infosteer_elevate_cpu"


class _NativeKernel:
    """The process's kernel: whether it is wanted, the loaded module, or why it could not be built."""

    def __init__(self) -> None:
        self.enabled = env_flag("PEFT_INFOSTEER_NATIVE")
        self.module: ModuleType | None = None
        self.failure: str | None = None
        self.lock = threading.Lock()

    def get(self) -> ModuleType | None:
        if not self.enabled:
            return None
        if self.module is None and self.failure is None:
            with self.lock:
                if self.module is None and self.failure is None:
                    self._build()
        return self.module

    def _build(self) -> None:
        try:
            from torch.utils.cpp_extension import load

            logger.info("peft_infosteer: building the native CPU elevate kernel (once per machine)")
            self.module = load(_NAME, [str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
        except Exception as exc:  # no compiler, no ninja, a read-only cache, ...: the ATen path, for good
            self.failure = fallback_reason(exc)
            warnings.warn(
                f"peft_infosteer: the native CPU elevate kernel could not be built ({self.failure}); using the ATen "
                "path in this process (same results, slower on CPU). It needs a C++ compiler and `pip install "
                "ninja`; set PEFT_INFOSTEER_NATIVE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=5,
            )


_KERNEL = _NativeKernel()


def native_elevate() -> ModuleType | None:
    """The built kernel (``elevate_forward``, ``elevate_backward``), or ``None`` when it is off or could not be built.

    >>> set_native_kernel(False); native_elevate() is None
    True
    >>> set_native_kernel(True)
    """
    return _KERNEL.get()


def set_native_kernel(enabled: bool) -> None:
    """Use the native CPU kernel for ``elevate`` (the default, ``PEFT_INFOSTEER_NATIVE``) or the ATen path, in this
    process; enabling it again allows a new build attempt after a failed one."""
    _KERNEL.enabled = bool(enabled)
    _KERNEL.failure = None


def native_kernel_enabled() -> bool:
    """Whether ``elevate`` on CPU is asked to use the native kernel (:func:`set_native_kernel`)."""
    return _KERNEL.enabled


def native_kernel_failure() -> str | None:
    """Why the kernel could not be built in this process, or ``None``."""
    return _KERNEL.failure
