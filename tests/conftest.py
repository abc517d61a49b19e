import os
from pathlib import Path

import pytest
from fixture_data import DATA, prepare_fixture_shards

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from mlctl.hub import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_model_dir) -> Path:
    """Anchored shards of the fixture pairs, tokenized with the tiny model's tokenizer."""
    return prepare_fixture_shards(tmp_path_factory.mktemp("tiny_shards"), str(tiny_model_dir))


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on 127.0.0.1 with an empty bucket, for one test module (tests/s3_server.py);
    each test keeps to prefixes of its own. Skips without moto's server."""
    from s3_server import moto_bucket

    with moto_bucket() as bucket:
        yield bucket
