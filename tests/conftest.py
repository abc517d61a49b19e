import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared/data is not here ({SHARED}); this test needs the real corpus")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM with a WordPiece vocabulary trained on tests/data."""
    from mlctl.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from mlctl.hub import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def prepare_fixture_shards(out: Path, tokenizer: str, samples_per_shard: int = 50, **overrides) -> Path:
    """`mlctl prepare` on the three fixture catalogs with the hand-written dictionaries in tests/data."""
    from mlctl.config import PrepareConfig, PrepareInput
    from mlctl.data.prepare import prepare

    langs = ("de", "fr", "es")
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(DATA / f"pairs.en-{lang}.tsv"), "tsv", "en", lang) for lang in langs],
        dictionaries=[f"{lang}={DATA / f'dict.en-{lang}.tsv'}" for lang in langs],
        out=str(out),
        samples_per_shard=samples_per_shard,
        **overrides,
    )
    prepare(cfg, tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_model_dir) -> Path:
    """Anchored shards of the fixture pairs, tokenized with the tiny model's tokenizer."""
    return prepare_fixture_shards(tmp_path_factory.mktemp("tiny_shards"), str(tiny_model_dir))
