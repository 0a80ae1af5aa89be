"""Dashboard tests: helpers from ``tests/conftest.py`` (loaded as a module, as other suites do)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _root_conftest() -> Any:
    name = "_rma_root_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_root = _root_conftest()
start_coordinator: Callable[..., Any] = _root.start_coordinator
Coordinator: type = _root.Coordinator
