"""Training run folders with real DeepSpeed checkpoints, for the tests of `mlctl export` and
`mlctl eval` (and of what they do with a damaged checkpoint).

The checkpoint is written by this file run as a script (one gloo process, world size 1), so no
process group leaks into the tests:  python tests/run_fixture.py RUN_DIR MODEL_DIR STAGE
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from ranks import free_port

TEXTS = [
    "The file could not be saved.",
    "Die Datei konnte nicht gespeichert werden.",
    "Enter a valid email address.",
    "Geben Sie eine gültige E-Mail-Adresse ein.",
    "This field is required.",
    "Dieses Feld ist zwingend erforderlich.",
]
LAYERS = [1, -1]


def write_run(run_dir: Path, model_dir: str, stage: int) -> None:
    """One DeepSpeed step of an MLCTLModel, a checkpoint in the run-folder layout (complete, as
    training publishes it), and the vectors the trained in-memory model gives for TEXTS (the
    reference an export must reproduce)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import deepspeed

    from mlctl.checkpoint import CheckpointMeta, data_state_name
    from mlctl.config import Config
    from mlctl.evaluate import encode_texts
    from mlctl.hub import load_tokenizer, tokenizer_fingerprint
    from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    tok = load_tokenizer(model_dir)
    model = MLCTLModel.from_pretrained(model_dir, LAYERS)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
    )
    enc = tok(TEXTS[:4], padding=True, return_tensors="pt")  # rows: x0 x1 y0 y1
    spans = torch.tensor([[1, 1]] * 4)
    special = torch.tensor(tok.all_special_ids)
    mlm_ids, labels = mask_tokens(
        enc["input_ids"],
        enc["attention_mask"],
        special,
        tok.mask_token_id,
        len(tok),
        probability=0.3,
        generator=torch.Generator().manual_seed(0),
    )
    out = engine(EncoderInputs.build(enc["input_ids"], enc["attention_mask"], spans, mlm_ids, labels))
    engine.backward(out.fused.pow(2).mean() + out.mlm_loss)
    engine.step()

    ckpt = run_dir / "checkpoints" / "step_00000001"
    engine.save_checkpoint(str(ckpt / "engine"), tag="state")
    (ckpt / data_state_name(0)).write_text("{}")
    meta = CheckpointMeta(
        step=1,
        samples_seen=2,
        tokens_seen=0,
        restarts=0,
        model=model_dir,
        tokenizer_hash=tokenizer_fingerprint(tok),
        world_size=1,
        zero_stage=stage,
        manifest_hash="",
        config_fingerprint="",
    )
    (ckpt / "meta.json").write_text(meta.to_json())
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    cfg = Config()
    cfg.model.name_or_path = model_dir
    cfg.model.pool_layers = LAYERS
    cfg.deepspeed.zero_stage = stage
    cfg.save(run_dir / "config.yaml")
    engine.eval()
    torch.save(encode_texts(engine.module, tok, TEXTS), run_dir / "reference_vectors.pt")


def make_run(run_dir: Path, model_dir: Path, stage: int) -> Path:
    """``run_dir`` holding one complete checkpoint (step 1) of ZeRO stage ``stage``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, __file__, str(run_dir), str(model_dir), str(stage)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def add_step(run_dir: Path, step: int) -> Path:
    """A copy of the run's step-1 checkpoint published as ``step`` (meta.json and ``latest`` say so):
    a newer checkpoint to damage, with an older complete one to fall back to."""
    root = run_dir / "checkpoints"
    new = root / f"step_{step:08d}"
    shutil.copytree(root / "step_00000001", new)
    meta = json.loads((new / "meta.json").read_text())
    (new / "meta.json").write_text(json.dumps({**meta, "step": step}))
    (root / "latest").write_text(new.name + "\n")
    return new


if __name__ == "__main__":
    write_run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
