"""Information-flux analysis: per-token, per-layer flux reports, token classes, model comparison, plots.

>>> import peft_infosteer
>>> from peft_infosteer.analysis import compare_reports, measure_flux
>>> # base = measure_flux(model, tokenizer, texts, model_name="base")
>>> # with peft_model.disable_adapter(): ...   # or measure the adapter model as a second report
>>> # print(compare_reports([base, steered]).to_markdown())

The definitions (flux, usage, surprisal, token classes, bootstrap, surprisal control) are in ``docs/analysis.md``.
pandas, pyarrow and matplotlib (the ``viz`` extra) are imported only by the functions that need them.
"""

from __future__ import annotations

from .compare import FluxComparison, class_differences, compare_reports
from .hooks import find_key_modules, read_keys
from .html import flux_html
from .inputs import EncodedText, encode_examples, read_examples
from .measure import measure_flux, surprisal_from_logits
from .memory import Memory, MemoryReadout, MemorySpecificity, memory_readout, memory_specificity, memory_vectors
from .plots import (
    plot_class_differences,
    plot_class_flux,
    plot_flux_vs_surprisal,
    plot_layer_profile,
    plot_token_heatmap,
    save_figure,
)
from .report import FluxReport, TextFlux, load_reports, reports_to_dataframe, save_reports
from .stats import (
    Bootstrap,
    add_surprisal_residuals,
    bootstrap_mean,
    class_summary,
    surprisal_correlation,
    token_table,
)
from .tokens import FUNCTION_WORDS, TOKEN_CLASSES, classify_tokens, token_strings

__all__ = [
    "FUNCTION_WORDS",
    "TOKEN_CLASSES",
    "Bootstrap",
    "EncodedText",
    "FluxComparison",
    "FluxReport",
    "Memory",
    "MemoryReadout",
    "MemorySpecificity",
    "TextFlux",
    "add_surprisal_residuals",
    "bootstrap_mean",
    "class_differences",
    "class_summary",
    "classify_tokens",
    "compare_reports",
    "encode_examples",
    "find_key_modules",
    "flux_html",
    "load_reports",
    "measure_flux",
    "memory_readout",
    "memory_specificity",
    "memory_vectors",
    "plot_class_differences",
    "plot_class_flux",
    "plot_flux_vs_surprisal",
    "plot_layer_profile",
    "plot_token_heatmap",
    "read_examples",
    "read_keys",
    "reports_to_dataframe",
    "save_figure",
    "save_reports",
    "surprisal_correlation",
    "surprisal_from_logits",
    "token_strings",
    "token_table",
]
