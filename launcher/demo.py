"""The main job on bundled data (`make demo`, `mlctl demo`).

1. Finds the gettext catalogs that the `django` package ships (BSD-licensed, real human
   translations of UI strings) for de, fr and es.
2. Holds out two catalogs per language (contrib/auth, contrib/admindocs) as dev pairs, and builds a
   small bilingual dictionary from the one-word entries of the training catalogs.
3. `mlctl prepare`s the training catalogs (.mo) into anchored WebDataset shards.
4. Measures retrieval accuracy of the untrained encoder on the dev pairs, trains ML-CTL with
   2 CPU workers under an embedded Ray and DeepSpeed ZeRO-1 (the stock config ``demo``,
   configs/demo.yaml), and measures again on the trained run.
"""

from __future__ import annotations

import argparse
import contextlib
import gettext
import io
import logging
import sys
import time
from pathlib import Path

LANGS = ("de", "fr", "es")
DEV_CATALOGS = ("contrib/auth/", "contrib/admindocs/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=None,
        help="YAML config or stock config name; repeat to layer (default: the stock config demo)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--work", default="demo_data", help="where catalogs, shards and dev pairs go")


def config_files(values: list[str] | None) -> list[str | Path]:
    """The ``-c`` values as files (:func:`mlctl.stock.config_paths`), or the stock config ``demo``
    (inside the installed package) when none is given."""
    from mlctl.stock import config_paths, stock_config

    return config_paths(values) if values else [stock_config("demo")]


def django_catalogs(lang: str) -> list[Path]:
    from mlctl.extras import require

    require("django", "mlctl demo (its data are Django's translation catalogs)")
    return sorted(django_module_dir().glob(f"**/locale/{lang}/LC_MESSAGES/*.mo"))


def django_module_dir() -> Path:
    from mlctl.extras import require

    return Path(str(require("django", "mlctl demo").__file__)).parent


def read_mo(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]  # msgid -> msgstr, plural keys are tuples
    return {
        k: v for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str) and v and k != v
    }


def build_demo_inputs(work: Path) -> tuple[list[tuple[Path, str]], dict[str, Path], dict[str, Path]]:
    """(training catalogs with their language, dictionary per language, dev TSV per language)."""
    work.mkdir(parents=True, exist_ok=True)
    train: list[tuple[Path, str]] = []
    dicts: dict[str, Path] = {}
    devs: dict[str, Path] = {}
    summary: list[tuple[str, int, int, int]] = []
    for lang in LANGS:
        files = django_catalogs(lang)
        if not files:
            raise FileNotFoundError(
                f"no gettext catalogs for {lang!r} under {Path(django_module_dir())}; is the django install complete?"
            )
        dev_files = [f for f in files if any(d in f.as_posix() for d in DEV_CATALOGS)]
        train_files = [f for f in files if f not in dev_files]
        seen_en: set[str] = set()
        words: dict[str, str] = {}
        for f in train_files:
            entries = read_mo(f)
            seen_en.update(entries)
            for en, xx in entries.items():
                if en.isalpha() and xx.isalpha() and len(en) > 2:
                    words.setdefault(en.lower(), xx.lower())
        train.extend((f, lang) for f in train_files)
        dicts[lang] = work / f"dict.en-{lang}.tsv"
        dicts[lang].write_text("".join(f"{en}\t{xx}\n" for en, xx in sorted(words.items())), encoding="utf-8")
        dev_pairs = {}
        for f in dev_files:
            for en, xx in read_mo(f).items():
                if (
                    en not in seen_en
                    and 3 <= len(en.split()) <= 40
                    and "\t" not in en + xx
                    and "\n" not in en + xx
                ):
                    dev_pairs[en] = xx
        devs[lang] = work / f"dev.en-{lang}.tsv"
        devs[lang].write_text(
            "".join(f"{en}\t{xx}\n" for en, xx in sorted(dev_pairs.items())), encoding="utf-8"
        )
        summary.append((lang, len(train_files), len(words), len(dev_pairs)))
    print(
        "[demo] Django catalogs: "
        + ", ".join(f"{lang} {n}" for lang, n, _, _ in summary)
        + " for training; dictionary words: "
        + ", ".join(f"{lang} {w}" for lang, _, w, _ in summary)
        + "; dev pairs: "
        + ", ".join(f"{lang} {d}" for lang, _, _, d in summary),
        flush=True,
    )
    return train, dicts, devs


