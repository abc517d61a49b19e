"""The `mlctl` console script lists every verb, each with its own help."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import cli

ROOT = Path(__file__).resolve().parent.parent


def _module_file_exists(module: str) -> bool:
    """Independent of importlib: is there a source file (or package) for ``module`` in the repo?"""
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _console_script() -> str:
    script = Path(sys.executable).parent / "mlctl"
    if script.is_file():
        return str(script)
    found = shutil.which("mlctl")
    if found is None:
        pytest.skip("the mlctl console script is not installed (pip install -e .)")
    return found


def _listed_verbs(help_text: str) -> set[str]:
    # argparse prints each verb indented under the VERB heading, followed by its help line.
    section = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return set(re.findall(r"^ {4}(\w+)\s", section, flags=re.M))


def test_console_script_help_lists_existing_verbs():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    listed = _listed_verbs(proc.stdout)
    expected = {verb for verb, (module, _) in cli.VERBS.items() if _module_file_exists(module)}
    assert expected, "no verb module exists at all"
    assert listed == expected
    for verb in expected:
        assert cli.VERBS[verb][1].split()[0] in proc.stdout  # with its help line
    assert "Align multilingual text encoders" in proc.stdout


def test_every_verb_module_exists():
    assert all(_module_file_exists(module) for module, _ in cli.VERBS.values())


def test_no_verb_and_unknown_verb(capsys):
    assert cli.main([]) == 2
    assert "usage: mlctl" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-verb"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'no-such-verb'" in capsys.readouterr().err


def test_every_verb_has_its_own_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, (module, helptext) in cli.VERBS.items():
        text = sub.choices[verb].format_help()
        assert text.startswith(f"usage: mlctl {verb}")
        assert helptext in " ".join(text.split())
        mod = sys.modules[module]
        assert callable(mod.add_arguments) and callable(mod.run), module
