"""``-c NAME`` names a stock config (configs/, installed as mlctl.configs); a path that exists wins,
and an unknown name lists the stock names. The installed wheel is tests/test_wheel.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import build_parser, main
from launcher.demo import config_files
from launcher.train import resolve
from mlctl.config import ConfigError
from mlctl.stock import config_path, stock_config, stock_dir, stock_names

ROOT = Path(__file__).resolve().parent.parent
STOCK = {
    "demo",
    "paper",
    "proof",
    "cluster",
    "ablation/info-snt",
    "ablation/cz-snt",
    "ablation/ml-ctl",
    "ablation/ml-ctl-snt",
    "deepspeed/zero0",
    "deepspeed/zero1",
    "deepspeed/zero2",
    "deepspeed/zero3",
    "deepspeed/bf16",
}


def test_a_checkout_reads_its_own_configs_folder():
    assert stock_dir() == ROOT / "configs"
    assert STOCK <= set(stock_names())
    assert set(stock_names()) == {
        p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml")
    }


@pytest.mark.parametrize("name", ["paper", "paper.yaml", "configs/paper.yaml", "./configs/paper.yaml"])
def test_a_stock_name_in_any_spelling_of_the_docs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names cannot be read as paths
    assert config_path(name) == ROOT / "configs" / "paper.yaml"


def test_a_path_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("paper").write_text("train:\n  max_steps: 3\n")
    assert config_path("paper") == Path("paper")
    assert config_path(str(tmp_path / "paper")) == tmp_path / "paper"
    assert config_path("ablation/ml-ctl") == ROOT / "configs" / "ablation" / "ml-ctl.yaml"


def test_an_unknown_name_lists_the_stock_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        config_path("papr")
    msg = str(e.value)
    assert msg.startswith("config 'papr' is neither a file nor a stock config; stock configs: ")
    assert all(name in msg for name in STOCK)
    with pytest.raises(ConfigError):
        stock_config("")


def test_train_layers_stock_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "-c", "paper", "-c", "deepspeed/zero2", "train.max_steps=7"])
    cfg = resolve(args)
    assert cfg.model.name_or_path == "bert-base-multilingual-cased"  # paper.yaml
    assert cfg.deepspeed.zero_stage == 2 and cfg.train.max_steps == 7


def test_an_unknown_config_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlctl train: error: config 'nope' is neither a file"), err
    assert "deepspeed/zero2" in err[0]


def test_the_demo_defaults_to_the_stock_demo():
    assert config_files(None) == [ROOT / "configs" / "demo.yaml"]
    assert config_files(["proof"]) == [ROOT / "configs" / "proof.yaml"]


def test_prepare_reads_a_stock_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # proof.yaml's inputs are relative: ../shared/data/... is not here
    assert main(["prepare", "--config", "proof", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "mlctl prepare: error: input file not found: ../shared/data/train/de.tsv.gz"
