"""MkDocs hooks (mkdocs.yml `hooks:`): repository files the docs link to become site pages.

docs/ links to a few files outside it (bench/README.md and its results, examples/*/README.md),
links that work on a repository browser. The site serves those files under ``repo/`` and rewrites
each link that leaves docs/ to the served copy, so MkDocs validates it like any other; a link that
leaves docs/ for a file the site does not serve is a warning, which fails the strict build.
The docstrings' Sphinx roles (``:class:`~workerkit.App```), which mkdocstrings shows as text,
become plain code on the API page.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mkdocs.structure.files import File

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

__all__ = ("SERVED", "on_files", "on_page_content", "on_page_markdown")

#: Repository files (globs, relative to the root) the site serves under ``repo/``.
SERVED = (
    "bench/README.md",
    "bench/results/*.md",
    "bench/results/*.png",
    "examples/*/README.md",
)

_PREFIX = "repo"
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]+)</code>")
log = logging.getLogger("mkdocs.plugins.workerkit")


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = _root(config)
    for pattern in SERVED:
        for path in sorted(root.glob(pattern)):
            uri = f"{_PREFIX}/{path.relative_to(root).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    root = _root(config)
    docs = Path(config.docs_dir).resolve()
    source = Path(page.file.abs_src_path or docs / page.file.src_uri).resolve()

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        path, _, anchor = target.partition("#")
        if not path or "://" in path or path.startswith(("mailto:", "/")):
            return match.group(0)
        resolved = (source.parent / path).resolve()
        if not resolved.is_relative_to(root) or (
            resolved.is_relative_to(docs) and source.is_relative_to(docs)
        ):
            return match.group(0)
        if resolved.is_dir():
            resolved /= "index.md" if resolved.is_relative_to(docs) else "README.md"
        if resolved.is_relative_to(docs):  # a served repository file's link back into docs/
            uri = resolved.relative_to(docs).as_posix()
        else:
            uri = f"{_PREFIX}/{resolved.relative_to(root).as_posix()}"
        if files.get_file_from_path(uri) is None:
            log.warning(
                "%s links to %s, outside docs/ and not served by the site: link to a page, "
                "or add the file to SERVED in scripts/mkdocs_hooks.py",
                page.file.src_uri,
                target,
            )
            return match.group(0)
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri))
        return f"{match.group(1)}{relative}{'#' + anchor if anchor else ''}{match.group(3)}"

    return _LINK.sub(rewrite, markdown)


def _plain_role(match: re.Match[str]) -> str:
    shortened, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if shortened else target}</code>"


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return _ROLE.sub(_plain_role, html)
