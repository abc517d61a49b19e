"""The command line's names for inputs and dictionaries, also used in config files:
``PATH[:FORMAT[:SRC-TGT]]`` for an input, ``[[SRC-]TGT=]PATH`` for a dictionary and ``[SRC-]TGT=PATH``
for a code-switch dictionary. A malformed spec is an :class:`~mlctl.data.skips.InputError` saying
which form was expected.
"""

from __future__ import annotations

import re

from mlctl.config import PrepareInput
from mlctl.data.readers import FORMATS
from mlctl.data.skips import InputError

_LANG_PAIR = re.compile(r"^([A-Za-z][\w]*)-([A-Za-z][\w]*)$")
_LANG = re.compile(r"^[A-Za-z]\w*$")


def parse_input_spec(spec: str, src_lang: str = "", tgt_lang: str = "") -> PrepareInput:
    """``PATH``, ``PATH:FORMAT`` or ``PATH:FORMAT:SRC-TGT`` (FORMAT may be empty: ``PATH::en-de``)."""
    parts = spec.split(":")
    if len(parts) >= 3 and parts[-2] in (*FORMATS, "") and _LANG_PAIR.match(parts[-1]):
        src, tgt = _LANG_PAIR.match(parts[-1]).groups()  # type: ignore[union-attr]
        return PrepareInput(":".join(parts[:-2]), parts[-2], src, tgt)
    if len(parts) >= 2 and parts[-1] in FORMATS:
        return PrepareInput(":".join(parts[:-1]), parts[-1], src_lang, tgt_lang)
    return PrepareInput(spec, "", src_lang, tgt_lang)


def _lang_spec(kind: str, spec: str, head: str, tail: str, form: str) -> tuple[str, str]:
    """``(src or '', tgt)`` of a ``[SRC-]TGT=PATH`` spec split at its '='; a message naming the spec
    and ``form`` for each way it can be malformed."""
    if not head:
        raise InputError(f"{kind} {spec!r} names no language before '=': expected {form}")
    if not tail:
        raise InputError(f"{kind} {spec!r} names no file after '=': expected {form}")
    m = _LANG_PAIR.match(head)
    if m:
        return m.group(1), m.group(2)
    if _LANG.match(head):
        return "", head
    raise InputError(
        f"{kind} {spec!r}: {head!r} is not a language code (TGT) or pair (SRC-TGT): expected {form}"
    )


def parse_dictionary_spec(spec: str, src_lang: str, tgt_lang: str) -> tuple[str, str, str]:
    """``PATH`` (default pair), ``TGT=PATH`` (source is ``src_lang``) or ``SRC-TGT=PATH``."""
    head, eq, tail = spec.partition("=")
    if eq and "/" not in head:
        src, tgt = _lang_spec("dictionary", spec, head, tail, "[[SRC-]TGT=]PATH, e.g. de=dicts/en-de.tsv")
        return src or src_lang, tgt, tail
    if not tgt_lang:
        raise InputError(f"dictionary {spec}: which language pair? write TGT=PATH or SRC-TGT=PATH")
    return src_lang, tgt_lang, spec


def parse_switch_spec(spec: str, src_lang: str) -> tuple[str, str, str]:
    """``TGT=PATH`` (source is ``src_lang``) or ``SRC-TGT=PATH``: a code-switch dictionary always
    names its target language."""
    head, eq, tail = spec.partition("=")
    form = "[SRC-]TGT=PATH, e.g. zh=dicts/en-zh.tsv"
    if not eq:
        raise InputError(f"code-switch dictionary {spec!r} names no language: expected {form}")
    src, tgt = _lang_spec("code-switch dictionary", spec, head, tail, form)
    return src or src_lang, tgt, tail
