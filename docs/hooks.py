"""MkDocs hooks of the mlctl site (``hooks:`` in mkdocs.yml).

- The configuration page is generated: the marker in docs/configuration.md is replaced by
  :func:`mlctl.config_reference.reference_markdown`, read from the config dataclasses at build time.
- ``bench/RESULTS.md`` lives beside the benchmarks, outside docs/, and is a page of the site too.
- Pages link to each other as files in the repository (``../bench/RESULTS.md#...`` from docs/,
  ``../docs/training.md`` from bench/), so the links work on a forge's file view as well; they are
  rewritten here to the site's layout before MkDocs checks them, and a link that points nowhere
  still fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
# NOTE: MkDocs imports this file by path; mlctl is imported from the checkout it documents, not from
# whatever mlctl the environment has installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- mlctl:config-reference -->"
# repository path -> the page's path in the site (docs/ files map to themselves)
EXTRA_PAGES = {"bench/RESULTS.md": "bench/RESULTS.md"}
LINK = re.compile(r"\]\(([^)\s#]+\.md)(#[^)\s]*)?\)")


def on_files(files, config):
    for repo_path, site_path in EXTRA_PAGES.items():
        files.append(File.generated(config, site_path, abs_src_path=str(ROOT / repo_path)))
    return files


def _repo_path(src_uri: str) -> str:
    for repo_path, site_path in EXTRA_PAGES.items():
        if site_path == src_uri:
            return repo_path
    return f"docs/{src_uri}"


def _site_path(repo_path: str) -> str | None:
    if repo_path in EXTRA_PAGES:
        return EXTRA_PAGES[repo_path]
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    return None


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    if src == "configuration.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/configuration.md lost its marker {MARKER}")
        from mlctl.config_reference import reference_markdown

        markdown = markdown.replace(MARKER, reference_markdown())
    here = posixpath.dirname(_repo_path(src))

    def rewrite(m: re.Match) -> str:
        target, anchor = m.group(1), m.group(2) or ""
        if "://" in target:
            return m.group(0)
        site = _site_path(posixpath.normpath(posixpath.join(here, target)))
        if site is None:
            return m.group(0)  # MkDocs reports it if it points nowhere
        return f"]({posixpath.relpath(site, posixpath.dirname(src) or '.')}{anchor})"

    return LINK.sub(rewrite, markdown)
