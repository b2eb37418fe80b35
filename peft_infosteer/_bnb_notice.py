"""Drop one harmless bitsandbytes notice that would otherwise print on every import on some CPUs."""

from __future__ import annotations

import logging


class _DropBnbKernelNotice(logging.Filter):
    # bitsandbytes logs this on CPUs with AVX512-BF16 when the optional `kernels` package (which downloads its kernel
    # from the Hub at run time) is absent; it then falls back to its bundled CPU code, so the notice is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbKernelNotice())
