"""workerkit.loading: the ``MODULE:ATTRIBUTE`` strings of ``--app`` and ``WORKERKIT_APP``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import workerkit
from workerkit.errors import AppImportError, ConfigurationError
from workerkit.loading import find_app, import_app


def test_a_module_attribute_is_imported() -> None:
    # Looked up afresh: the golden test re-imports tests.apps.golden_apps on purpose.
    app = import_app("tests.apps.golden_apps:docs_app")
    assert app is importlib.import_module("tests.apps.golden_apps").docs_app
    assert isinstance(app, workerkit.App)


def test_a_dotted_attribute_is_followed() -> None:
    assert import_app("tests.apps.golden_apps:docs_app.__class__") is workerkit.App


@pytest.mark.parametrize("spec", ["tests.apps.golden_apps", ":app", "tests.apps.golden_apps:"])
def test_a_spec_without_module_and_attribute_is_refused(spec: str) -> None:
    with pytest.raises(AppImportError, match="must look like MODULE:ATTRIBUTE"):
        import_app(spec)


def test_a_missing_module_or_attribute_says_which() -> None:
    with pytest.raises(AppImportError, match=r"no module named 'tests\.apps\.nothing_here'"):
        import_app("tests.apps.nothing_here:app")
    with pytest.raises(AppImportError, match="has no attribute 'no_app'"):
        import_app("tests.apps.golden_apps:no_app")


def test_the_error_is_a_configuration_error() -> None:
    # The CLI turns configuration errors into its CONFIG_ERROR exit code.
    with pytest.raises(ConfigurationError):
        import_app("nope")


def test_the_working_directory_is_searched_like_celery_a_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "loading_probe_tasks.py").write_text("app = object()\nname = 'probe'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "loading_probe_tasks", raising=False)
    try:
        assert import_app("loading_probe_tasks:name") == "probe"
    finally:
        sys.modules.pop("loading_probe_tasks", None)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with a package ``lproj`` whose ``celery`` submodule defines ``app``."""
    (tmp_path / "lproj").mkdir()
    (tmp_path / "lproj" / "__init__.py").write_text("")
    (tmp_path / "lproj" / "celery.py").write_text("class App: ...\n\napp = App()\n")
    (tmp_path / "lproj_broken.py").write_text("import os\n\nURL = os.environ['LPROJ_UNSET']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("lproj")]:
        del sys.modules[name]


@pytest.mark.parametrize("spec", ["lproj", "lproj.celery", "lproj.celery.app", "lproj.celery:app"])
def test_find_app_takes_what_celery_a_takes(project: Path, spec: str) -> None:
    del project
    found = find_app(spec, object)
    assert found is sys.modules["lproj.celery"].app


def test_any_exception_at_import_is_one_line_saying_what_and_where(project: Path) -> None:
    del project
    with pytest.raises(AppImportError) as raised:
        import_app("lproj_broken:app")
    message = str(raised.value)
    assert "\n" not in message
    assert "KeyError: 'LPROJ_UNSET'" in message
    assert "at lproj_broken.py:3" in message
