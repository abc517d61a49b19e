"""The training worker: DeepSpeed engine, the ML-CTL step and the loop (checkpoint I/O and the
resume point live in :mod:`mlctl.checkpoint`).

Runs under Ray (launcher/) or on its own in a process group set up by torch.distributed's usual
environment variables (the tests do that). One optimizer step = ``grad_accum`` micro-batches; each
micro-batch gathers its own negatives across ranks (the contrastive batch is the global
micro-batch, not the accumulated one). DeepSpeed divides the loss by the accumulation steps in
``engine.backward``; the step does not divide it again. With ``loss.cache_chunk`` the micro-step
embeds its pairs in chunks and back-propagates the gathered loss chunk by chunk (mlctl.gradcache).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlctl.checkpoint import Checkpointer, Reporter, TrainState, step_seed
from mlctl.config import Config
from mlctl.data.manifest import manifest_hash
from mlctl.hub import load_tokenizer, tokenizer_fingerprint
from mlctl.losses import inbatch_accuracy
from mlctl.model import EncoderInputs, MLCTLModel
from mlctl.step import Vocab, host_inputs, mlm_copy, step_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The worker


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        local_rank: int = 0,
        node: str | None = None,
        run_name: str = "",
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        device: torch.device | str | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node = node or socket.gethostname()
        self.run_name = run_name or self.run_dir.name
        self.reporter = reporter or Reporter()
        self.clock = clock
        # The device the launcher assigned (Ray: ray.train.torch.get_device()); see setup().
        self.assigned_device = device
        self.state = TrainState()
        self.checkpointer: Checkpointer  # set up once the tokenizer and shards are known
        self.metrics: Any = None  # MetricsExporter once set up
        self.last_save_time = clock()
        self.last_metrics: dict[str, float] = {}  # the latest step's figures, reported with checkpoints
        self._skips_logged: dict[str, int] = {}

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        from mlctl.data.dataset import ShardLoader

        cfg = self.cfg
        self.device = self._pick_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's barriers and DeepSpeed's buffers land here
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        tok_name = cfg.model.tokenizer or cfg.model.name_or_path
        self.tokenizer = load_tokenizer(tok_name)
        self.tokenizer_hash = tokenizer_fingerprint(self.tokenizer)

        torch.manual_seed(cfg.train.seed)  # identical fusion-MLP init on every rank
        model = MLCTLModel.from_pretrained(
            cfg.model.name_or_path,
            cfg.model.pool_layers,
            cfg.model.unpad,
            cfg.model.attention,
            head_matters=cfg.loss.mlm_weight > 0,  # without MLM a fresh head is nobody's concern
        )
        self.vocab = Vocab.of(self.tokenizer, model.config.vocab_size)

        self.loader = ShardLoader(
            cfg.data.shards,
            batch_size=cfg.data.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.data.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            bucket_by_length=cfg.data.bucket_by_length,
            bucket_size=cfg.data.bucket_size,
            expected_tokenizer_hash=self.tokenizer_hash,
            code_switch=cfg.data.code_switch,
            switch_anchors=not cfg.model.word_level,  # no word-level term reads the anchor spans
        )
        self.manifest_hash = manifest_hash(cfg.data.shards)

        self.engine = self._build_engine(model)
        if torch.device(self.engine.device) != self.device:
            raise RuntimeError(f"DeepSpeed placed the model on {self.engine.device}, expected {self.device}")
        self.model: MLCTLModel = self.engine.module
        self.checkpointer = Checkpointer(
            self.run_dir,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=cfg.checkpoint.keep_last,
            identity={
                "model": cfg.model.name_or_path,
                "tokenizer_hash": self.tokenizer_hash,
                "zero_stage": cfg.deepspeed.zero_stage,
                "manifest_hash": self.manifest_hash,
                "config_fingerprint": cfg.fingerprint(),
                "recipe_fingerprint": cfg.recipe_fingerprint(),
            },
            local_rank=self.local_rank,
            node_local=self.reporter.authoritative,
        )
        self._setup_metrics()

    def _pick_device(self) -> torch.device:
        """One device per process, from DeepSpeed's accelerator and the launcher's assignment, never
        from a default index. Every collective of the step gets tensors on it: under Ray with GPUs
        the process group is NCCL-only (TorchConfig(backend="nccl")), and NCCL rejects CPU tensors."""
        from deepspeed.accelerator import get_accelerator

        from mlctl.distributed import training_device

        return training_device(get_accelerator().device_name(), self.local_rank, self.assigned_device)

    def _build_engine(self, model: MLCTLModel) -> Any:
        """The DeepSpeed engine around ``model`` (mlctl.deepspeed_setup)."""
        from mlctl.deepspeed_setup import build_engine

        return build_engine(self.cfg, model, self.world_size, self.device)

    def _setup_metrics(self) -> None:
        """This rank's Prometheus exporter on an address other nodes can reach, announced to the
        launcher (and recorded in RUN/endpoints/)."""
        from dataclasses import replace

        from mlctl.endpoints import endpoint_addresses, endpoint_info, node_ip, write_endpoint
        from mlctl.metrics import MetricsExporter

        bind, host = endpoint_addresses(self.cfg.metrics.bind, node_ip())
        if bind != self.cfg.metrics.bind:
            log.warning(
                "metrics.bind=%s is unreachable from other nodes; rank %d serves on the node address %s",
                self.cfg.metrics.bind,
                self.rank,
                bind,
            )
        self.metrics = MetricsExporter(
            replace(self.cfg.metrics, bind=bind),
            run=self.run_name,
            rank=self.rank,
            node=self.node,
            local_rank=self.local_rank,
            run_dir=self.run_dir,
            sink=self.reporter.records if self.rank == 0 else None,
        )
        port = self.metrics.start()
        if port is not None:
            info = endpoint_info(self.rank, self.node, host, port)
            write_endpoint(self.run_dir, info)
            self.reporter.announce(self.rank, info)

    # ---- checkpoints (the I/O lives in mlctl.checkpoint) ------------------------------------

    def save_checkpoint(self) -> Path:
        t0 = time.perf_counter()
        step = self.state.step
        final = self.checkpointer.save(self.engine, self.loader, self.state, self.cfg)
        seconds = time.perf_counter() - t0
        self.last_save_time = self.clock()
        if self.metrics is not None:
            self.metrics.log_checkpoint(seconds, step)
        self.reporter.checkpoint(final, step, {"step": step, **self.last_metrics})
        if self.rank == 0:
            log.info("checkpoint %s written in %.1fs", final, seconds)
        return final

    def find_resume_point(self) -> Path | None:
        """The newest complete checkpoint to resume from (Ray's or the run folder's), or None."""
        return self.checkpointer.resume_point(
            self.reporter.restored_from(),
            resume=self.cfg.checkpoint.resume,
            local=not self.reporter.authoritative,
        )

    def load_checkpoint(self, path: Path) -> None:
        self.state = self.checkpointer.load(path, self.engine, self.loader, self.cfg)

    # ---- the step ----------------------------------------------------------------------------

    def batch_inputs(
        self, batch: dict[str, Any], micro: int
    ) -> tuple[EncoderInputs, torch.Tensor | None, torch.Tensor]:
        """The micro-batch's encoder inputs (MLM copy included), anchor flags and source ids,
        derived on the host (mlctl.step) and moved in one go (pinned, non-blocking on CUDA)."""
        inputs, anchored, sids = host_inputs(batch, self.cfg, *self.mlm_copy(batch, micro))
        return (
            self.to_device(inputs),
            None if anchored is None else self.to_device(anchored),
            self.to_device(sids),
        )

    def mlm_copy(
        self, batch: dict[str, Any], micro: int
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The micro-batch's masked copy and its labels (CPU); see :func:`mlctl.step.mlm_copy`."""
        return mlm_copy(batch, self.cfg, self.vocab, self.state.step, self.rank, micro)

    def to_device(self, x: Any) -> Any:
        """A CPU tensor (or EncoderInputs) on the step's device: pinned and non-blocking on CUDA."""
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def micro_step(self, batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
        if self.cfg.loss.cache_chunk:
            from mlctl.gradcache import cached_micro_step

            return cached_micro_step(self, batch, micro)
        inputs, anchored, sids = self.batch_inputs(batch, micro)
        out = self.engine(inputs)
        loss, cl, mlm, x, y = step_loss(self.cfg, out, anchored, self.rank, self.world_size, sids)
        self.engine.backward(loss)
        self.engine.step()
        return {
            "loss": loss.detach(),
            "cl": cl.detach(),
            "mlm": mlm.detach(),
            # this rank's share of the global-batch accuracy; stays on the device
            "acc": inbatch_accuracy(x.detach(), y.detach(), rank=self.rank, world_size=self.world_size),
        }

    def train_step(self, it) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches). Returns rank-averaged figures.

        The step reads the device back once: the figures, the gradient norm and the flags go into
        one all-reduce and one copy to the host at the end."""
        torch.manual_seed(step_seed(self.cfg.train.seed, self.state.step, self.rank, 10_000))
        t0 = time.perf_counter()
        wait = 0.0
        sums = torch.zeros(4, device=self.device)  # summed on the device: no sync per micro-batch
        samples = tokens = 0
        pair_ids: list[str] = []
        for micro in range(self.cfg.train.grad_accum):
            tw = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tw
            r = self.micro_step(batch, micro)
            sums += torch.stack([r["loss"], r["cl"], r["mlm"], r["acc"]]).float()
            samples += len(batch["pair_ids"])
            tokens += int(batch["num_tokens"])
            pair_ids.extend(batch["pair_ids"])
        # The save-now and stop flags ride along (rank 0's clock and signals rule).
        due = float(self.rank == 0 and self._time_save_due())
        stop = float(self.stop_requested())
        norm = self.engine.get_global_grad_norm()
        on_device = norm if isinstance(norm, torch.Tensor) else None
        host_norm = float("nan") if norm is None or on_device is not None else float(norm)
        # float64: token counts of a large global batch stay exact (float32 would round past 2**24).
        host = torch.tensor([float(samples), float(tokens), due, stop, host_norm], dtype=torch.float64)
        parts = [sums.double() / self.cfg.train.grad_accum, self.to_device(host)]
        if on_device is not None:
            parts.append(on_device.detach().double().reshape(1))
        packed = torch.cat(parts)
        dist.all_reduce(packed)
        packed = packed.cpu()  # the step's one device-to-host copy
        packed[:4] /= self.world_size
        grad_norm = float(packed[9] if on_device is not None else packed[8]) / self.world_size
        self.state.step += 1
        self.state.samples_seen += int(packed[4])
        self.state.tokens_seen += int(packed[5])
        step_seconds = time.perf_counter() - t0
        if self.cfg.train.log_pair_ids:
            self._log_pair_ids(pair_ids)
        return {
            "step": self.state.step,
            "loss": float(packed[0]),
            "contrastive_loss": float(packed[1]),
            "mlm_loss": float(packed[2]),
            "inbatch_accuracy": float(packed[3]),
            "samples": int(packed[4]),
            "tokens": int(packed[5]),
            "step_seconds": step_seconds,
            "data_wait_seconds": wait,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": grad_norm,
            "save_due": bool(packed[6] > 0),
            "stop": bool(packed[7] > 0),
        }

    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (a signal to the driver, ``mlctl stop``); see
        :meth:`fit`. Rank 0 asks the launcher; the step's all-reduce tells the others."""
        return self.rank == 0 and self.reporter.stop_requested()

    def _time_save_due(self) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return minutes > 0 and (self.clock() - self.last_save_time) >= minutes * 60

    def _log_pair_ids(self, pair_ids: list[str]) -> None:
        d = self.run_dir / "pair_ids"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank{self.rank:05d}.jsonl", "a") as f:
            f.write(
                json.dumps({"step": self.state.step, "restarts": self.state.restarts, "pair_ids": pair_ids})
                + "\n"
            )

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train until ``train.max_steps``, or until asked to stop (a signal to the driver reaches
        every rank through the step's all-reduce): then save at the step reached and return early
        with ``self.stopped`` set. Resumes from the newest checkpoint first."""
        self.stopped = False
        self.resume()
        self.engine.train()
        it = iter(self.loader)
        try:
            while self.state.step < self.cfg.train.max_steps:
                m = self.train_step(it)
                self.after_step(m)
                if m["stop"]:
                    self.stopped = True
                    break
        finally:
            self.close()
        return self.state

    def resume(self) -> None:
        """Count this attempt, load the newest checkpoint (if any) and restore the counters."""
        # Counted before the checkpoint is read, so an attempt that fails while loading counts too.
        attempts = self.reporter.count_attempt(self.run_dir, self.rank)
        resume = self.find_resume_point()
        if resume is not None:
            self.load_checkpoint(resume)
            self.reporter.release(resume)
        self.state.restarts = max(self.state.restarts, attempts - 1)
        if resume is not None and self.rank == 0:
            log.info(
                "resumed from %s at step %d (restart %d)",
                resume,
                self.state.step,
                self.state.restarts,
                extra={"notice": True},  # shown on the driver's console too (launcher.monitoring)
            )
        if self.metrics is not None:
            self.metrics.restore_totals(
                self.state.step, self.state.samples_seen, self.state.tokens_seen, self.state.restarts
            )
        self._t_start, self._start_step = time.perf_counter(), self.state.step

    def after_step(self, m: dict[str, Any]) -> None:
        """The hooks after each optimizer step: metrics, evaluation, checkpoint, log line."""
        cfg, step = self.cfg, self.state.step
        self.last_metrics = {k: v for k, v in m.items() if isinstance(v, float)}
        self._log_metrics(m)
        if _every(step, cfg.eval.every_steps) and cfg.eval.pairs:
            self.evaluate()
        last = step == cfg.train.max_steps
        if last or _every(step, cfg.checkpoint.every_steps) or m["save_due"] or m["stop"]:
            self.save_checkpoint()
        if m["stop"] and self.rank == 0:
            log.info("stopping at step %d: checkpoint saved", step, extra={"notice": True})
        if self.rank == 0 and (_every(step, cfg.train.log_every) or last):
            self._log_line(m)

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close:
            close()
        if self.metrics is not None:
            self.metrics.close()

    def _log_line(self, m: dict[str, Any]) -> None:
        cfg = self.cfg
        elapsed = time.perf_counter() - self._t_start
        pairs = (
            (self.state.step - self._start_step)
            * cfg.data.batch_size
            * self.world_size
            * cfg.train.grad_accum
        )
        log.info(
            "step %d/%d loss %.4f (cl %.4f mlm %.4f) acc %.3f lr %.2e %.1f pairs/s",
            self.state.step,
            cfg.train.max_steps,
            m["loss"],
            m["contrastive_loss"],
            m["mlm_loss"],
            m["inbatch_accuracy"],
            m["lr"],
            pairs / max(elapsed, 1e-9),
        )

    def _log_metrics(self, m: dict[str, Any]) -> None:
        from dataclasses import fields

        from mlctl.metrics import StepMetrics

        skipped = dict(getattr(self.loader, "skipped", {}) or {})
        if skipped != self._skips_logged:
            self.reporter.skipped(self.rank, skipped)
        if self.metrics is None:
            self._skips_logged = skipped
            return
        global_batch = self.cfg.data.batch_size * self.world_size * self.cfg.train.grad_accum
        given = {f.name: m[f.name] for f in fields(StepMetrics) if f.name in m}
        self.metrics.log_step(StepMetrics(**given, global_batch_size=global_batch))
        for reason, count in skipped.items():
            seen = self._skips_logged.get(reason, 0)
            if count > seen:
                self.metrics.log_skipped(reason, count - seen)
        self._skips_logged = skipped

    def evaluate(self) -> dict[str, float]:
        """Retrieval accuracy on the configured dev pairs. Every rank encodes a share of the pairs
        (under ZeRO-3 the forward is collective anyway), rank 0 scores and logs; other ranks get {}."""
        from mlctl.evaluate import lang_of, load_pairs, retrieval_accuracy_on_pairs

        results: dict[str, float] = {}
        self.engine.eval()
        try:
            for path in self.cfg.eval.pairs:
                pairs = load_pairs(path, max_pairs=self.cfg.eval.max_pairs)
                r = retrieval_accuracy_on_pairs(
                    self.model,
                    self.tokenizer,
                    pairs,
                    batch_size=self.cfg.eval.batch_size,
                    rank=self.rank,
                    world_size=self.world_size,
                )
                if r:
                    results[lang_of(path)] = r["xx2en"]
        finally:
            self.engine.train()
        if self.metrics is not None and results:
            self.metrics.log_eval(self.state.step, results)
        if results:
            log.info(
                "eval step %d: %s", self.state.step, " ".join(f"{k}={v:.3f}" for k, v in results.items())
            )
        return results


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
