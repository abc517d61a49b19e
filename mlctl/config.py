"""Typed configuration: one dataclass per component, composed by :class:`Config`.

Precedence is defaults < YAML file < dotted command-line overrides
(``loss.temperature=0.05 model.pool_layers=[1,6]``). Every key and every value is checked before
any work starts: an unknown key names the valid ones, a wrong type names the expected one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mlctl.config_sections import (  # noqa: F401  (the sections are part of this module's API)
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LossConfig,
    MetricsConfig,
    ModelConfig,
    PrepareConfig,
    PrepareInput,
    RayConfig,
    TrainConfig,
)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float. PyYAML follows YAML 1.1, where a float
    needs a dot (``1.0e-5``), so ``lr: 1e-5`` would otherwise arrive as the string '1e-5'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        # Keys that only mean something together (each section checks its own keys above).
        if not self.model.word_level and (self.loss.sentence_weight != 0 or self.loss.multilevel_weight != 1):
            raise ConfigError(
                "loss.sentence_weight / loss.multilevel_weight weigh the two terms of the word-level "
                "loss; with model.word_level=false the only term is the sentence one (leave them at 0 / 1)"
            )
        if self.model.word_level and self.loss.multilevel_weight + self.loss.sentence_weight == 0:
            raise ConfigError(
                "loss.multilevel_weight and loss.sentence_weight are both 0: no contrastive loss left"
            )
        chunk = self.loss.cache_chunk
        if chunk and chunk >= self.data.batch_size:
            raise ConfigError(
                f"loss.cache_chunk={chunk} is not below data.batch_size={self.data.batch_size}: it counts "
                "pairs of one rank's micro-batch, and one chunk holding the whole micro-batch saves no "
                "memory for an extra forward; set it below data.batch_size, or 0 (off)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def fingerprint(self) -> str:
        """Hash of the whole resolved config."""
        return _digest(self.to_dict())

    def recipe(self) -> dict[str, Any]:
        """The keys that shape the training trajectory: the model, loss, data, train and DeepSpeed
        sections without what may change between two invocations of one run (``RECIPE_IGNORED``:
        length, logging, where the shards are and how they are read, what prepare reads)."""
        d = self.to_dict()
        return {
            section: {k: v for k, v in d[section].items() if k not in RECIPE_IGNORED.get(section, ())}
            for section in RECIPE_SECTIONS
        }

    def recipe_fingerprint(self) -> str:
        return _digest(self.recipe())


# NOTE: a whole section counts minus the listed keys, so a key added to these sections later is part
# of the recipe (and of derived run names) unless it is listed here.
RECIPE_SECTIONS = ("model", "loss", "data", "train", "deepspeed")
RECIPE_IGNORED = {
    # the shards' content is checked through the manifest's hash; loader workers re-split exactly
    "data": ("prepare", "shards", "num_workers"),
    "train": ("max_steps", "log_every", "log_pair_ids"),
}


def _digest(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def recipe_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every recipe key that differs."""
    out = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section, {}), after.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key, "(unset)") != b.get(key, "(unset)"):
                out.append(f"{section}.{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r}; valid keys{' of ' + where if where else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "extra":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_dotted(tree, key, value)
    return tree


def _read_yaml(p: Path) -> Any:
    """The YAML in file ``p``; every way it can fail names the file (a TSV or a binary given as
    ``-c`` used to fail with a bare decoder or scanner message)."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not a YAML text file: byte 0x{data[e.start]:02x} at offset {e.start} "
            "is not UTF-8"
        ) from None
    try:
        return _yaml_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None


def load_config(
    path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults < YAML file(s) at ``path`` (later files win) < dotted ``overrides``."""
    tree: dict[str, Any] = {}
    paths = path if isinstance(path, list) else ([path] if path else [])
    for item in paths:
        p = Path(item)
        loaded = _read_yaml(p)
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping at the top level (sections such as model:, "
                f"data:, train:), not a {type(loaded).__name__}"
            )
        tree = _merge(tree, loaded)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    return from_dict(Config, tree)


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, data)
