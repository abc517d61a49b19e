"""`mlctl export`: real DeepSpeed checkpoints of every ZeRO stage -> a folder that AutoModel and
SentenceTransformer load, giving the vectors `mlctl eval` computes.

The checkpoints are written by this file run as a script (one gloo process, world size 1), so no
process group leaks into the other tests:  python tests/test_export.py RUN_DIR MODEL_DIR STAGE
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXTS = [
    "The file could not be saved.",
    "Die Datei konnte nicht gespeichert werden.",
    "Enter a valid email address.",
    "Geben Sie eine gültige E-Mail-Adresse ein.",
    "This field is required.",
    "Dieses Feld ist zwingend erforderlich.",
]
LAYERS = [1, -1]
REL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- the checkpoint writer (runs in a child process) --------------------------------------------


def write_run(run_dir: Path, model_dir: str, stage: int) -> None:
    """One DeepSpeed step of an MLCTLModel, a checkpoint in the run-folder layout, and the vectors
    the trained in-memory model gives for TEXTS (the reference the export must reproduce)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import deepspeed

    from mlctl.config import Config
    from mlctl.evaluate import encode_texts
    from mlctl.hub import load_tokenizer
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
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "zero_stage": stage}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    cfg = Config()
    cfg.model.name_or_path = model_dir
    cfg.model.pool_layers = LAYERS
    cfg.deepspeed.zero_stage = stage
    cfg.save(run_dir / "config.yaml")
    engine.eval()
    torch.save(encode_texts(engine.module, tok, TEXTS), run_dir / "reference_vectors.pt")


# ---- tests ---------------------------------------------------------------------------------------


def _make_run(tmp_path_factory, model_dir: Path, stage: int) -> Path:
    run_dir = tmp_path_factory.mktemp(f"run_zero{stage}")
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[int, Path]:
    return {stage: _make_run(tmp_path_factory, tiny_model_dir, stage) for stage in (0, 1, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_load_run_model_gives_the_trained_vectors(runs, stage, tiny_model_dir):
    from mlctl.evaluate import encode_texts
    from mlctl.export import load_run_model
    from mlctl.model import MLCTLModel

    model, tok, cfg = load_run_model(runs[stage])
    assert cfg.deepspeed.zero_stage == stage and model.pool_layers == [1, 2]
    ref = torch.load(runs[stage] / "reference_vectors.pt")
    got = encode_texts(model, tok, TEXTS)
    assert _rel(got, ref) < REL
    untrained = encode_texts(MLCTLModel.from_pretrained(str(tiny_model_dir), LAYERS).eval(), tok, TEXTS)
    assert _rel(untrained, ref) > 1e-3  # the step did move the weights, so the check above means something


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_export_round_trip_autmodel_sentence_transformers_and_eval(runs, stage, tmp_path, data_dir, capsys):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from mlctl.cli import main
    from mlctl.evaluate import load_encoder
    from mlctl.model import pool_layers

    out = tmp_path / "exported"
    assert main(["export", str(runs[stage]), str(out)]) == 0
    meta = json.loads((out / "mlctl_export.json").read_text())
    assert meta["pool_layers"] == [1, 2] and meta["step"] == 1 and meta["checkpoint"] == "step_00000001"
    assert (out / "modules.json").is_file() and (out / "model.safetensors").is_file()
    ref = torch.load(runs[stage] / "reference_vectors.pt")

    st = SentenceTransformer(str(out), device="cpu")
    st_vecs = torch.as_tensor(st.encode(TEXTS, batch_size=4, convert_to_tensor=True))
    assert _rel(st_vecs, ref) < REL

    from mlctl.hub import load_tokenizer

    tok = load_tokenizer(str(out))
    auto = AutoModel.from_pretrained(str(out)).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = auto(**enc, output_hidden_states=True).hidden_states
    assert _rel(pool_layers(hs, [1, 2], enc["attention_mask"].bool()), ref) < REL

    model, _, _ = load_encoder(str(out))  # what `mlctl eval --model OUT` uses: pooling from mlctl_export.json
    assert model.pool_layers == [1, 2]
    pairs = data_dir / "pairs.en-de.tsv"
    report_run, report_exp = tmp_path / "run.json", tmp_path / "exp.json"
    for model_arg, report in ((runs[stage], report_run), (out, report_exp)):
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(model_arg),
                    "--pairs",
                    str(pairs),
                    "--max-pairs",
                    "50",
                    "--out",
                    str(report),
                    "--no-progress",
                ]
            )
            == 0
        )
    a, b = (json.loads(p.read_text())["files"][str(pairs)] for p in (report_run, report_exp))
    assert a["retrieval"] == b["retrieval"] and a["mining"]["f1"] == b["mining"]["f1"]
    assert main(["export", str(runs[stage]), str(out)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


def test_export_last_layer_only_uses_the_stock_pooling(tiny_model_dir, tiny_tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mlctl.evaluate import encode_texts
    from mlctl.export import export_encoder
    from mlctl.model import MLCTLModel

    model = MLCTLModel.from_pretrained(str(tiny_model_dir), [-1]).eval()
    out = export_encoder(model, tiny_tokenizer, tmp_path / "last")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling"]
    assert not json.loads((out / "config.json").read_text()).get("output_hidden_states")
    st = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(st.encode(TEXTS, convert_to_tensor=True))
    assert _rel(got, encode_texts(model, tiny_tokenizer, TEXTS)) < REL


def test_export_averaged_layers_without_remote_code(tiny_model_dir, tiny_tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mlctl.evaluate import encode_texts
    from mlctl.export import export_encoder
    from mlctl.model import MLCTLModel

    model = MLCTLModel.from_pretrained(str(tiny_model_dir), LAYERS).eval()
    out = export_encoder(model, tiny_tokenizer, tmp_path / "avg", {"note": "fresh"})
    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert all(t.startswith("sentence_transformers.") for t in types), types
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=False)
    got = torch.as_tensor(st.encode(TEXTS, batch_size=2, convert_to_tensor=True))
    assert _rel(got, encode_texts(model, tiny_tokenizer, TEXTS)) < REL
    assert json.loads((out / "mlctl_export.json").read_text())["note"] == "fresh"


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    from mlctl.export import find_checkpoint, load_run_model

    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="latest is missing"):
        find_checkpoint(tmp_path)


if __name__ == "__main__":
    write_run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
