"""What a verb shows on the console: its own lines and real errors, not the libraries' loading
chatter (``-v`` shows everything)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Loggers whose INFO/WARNING records, while a verb loads or saves a model, are reports about the
# libraries' own work: transformers' LOAD REPORT (a fresh pooler or MLM head is expected here),
# sentence-transformers' "Saving model to ...", DeepSpeed's checkpoint parsing.
LIBRARY_LOGGERS = ("transformers", "sentence_transformers", "deepspeed", "DeepSpeed", "huggingface_hub")
# Python warnings raised inside these packages (deprecations of each other's APIs) are not the
# user's to act on.
LIBRARY_MODULES = r"(transformers|sentence_transformers|deepspeed|huggingface_hub|torch|tokenizers)(\.|$)"


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """For the block: progress bars of transformers and huggingface_hub off, library loggers at
    ERROR, library warnings ignored; all restored after (a verb also runs in-process, in tests and
    scripts). ``verbose``: change nothing."""
    if verbose:
        yield
        return
    saved_levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in LIBRARY_LOGGERS]
    saved_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    restore_bars = _progress_bars_off()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub where it starts up
    transformers_verbosity = _transformers_verbosity(logging.ERROR)
    errors_only = _ErrorsOnly()
    for logger, _ in saved_levels:
        logger.setLevel(logging.ERROR)
        logger.addFilter(errors_only)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
            yield
    finally:
        for logger, level in saved_levels:
            logger.removeFilter(errors_only)
            logger.setLevel(level)
        if transformers_verbosity is not None:
            _transformers_verbosity(transformers_verbosity)
        restore_bars()
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved_env


class _ErrorsOnly(logging.Filter):
    """Passes ERROR and above.

    NOTE: the level set above is not enough for DeepSpeed: it creates its logger when first imported,
    which a verb does inside the block (export's zero_to_fp32), and sets that logger's level then,
    undoing ours; with DS_ACCELERATOR unset, the same import logs its accelerator auto-detection
    ("Setting accelerator to CPU ...") as a warning. A filter on the logger outlives that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _transformers_verbosity(level: int) -> int | None:
    """Set transformers' own verbosity (it keeps one apart from the logger level); the old one, or
    None without transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity(level)
    return old


def _progress_bars_off():
    """Turn transformers' and huggingface_hub's progress bars off; returns what turns them back."""
    try:
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        return lambda: None
    hf_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_on = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns huggingface_hub's off

    def restore() -> None:
        if hf_was_on:
            hf_logging.enable_progress_bar()  # also turns huggingface_hub's on
        if hub_was_on:
            hub_utils.enable_progress_bars()
        else:
            hub_utils.disable_progress_bars()

    return restore
