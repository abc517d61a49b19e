"""mlctl: multi-level contrastive alignment of multilingual encoders (ML-CTL)."""

__version__ = "0.1.0"
