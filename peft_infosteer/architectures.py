"""Where the FFN output projection lives in each supported ``model_type``.

The input of that projection is the vector of key coefficients ``k``; its weight columns are the memory vectors.
Names are matched the PEFT way: exact module name or a ``.``-separated suffix.
"""

from __future__ import annotations

__all__ = ["FFN_OUTPUT_PROJECTIONS", "MOE_MODEL_TYPES", "default_target_modules"]

FFN_OUTPUT_PROJECTIONS: dict[str, list[str]] = {
    # gated MLPs: k = act(gate(x)) * up(x) enters down_proj
    "llama": ["mlp.down_proj"],
    "mistral": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
    "qwen3": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"],
    "gemma2": ["mlp.down_proj"],
    "gemma3_text": ["mlp.down_proj"],
    "gemma3": ["language_model.layers.*.mlp.down_proj"],
    "phi3": ["mlp.down_proj"],
    "olmo": ["mlp.down_proj"],
    "olmo2": ["mlp.down_proj"],
    "granite": ["mlp.down_proj"],
    "cohere": ["mlp.down_proj"],
    "smollm3": ["mlp.down_proj"],
    "stablelm": ["mlp.down_proj"],
    # classic two-layer MLPs: k = act(fc_in(x)) enters the second projection
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "starcoder2": ["mlp.c_proj"],
    "gpt_neox": ["mlp.dense_4h_to_h"],
    "falcon": ["mlp.dense_4h_to_h"],
    "bloom": ["mlp.dense_4h_to_h"],
    "gptj": ["mlp.fc_out"],
    "opt": ["fc2"],
    "phi": ["mlp.fc2"],
}

# Mixture-of-experts blocks: transformers 5 fuses the experts into 3-D parameters, so there is no per-expert output
# projection module to wrap. Out of scope for now.
MOE_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "dbrx",
        "jamba",
        "granitemoe",
        "phimoe",
        "gpt_oss",
        "llama4",
        "llama4_text",
    }
)


def default_target_modules(model_type: str | None) -> list[str] | str:
    """Return the default ``target_modules`` for ``model_type``, or raise a ``ValueError`` that says what to do.

    >>> default_target_modules("llama")
    ['mlp.down_proj']
    """
    if model_type in FFN_OUTPUT_PROJECTIONS:
        targets = FFN_OUTPUT_PROJECTIONS[model_type]
        if any("*" in t for t in targets):
            # a wildcard entry is a regex over the full module name
            return "|".join(".*" + t.replace(".", r"\.").replace("*", r"\d+") for t in targets)
        return list(targets)
    if model_type in MOE_MODEL_TYPES:
        raise ValueError(
            f"InfoSteer does not support mixture-of-experts FFN blocks yet (model_type={model_type!r}): the experts "
            "are fused parameters, not separate output projections. Pass `target_modules` naming dense FFN output "
            "projections (for example a shared expert's `down_proj`) if your model has them."
        )
    raise ValueError(
        f"InfoSteer has no default FFN output projection for model_type={model_type!r}. Pass "
        "`InfoSteerConfig(target_modules=[...])` with the name of the module whose input is the FFN key vector "
        "(the second linear layer of the MLP, e.g. 'down_proj' or 'fc2'). Mixture-of-experts blocks are not "
        "supported."
    )
