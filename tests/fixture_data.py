"""The fixture corpus under tests/data and shards prepared from it (importable from any test; a
module of its own because ``conftest`` can name tests/gpu/conftest.py in a full run)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"


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
