"""The public face: what ``import workerkit`` offers is declared, and every module declares too."""

from __future__ import annotations

import importlib
import pkgutil

import workerkit


def test_every_public_name_is_declared_in_all() -> None:
    public = {name for name in vars(workerkit) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(workerkit, name)).__name__ == "module"}
    assert public - modules == set(workerkit.__all__) - {"__version__"}


def test_every_module_declares_a_tuple_all_that_exists() -> None:
    for info in pkgutil.walk_packages(workerkit.__path__, "workerkit."):
        if ".migrations" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        declared = getattr(module, "__all__", None)
        assert isinstance(declared, tuple), f"{info.name} has no tuple __all__"
        for name in declared:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name!r}"
