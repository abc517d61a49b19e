"""Pair files for `mlctl eval` and training's evaluation: ``en<TAB>xx[<TAB>ignored...]`` lines,
gzip'd when the name ends in .gz, decoded as `mlctl prepare` decodes its inputs
(:mod:`mlctl.data.charset`). The odd bad line is skipped with a warning naming ``file:line``; a
file in another encoding is refused, never half read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mlctl.data.readers import text_lines
from mlctl.data.skips import Counts
from mlctl.preflight import check_input_file

log = logging.getLogger(__name__)


# How `mlctl eval` is given a pair file's encoding (named when a file in another one is refused).
ENCODING_OPTION = "--encoding {enc}"
LOG_FIRST_SKIPS = 5  # skipped lines of a file named one by one; the rest are counted
# The line decoder's reasons (mlctl.data.charset) in the words of a pair-file skip.
DECODE_REASONS = {"invalid_utf8": "not UTF-8", "invalid_encoding": "undecodable", "nul_byte": "NUL byte"}


@dataclass
class PairFile:
    """Pairs read from one TSV file, with the count of lines that were skipped."""

    path: str
    pairs: list[tuple[str, str]]
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped line; the first few are logged with their ``file:line``."""
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.skipped <= LOG_FIRST_SKIPS:
            log.warning("%s: skipped (%s)%s", where, reason, f": {detail}" if detail else "")


class _DecodeSkips(Counts):
    """Counts the lines the decoder could not decode into a :class:`PairFile`, in its words."""

    def __init__(self, pf: PairFile) -> None:
        super().__init__()
        self.pf = pf

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        for _ in range(n):
            self.pf.skip(DECODE_REASONS.get(reason, reason), where, detail)


def read_pair_file(
    path: str | Path, max_pairs: int | None = None, encoding: str = "", options: str = ENCODING_OPTION
) -> PairFile:
    """Read ``en<TAB>xx[<TAB>ignored...]`` lines (gzip'd when the name ends in .gz).

    The text is decoded as `mlctl prepare` decodes its inputs (:mod:`mlctl.data.charset`): a BOM,
    UTF-16/32 without one, ``encoding`` if given, else UTF-8. A file in another encoding is refused
    (:class:`~mlctl.data.skips.InputError` naming its likely encoding), never half read; the odd
    undecodable line, like a line without two non-empty fields, is skipped with a warning naming
    ``file:line``. A missing file raises FileNotFoundError, a file without a single usable pair
    ValueError. ``options`` says, in a refusal, how the command takes an encoding ("": it does not).
    """
    p = check_input_file(path, "pairs file")
    out = PairFile(str(path), [])
    for lineno, line in text_lines(p, _DecodeSkips(out), encoding, options):
        if max_pairs is not None and len(out.pairs) >= max_pairs:
            break
        if line is None:
            continue  # counted by the decoder
        line = line.removeprefix("\ufeff")  # a BOM inside: files concatenated with `cat`
        fields = line.split("\t")
        if not line.strip():
            reason = "empty line"
        elif len(fields) < 2:
            reason = "no tab (expected en<TAB>xx)"
        elif not fields[0].strip() or not fields[1].strip():
            reason = "empty sentence"
        else:
            out.pairs.append((fields[0].strip(), fields[1].strip()))
            continue
        out.skip(reason, f"{p}:{lineno}")
    if out.skipped > LOG_FIRST_SKIPS:
        log.warning("%s: %d lines skipped in all: %s", p, out.skipped, out.reasons)
    if not out.pairs:
        raise ValueError(f"{p}: no en<TAB>xx pairs in the file ({out.skipped} lines skipped)")
    return out


def load_pairs(path: str | Path, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """The first ``max_pairs`` (en, xx) pairs of a TSV file; bad lines are skipped with a warning."""
    return read_pair_file(path, max_pairs).pairs


def lang_of(path: str | Path) -> str:
    """Language code from a file name: ``de.tsv.gz`` -> de, ``pairs.en-fr.tsv`` -> fr."""
    name = Path(path).name
    for suffix in (".gz", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    return name.split(".")[-1].split("-")[-1]
