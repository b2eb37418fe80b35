"""Model cards for InfoSteer adapters: say how to load them, list their settings, tag them.

PEFT does not ship INFOSTEER, so anyone who downloads an InfoSteer adapter needs ``pip install peft-infosteer``; with
the package installed, its start-up hook registers the method whenever ``peft`` is imported, so PEFT, transformers
and lm-evaluation-harness load the adapter with no import in user code. The card says so. Two places write a
``README.md``:

- ``PeftModel.save_pretrained`` calls ``PeftModel.create_or_update_model_card(save_directory)``;
- ``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) saves, then *overwrites* ``README.md`` with the card
  already on the Hub (or transformers' template), then calls ``self._upload_modified_files(tmp_dir, repo_id, ...)``.

:func:`install_model_card_hooks` wraps those two ``PeftModel`` methods (through
:func:`peft_infosteer._compat.wrap_peft_model_method`). For a model with an InfoSteer adapter the first one adds the
InfoSteer section after PEFT's own card update, and the second one re-applies PEFT's card update and the InfoSteer
section to the README about to be uploaded; for any other model both only call PEFT's own method, so its files are
byte for byte what PEFT writes (tested). ``InfoSteerModel`` installs them when it is built, not ``import
peft_infosteer``: a process that never builds an InfoSteer model keeps PEFT's methods as they are.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ._compat import wrap_peft_model_method

__all__ = ["MODEL_CARD_TAGS", "install_model_card_hooks", "model_card_section", "update_model_card"]

MODEL_CARD_TAGS: tuple[str, ...] = ("peft", "infosteer", "peft-infosteer")
_START = "<!-- peft-infosteer:start -->"
_END = "<!-- peft-infosteer:end -->"
_SECTION_RE = re.compile(re.escape(_START) + r".*?" + re.escape(_END), flags=re.DOTALL)
_PAPER = "https://arxiv.org/abs/2507.05158"


def _infosteer_configs(peft_model: Any) -> dict[str, Any]:
    from .config import InfoSteerConfig

    configs = getattr(peft_model, "peft_config", None) or {}
    return {name: c for name, c in configs.items() if isinstance(c, InfoSteerConfig)}


def _targets(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, str):
        return f"`{value}`"
    names = sorted(value)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if len(short) < len(names):
        # full module names (PEFT resolves "all-linear" to them): show the distinct projections and the count
        return ", ".join(f"`{n}`" for n in short) + f" ({len(names)} modules)"
    return ", ".join(f"`{n}`" for n in names)


_ELEVATE_FIELDS = ("elevate_fraction", "elevate_scale", "elevate_rank", "elevate_at_inference")
_NOT_MERGEABLE = {
    "flatten": "`flatten` is not a linear map",
    "elevate": "`elevate` acts at inference time: `elevate_at_inference` is true",
}


def _settings_rows(name: str, config: Any) -> list[str]:
    rows = [
        ("entropy_weight", config.entropy_weight),
        ("intervention", config.intervention),
        ("usage", config.usage),
    ]
    if config.usage == "softmax":
        rows.append(("usage_temperature", config.usage_temperature))
    if config.intervention == "flatten":
        rows.append(("flatten_strength", config.flatten_strength))
    if config.intervention == "elevate":
        rows += [(name, getattr(config, name)) for name in _ELEVATE_FIELDS]
    rows.append(("target_modules", _targets(config.target_modules)))
    if config.layers_to_transform is not None:
        rows.append(("layers_to_transform", config.layers_to_transform))
    lora = config.lora
    if lora is None:
        rows.append(("lora", "none"))
    else:
        rows += [
            ("lora.r", lora.r),
            ("lora.lora_alpha", lora.lora_alpha),
            ("lora.lora_dropout", lora.lora_dropout),
            ("lora.target_modules", _targets(lora.target_modules)),
            ("lora.use_rslora", lora.use_rslora),
        ]
    rows.append(("mergeable", "yes" if config.is_mergeable else f"no ({_NOT_MERGEABLE[config.intervention]})"))
    lines = [f"Adapter `{name}`:", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {value} |" for key, value in rows]
    return lines


def model_card_section(peft_model: Any, repo_id: str | None = None) -> str:
    """The Markdown section that an InfoSteer adapter's ``README.md`` carries (between two HTML markers).

    >>> # model_card_section(peft_model, "me/my-adapter").splitlines()[1]
    >>> # '## InfoSteer adapter'
    """
    from .version import __version__

    configs = _infosteer_configs(peft_model)
    where = repo_id or "path/to/this/adapter"
    base = getattr(peft_model.get_base_model(), "name_or_path", None) or "the-base-model"
    lines = [
        _START,
        "## InfoSteer adapter",
        "",
        f"This is an **InfoSteer** adapter ([paper]({_PAPER})): it steers how the model uses its FFN key-value "
        "memories, optionally stacked with LoRA, as a PEFT method. PEFT itself does not ship InfoSteer, so loading "
        "this adapter needs the `peft-infosteer` plugin installed:",
        "",
        "```bash",
        "pip install peft-infosteer",
        "```",
        "",
        "With it installed, PEFT knows the method as soon as `peft` is imported (a start-up hook of the package "
        "registers it), so the usual loaders work as they are, lm-evaluation-harness's `peft=` argument included:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
        "",
        "# or, with an explicit base model:",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "```",
        "",
        "Without the package PEFT fails with `KeyError: 'INFOSTEER'`; so it does where the start-up hook cannot run "
        "(`python -S`, `PEFT_INFOSTEER_AUTOLOAD=0`): add `import peft_infosteer` before loading there. "
        + (
            "This adapter stacks LoRA, so load it with `PeftModel` or `AutoPeftModelForCausalLM` as above: "
            "transformers' own adapter loading (`pipeline(model=<this repo>)`, `model.load_adapter`) cannot load the "
            "stacked LoRA and refuses it."
            if any(c.lora is not None for c in configs.values())
            else "transformers' own adapter loading (`pipeline(model=<this repo>)`, `model.load_adapter`) works too."
        ),
        "",
        "### InfoSteer settings",
        "",
    ]
    for name, config in configs.items():
        lines += [*_settings_rows(name, config), ""]
    lines += [f"Written by peft-infosteer {__version__}.", _END]
    return "\n".join(lines)


def update_model_card(
    readme_path: str | os.PathLike, peft_model: Any, repo_id: str | None = None, extra_tags: list[str] | None = None
) -> None:
    """Add (or refresh) the InfoSteer section, tags and ``base_model`` in the model card at ``readme_path``.

    Idempotent: a card that already has the section gets it replaced, never duplicated. Other content is kept;
    ``extra_tags`` are added too.

    >>> # update_model_card("out/README.md", peft_model)
    """
    if not _infosteer_configs(peft_model):
        return
    if os.path.exists(readme_path):
        card = ModelCard.load(os.fspath(readme_path))
    else:
        card = ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    base = getattr(peft_model.get_base_model(), "name_or_path", None)
    tags = list(card.data.tags or [])
    wanted = [*(extra_tags or []), *MODEL_CARD_TAGS]
    if any(c.lora is not None for c in _infosteer_configs(peft_model).values()):
        wanted.append("lora")
    if base:
        card.data.base_model = card.data.base_model or base
        wanted.append(f"base_model:adapter:{base}")
    tags += [t for t in wanted if t not in tags]
    card.data.tags = tags
    section = model_card_section(peft_model, repo_id)
    text = card.text
    if _START in text and _END in text:
        text = _SECTION_RE.sub(lambda _m: section, text, count=1)
    else:
        text = section + "\n\n" + text.lstrip("\n")
    card.text = text
    card.save(readme_path)


def install_model_card_hooks() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` and ``PeftModel._upload_modified_files`` (idempotent).

    Both wrappers do nothing extra unless the model carries an InfoSteer adapter. ``InfoSteerModel`` calls this when
    it is built, so user code never needs to; calling it again changes nothing.
    """

    def wrap_card(original_card):
        @functools.wraps(original_card)
        def create_or_update_model_card(self, output_dir: str):
            original_card(self, output_dir)
            update_model_card(os.path.join(output_dir, "README.md"), self)

        return create_or_update_model_card

    def wrap_upload(original_upload):
        @functools.wraps(original_upload)
        def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
            # push_to_hub has just replaced PEFT's README with the Hub's card: put PEFT's and ours back in, keeping
            # the card's own tags (PEFT's update replaces the tag list)
            if _infosteer_configs(self):
                readme = os.path.join(working_dir, "README.md")
                tags = list(ModelCard.load(readme).data.tags or []) if os.path.exists(readme) else []
                card_update = type(self).create_or_update_model_card
                getattr(card_update, "__wrapped__", card_update)(self, working_dir)  # PEFT's own, without ours
                update_model_card(readme, self, repo_id=repo_id, extra_tags=tags)
            return original_upload(self, working_dir, repo_id, *args, **kwargs)

        return _upload_modified_files

    wrap_peft_model_method("create_or_update_model_card", wrap_card)
    wrap_peft_model_method("_upload_modified_files", wrap_upload)
