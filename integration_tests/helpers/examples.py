"""Import a script from ``examples/`` as a module, so tests can call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(file_name: str) -> ModuleType:
    """The module of ``examples/<file_name>``, registered in ``sys.modules`` (dataclasses need that)."""
    path = EXAMPLES / file_name
    spec = importlib.util.spec_from_file_location(f"graftkit_example_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
