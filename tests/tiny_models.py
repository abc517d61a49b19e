"""Tiny offline models for tests and benchmarks: a WordPiece vocabulary trained with `tokenizers` on
the fixture text in tests/data and a small BertForMaskedLM built from a config (no downloads); and
finding (and killing) the processes a test started, by a marker in their environment.

Test code, next to the fixture data it reads: bench scripts put tests/ on ``sys.path`` to import it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path

from fixture_data import DATA


def fixture_texts(data_dir: Path = DATA) -> list[str]:
    texts: list[str] = []
    for path in sorted(data_dir.glob("pairs.*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.extend(part for part in line.split("\t")[:2] if part)
    return texts


def train_wordpiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000, lowercase: bool = False
):
    """Train a BERT WordPiece tokenizer and save it as a HF fast tokenizer folder."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=False if not lowercase else None)
    wp.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    from tokenizers.processors import BertProcessing

    wp._tokenizer.post_processor = BertProcessing(
        ("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]"))
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wp._tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tok.save_pretrained(str(out))
    return tok


def build_tiny_bert(
    out_dir: str | Path,
    tokenizer,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """A randomly initialised BertForMaskedLM (decoder tied to the embeddings) saved with its tokenizer.
    ``vocab_size`` beyond the tokenizer's gives rows never looked up (a big model's embedding cost)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = BertForMaskedLM(cfg)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_tiny_model(out_dir: str | Path, **kwargs) -> Path:
    """Tokenizer + tiny BERT in one folder, usable as `model.name_or_path`."""
    tok = train_wordpiece(fixture_texts(), Path(out_dir) / "_tok")
    return build_tiny_bert(out_dir, tok, **kwargs)


def processes_marked(marker: str, value: str) -> list[int]:
    """Pids of live processes whose environment has `marker=value`.

    Ray's raylet, GCS and workers inherit the driver's environment, so a test that puts a unique
    marker into the environment of the command it starts can find (and clean up) exactly the
    processes that command spawned, without touching other Ray clusters on the machine.
    """
    needle = f"{marker}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if state != "Z" and needle in env.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, value: str) -> None:
    """SIGKILL every live process carrying `marker=value` in its environment."""
    for pid in processes_marked(marker, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
