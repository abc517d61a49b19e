"""The docs: the MkDocs site builds in strict mode (a broken link or anchor fails it), its
configuration page lists every config key, and the README stays short with working links."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlctl.config_reference import rows

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of the repository's site into a temp folder (mkdocs is in the dev
    extra; a missing mkdocs fails here rather than skipping, so CI cannot lose the docs check)."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_in_strict_mode(site):
    assert (site / "index.html").is_file()
    assert (site / "bench" / "RESULTS" / "index.html").is_file(), "bench/RESULTS.md is a page of the site"
    assert not (site / "hooks.py").exists(), "the hook is not published"


def test_configuration_page_lists_every_key(site):
    page = html.unescape((site / "configuration" / "index.html").read_text(encoding="utf-8"))
    assert "mlctl:config-reference" not in page, "the marker was not replaced"
    missing = [key for key, *_ in rows() if f"<code>{key}</code>" not in page]
    assert not missing, f"keys missing from the configuration page: {missing}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short_and_its_relative_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    broken = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to missing files: {broken}"
