"""The configuration reference, generated from the config dataclasses (:mod:`mlctl.config`).

Every key, its type, its default and the comment written beside it in the source: one source of
truth for the code and the docs. ``docs/hooks.py`` puts :func:`reference_markdown` into the docs
site's configuration page at build time; ``python -m mlctl.config_reference`` prints it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import MISSING
from typing import Any

from mlctl import config as config_module
from mlctl.config import Config, _type_name


def sections() -> list[tuple[str, type]]:
    """``(dotted prefix, dataclass)`` for every section, nested ones (``data.prepare``) included."""
    out: list[tuple[str, type]] = []

    def walk(prefix: str, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        out.append((prefix, cls))
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(f"{prefix}.{f.name}" if prefix else f.name, tp)
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if isinstance(item, type) and dataclasses.is_dataclass(item):
                walk(f"{prefix}.{f.name}[]", item)  # a list of sections: each item has these keys

    walk("", Config)
    return [(p, c) for p, c in out if p]


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines right above each field of ``cls`` and the comment at the end of its line."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tree = ast.parse(source)
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            parts.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        code = lines[node.lineno - 1]
        if "#" in code.split("=", 1)[-1]:
            parts.append(code.rsplit("#", 1)[1].strip())
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def rows() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, comment)`` of every key, in the order of the dataclasses."""
    out = []
    for prefix, cls in sections():
        hints = typing.get_type_hints(cls, vars(config_module))
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                continue  # its own section
            kind = _type_name(tp).replace("mlctl.config.", "")
            out.append((f"{prefix}.{f.name}", kind, _show(_default(f)), comments.get(f.name, "")))
    return out


def reference_markdown() -> str:
    """A Markdown section per config section, one table row per key."""
    text: list[str] = []
    by_section: dict[str, list[tuple[str, str, str, str]]] = {}
    for key, tp, default, comment in rows():
        by_section.setdefault(key.rsplit(".", 1)[0], []).append((key, tp, default, comment))
    for prefix, cls in sections():
        doc = inspect.getdoc(cls) or ""
        text.append(f"### `{prefix}`\n")
        if doc and not doc.startswith(cls.__name__ + "("):
            text.append(doc + "\n")
        text.append("| key | type | default | what it does |\n|---|---|---|---|")
        for key, tp, default, comment in by_section.get(prefix, []):
            text.append(f"| `{key}` | {tp.replace('|', 'or')} | {default} | {comment.replace('|', '/')} |")
        text.append("")
    return "\n".join(text)


if __name__ == "__main__":
    print(reference_markdown())
