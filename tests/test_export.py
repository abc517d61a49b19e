"""`mlctl export`: real DeepSpeed checkpoints of every ZeRO stage -> a folder that AutoModel and
SentenceTransformer load, giving the vectors `mlctl eval` computes. The run folders are written by
tests/run_fixture.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_fixture import LAYERS, TEXTS, make_run

REL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[int, Path]:
    return {
        stage: make_run(tmp_path_factory.mktemp(f"run_zero{stage}"), tiny_model_dir, stage)
        for stage in (0, 1, 2, 3)
    }


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

    from launcher.cli import main
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
    from mlctl.export import load_run_model, locate_run

    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        locate_run(tmp_path)