def prepare_shards(cfg, work: Path, train, dicts) -> Path:
    from mlctl.config import PrepareInput
    from mlctl.data.prepare import prepare

    out = work / "shards"
    p = cfg.data.prepare
    p.inputs = [PrepareInput(path=str(f), format="mo", src_lang="en", tgt_lang=lang) for f, lang in train]
    p.dictionaries = [f"{lang}={path}" for lang, path in dicts.items()]
    if cfg.data.code_switch > 0:
        # No word list of a fourth language is bundled: the demo switches English words into its
        # own three languages, which exercises the mechanism end to end (configs/demo.yaml).
        p.code_switch = list(p.dictionaries)
    p.out = str(out)
    p.samples_per_shard = 256
    # NOTE: prepare logs the first entries of every skip reason with file and line; on Django's
    # catalogs those are expected (plural forms, untranslated strings, sentences without a
    # dictionary word), so the demo shows the counts by reason once instead (the data path's
    # loggers are all under mlctl.data).
    with _quiet("mlctl.data"):
        manifest = prepare(p, cfg.model.tokenizer or cfg.model.name_or_path)
    counts = manifest.get("counts", {})
    dropped = sorted((counts.get("dropped") or {}).items(), key=lambda kv: -kv[1])
    # Readers skip some entries before they become pairs (po plural forms, untranslated strings), so
    # kept + skipped adds up to the entries in the input, not to the pairs read.
    entries = int(counts.get("kept", 0)) + int(counts.get("dropped_total", 0))
    print(
        f"[demo] shards: {counts.get('kept')} pairs kept of {entries} input entries "
        f"({counts.get('read')} read as pairs); skipped: "
        + (", ".join(f"{reason} {n}" for reason, n in dropped) or "none")
        + (
            f"; code-switchable words per pair {manifest['switch_words_per_pair']:.2f}"
            if manifest.get("code_switch")
            else ""
        ),
        flush=True,
    )
    return out


@contextlib.contextmanager
def _quiet(*loggers: str, level: int = logging.ERROR):
    """Raise the given loggers to ``level`` for the duration of the block."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


def dev_accuracy(model, tokenizer, devs: dict[str, Path]) -> dict[str, float]:
    from mlctl.pair_files import load_pairs
    from mlctl.retrieval import retrieval_accuracy_on_pairs

    return {
        lang: retrieval_accuracy_on_pairs(model, tokenizer, load_pairs(path))["xx2en"]
        for lang, path in devs.items()
    }


def run(args: argparse.Namespace) -> int:
    from launcher.ray_train import launch
    from launcher.worker import quiet_library_output
    from mlctl.config import load_config
    from mlctl.export import load_run_model
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel

    t0 = time.time()
    work = Path(args.work)
    cfg = load_config(config_files(args.config), args.overrides)
    train, dicts, devs = build_demo_inputs(work)
    cfg.data.shards = str(prepare_shards(cfg, work, train, dicts))
    cfg.eval.pairs = [str(p) for p in devs.values()]

    quiet_library_output()
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    # the untrained encoder's accuracy: its MLM head (fresh in this checkpoint) plays no part
    model = MLCTLModel.from_pretrained(
        cfg.model.name_or_path, cfg.model.pool_layers, head_matters=False
    ).eval()
    before = dev_accuracy(model, tokenizer, devs)
    del model
    print(f"[demo] dev retrieval accuracy before training (xx->en): {_fmt(before)}", flush=True)

    t_train = time.time()
    try:
        run_dir = launch(cfg)
    except RuntimeError as e:  # the launcher's one-line account of a failed run (cause, checkpoint)
        print(f"mlctl demo: {e}", file=sys.stderr)
        return 1
    train_seconds = time.time() - t_train

    # DeepSpeed's zero_to_fp32 prints every step of rebuilding the weights; only failures matter here.
    with (
        _quiet("mlctl.model"),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        model, tokenizer, _ = load_run_model(run_dir)
    after = dev_accuracy(model.eval(), tokenizer, devs)
    pairs = cfg.train.max_steps * cfg.data.batch_size * cfg.ray.num_workers * cfg.train.grad_accum
    print(f"[demo] dev retrieval accuracy after training  (xx->en): {_fmt(after)}")
    print(
        f"[demo] trained {cfg.train.max_steps} steps ({pairs} pairs) in {train_seconds:.0f}s "
        f"including Ray and DeepSpeed start-up; whole demo {time.time() - t0:.0f}s"
    )
    print(f"[demo] run folder: {run_dir} (mlctl report {run_dir}; mlctl export {run_dir} OUT)")
    return 0


def _fmt(acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / max(1, len(acc))
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" | mean {mean:.3f}"


def main() -> int:
    from launcher.cli import main as cli_main

    return cli_main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
