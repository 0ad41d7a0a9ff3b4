"""The documentation site builds: ``mkdocs build --strict``, offline, every link and anchor checked.

mkdocs.yml turns every link, anchor and nav problem into a warning and ``strict`` makes a warning
fail the build; this test runs that build into a temporary directory and also checks what strict
mode cannot: that the built pages load nothing from the network, and that the Python API page
documents exactly the public API that tests/unit/test_public_api.py pins.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import workerkit
from tests.unit.test_public_api import PUBLIC_API

ROOT = Path(__file__).resolve().parents[2]
API_PAGE = ROOT / "docs" / "reference" / "api.md"
#: A script, stylesheet, image or frame the browser would fetch from another host.
EXTERNAL_ASSET = re.compile(
    r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=\"(?:https?:)?//"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",  # Material's end-of-life banner, not a warning of ours
        # No network: proxies that lead nowhere, so a plugin that fetches would fail the build.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, result.stderr
    assert problems == [], result.stderr
    return site_dir


def test_the_site_builds_strict_with_every_page_in_the_nav(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "search" / "search_index.json").is_file()
    assert (site / "reference" / "api" / "index.html").is_file()


def test_the_api_page_shows_no_raw_sphinx_roles(site: Path) -> None:
    html = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert re.findall(r":(?:class|func|meth|mod|attr|exc):<code>", html) == []
    assert "<code>InMemoryQueue</code>" in html  # :class:`~workerkit.testing.InMemoryQueue`


def test_the_built_pages_load_nothing_from_the_network(site: Path) -> None:
    offenders = {
        str(page.relative_to(site)): EXTERNAL_ASSET.findall(page.read_text(encoding="utf-8"))
        for page in site.rglob("*.html")
    }
    assert {page: found for page, found in offenders.items() if found} == {}


def test_the_config_checks_every_link_and_anchor() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # noqa: S506
    assert config["strict"] == "true"
    assert config["theme"]["font"] == "false"
    assert config["validation"]["links"] == {
        "not_found": "warn",
        "anchors": "warn",
        "absolute_links": "warn",
        "unrecognized_links": "warn",
    }
    assert config["validation"]["omitted_files"] == "warn"  # a page missing from the nav fails


def _documented() -> dict[str, set[str]]:
    """module -> the names the API page documents (``::: module`` and its ``members:``)."""
    documented: dict[str, set[str]] = {}
    module = ""
    for line in API_PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("::: "):
            module = line.removeprefix("::: ").strip()
            documented[module] = set()
        elif module and line.strip().startswith("- "):
            documented[module].add(line.strip().removeprefix("- "))
    return documented


def test_the_api_page_documents_the_public_api_and_nothing_else() -> None:
    top = [getattr(workerkit, name) for name in workerkit.__all__]
    expected: dict[str, set[str]] = {"workerkit": set()}  # ::: workerkit renders its __all__
    for module_name, names in PUBLIC_API.items():
        if module_name == "workerkit":
            continue
        module = importlib.import_module(module_name)
        rest = {name for name in names if not any(getattr(module, name) is obj for obj in top)}
        if rest:
            expected[module_name] = rest
    assert _documented() == expected


def test_the_readme_links_resolve() -> None:
    """README.md is not a page of the site (docs/index.md is): its relative links, checked here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", readme)
    relative = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert relative
    assert [t for t in relative if not (ROOT / t).exists()] == []
