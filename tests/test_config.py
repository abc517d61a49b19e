"""Config: defaults < YAML < overrides, round trip, unknown keys, wrong types, bad overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mlctl.config import Config, ConfigError, config_from_dict, load_config, parse_overrides


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_yaml_overrides_precedence(tmp_path):
    default = Config()
    assert default.train.lr == 2e-5 and default.data.batch_size == 32 and default.loss.kind == "cz_nce"
    base = _write(tmp_path / "base.yaml", "train:\n  lr: 1e-4\n  max_steps: 50\ndata:\n  batch_size: 8\n")
    more = _write(tmp_path / "more.yaml", "train:\n  max_steps: 70\nloss:\n  kind: info_nce\n")

    cfg = load_config(base)
    assert cfg.train.lr == 1e-4  # YAML beats the default (and 1e-4 is a number, not a string)
    assert cfg.train.max_steps == 50 and cfg.data.batch_size == 8
    assert cfg.train.schedule == default.train.schedule  # siblings of a YAML key keep their defaults
    assert cfg.model == default.model

    cfg = load_config([base, more], overrides=["train.max_steps=90", "model.pool_layers=[1,6]"])
    assert cfg.train.max_steps == 90  # override beats both files
    assert cfg.train.lr == 1e-4  # first file, untouched by the second
    assert cfg.loss.kind == "info_nce"  # the later file wins over defaults
    assert cfg.model.pool_layers == [1, 6]
    assert load_config([base, more]).train.max_steps == 70  # later file beats the earlier one


def test_override_values_are_typed_yaml():
    tree = parse_overrides(
        [
            "loss.temperature=5e-2",
            "metrics.enabled=false",
            "eval.pairs=[a.tsv, b.tsv]",
            "model.tokenizer=",
            "ray.name=run=1",
        ]
    )
    assert tree == {
        "loss": {"temperature": 0.05},
        "metrics": {"enabled": False},
        "eval": {"pairs": ["a.tsv", "b.tsv"]},
        "model": {"tokenizer": ""},
        "ray": {"name": "run=1"},
    }
    cfg = load_config(overrides=["loss.temperature=5e-2", "train.lr=3"])
    assert cfg.loss.temperature == 0.05
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)  # an int is a fine float


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        overrides=[
            "train.lr=3e-5",
            "model.pool_layers=[2,-1]",
            "deepspeed.precision=bf16",
            "deepspeed.extra={gradient_clipping: 0.5}",
            "data.prepare.inputs=[{path: a.tsv}]",
            "checkpoint.every_minutes=2.5",
        ]
    )
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    again = load_config(out)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert again.data.prepare.inputs[0].path == "a.tsv"
    assert config_from_dict(yaml.safe_load(out.read_text())) == cfg
    # The fingerprint changes with any value.
    assert load_config(overrides=["train.lr=4e-5"]).fingerprint() != Config().fingerprint()


@pytest.mark.parametrize(
    "tree,key,valid",
    [
        ({"trian": {"lr": 1.0}}, "trian", ["model", "loss", "train", "ray"]),
        ({"train": {"learning_rate": 1.0}}, "train.learning_rate", ["max_steps", "lr", "warmup_steps"]),
        ({"data": {"prepare": {"ouput": "x"}}}, "data.prepare.ouput", ["inputs", "out", "workers"]),
        (
            {"data": {"prepare": {"inputs": [{"path": "a", "fmt": "tsv"}]}}},
            "data.prepare.inputs[0].fmt",
            ["path", "format"],
        ),
    ],
)
def test_unknown_key_names_key_and_valid_keys(tree, key, valid):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    msg = str(err.value)
    assert f"unknown config key {key!r}" in msg
    for name in valid:
        assert re.search(rf"\b{name}\b", msg.split("valid keys", 1)[1]), (name, msg)


def test_unknown_key_from_yaml_and_override(tmp_path):
    f = _write(tmp_path / "c.yaml", "model:\n  name_or_path: x\n  pooling: mean\n")
    with pytest.raises(ConfigError, match=r"'model\.pooling'.*valid keys of model: name_or_path, tokenizer"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"'loss\.temp'.*temperature"):
        load_config(overrides=["loss.temp=0.1"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("data.batch_size=abc", r"data\.batch_size: expected an integer, got 'abc'"),
        ("data.batch_size=2.5", r"data\.batch_size: expected an integer, got 2\.5"),
        ("train.max_steps=true", r"train\.max_steps: expected an integer, got True"),
        ("metrics.enabled=1", r"metrics\.enabled: expected true or false, got 1"),
        ("checkpoint.resume=yes please", r"checkpoint\.resume: expected true or false, got 'yes please'"),
        ("loss.kind=nce", r"loss\.kind: 'nce' is not allowed; expected one of 'cz_nce', 'info_nce'"),
        ("deepspeed.precision=fp8", r"deepspeed\.precision: 'fp8' is not allowed; expected one of 'fp32'"),
        ("model.pool_layers=[first, last]", r"model\.pool_layers\[0\]: expected an integer, got 'first'"),
        ("model.pool_layers=6", r"model\.pool_layers: expected a list \(list\[int\]\), got 6"),
        ("loss.temperature=cold", r"loss\.temperature: expected a number, got 'cold'"),
        ("model.name_or_path=12", r"model\.name_or_path: expected a string, got 12"),
        ("model=bert", r"model: expected a mapping of ModelConfig keys, got 'bert'"),
        ("train.lr.value=1", r"train\.lr: expected a number, got \{'value': 1\}"),
    ],
)
def test_wrong_types_name_key_and_expected_type(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_wrong_type_in_yaml_file(tmp_path):
    f = _write(tmp_path / "c.yaml", "data:\n  batch_size: '16'\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer, got '16'"):
        load_config(f)


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.batch_size must be >= 2"):
        load_config(overrides=["data.batch_size=1"])
    with pytest.raises(ConfigError, match=r"model\.pool_layers: 0 is the embedding output"):
        load_config(overrides=["model.pool_layers=[0, -1]"])
    with pytest.raises(ConfigError, match=r"loss\.temperature must be > 0"):
        load_config(overrides=["loss.temperature=0"])
    with pytest.raises(ConfigError, match=r"loss\.margin must be in \[0, 2\)"):
        load_config(overrides=["loss.margin=-0.1"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.lr", r"'train\.lr' must look like section\.key=value"),
        ("=3", r"'=3' has no key"),
        ("model.pool_layers=[1, 6", r"'model\.pool_layers=\[1, 6': value is not valid YAML"),
    ],
)
def test_bad_override_syntax(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"override 'train\.lr\.x': 'lr' is not a section"):
        parse_overrides(["train.lr=1", "train.lr.x=2"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(_write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert load_config(_write(tmp_path / "empty.yaml", "")) == Config()


def test_loss_term_weights_are_typed_and_checked():
    cfg = load_config(overrides=["loss.sentence_weight=1", "loss.multilevel_weight=0.5"])
    assert (cfg.loss.sentence_weight, cfg.loss.multilevel_weight) == (1.0, 0.5)
    with pytest.raises(ConfigError, match=r"loss\.sentence_weight: expected a number, got 'high'"):
        load_config(overrides=["loss.sentence_weight=high"])
    with pytest.raises(ConfigError, match=r"loss\.multilevel_weight must be >= 0, got -1"):
        load_config(overrides=["loss.multilevel_weight=-1"])
    with pytest.raises(ConfigError, match=r"both 0: no contrastive loss left"):
        load_config(overrides=["loss.sentence_weight=0", "loss.multilevel_weight=0"])
    # word_level=false has a single (sentence) term: weighing it is an error, not silently ignored
    with pytest.raises(ConfigError, match=r"model\.word_level=false"):
        load_config(overrides=["model.word_level=false", "loss.sentence_weight=1"])


def test_the_configuration_reference_covers_and_explains_every_key():
    """docs/configuration.md is generated from the dataclasses (mlctl.config_reference): every key
    of every section is there, each with the comment written beside it in mlctl/config.py."""
    import dataclasses
    import typing

    from mlctl.config import Config
    from mlctl.config_reference import reference_markdown, rows

    def keys(cls: type, prefix: str) -> set[str]:
        out = set()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], f"{prefix}{f.name}"
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                out |= keys(tp, key + ".")
                continue
            out.add(key)
            if isinstance(item, type) and dataclasses.is_dataclass(item):
                out |= keys(item, key + "[].")
        return out

    listed = {key: comment for key, _, _, comment in rows()}
    assert set(listed) == keys(Config, "")
    assert not [k for k, comment in listed.items() if not comment], (
        "keys without a comment in mlctl/config.py"
    )
    text = reference_markdown()
    assert all(f"`{k}`" in text for k in listed)
