"""``torch = lazy_import("torch")``: a module that loads at its first attribute access.

The method declarations and the recipe reader bind torch this way, so that ``mergesmith methods`` and a
recipe's error reach the user without the second ``import torch`` costs (docs/benchmarks.md, "Start-up"); a
merge loads it at its first tensor operation. Once loaded, the object is the module itself (the standard
library's ``importlib.util.LazyLoader`` swaps its class), so later calls cost nothing extra.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()


def lazy_import(name: str) -> ModuleType:
    """``name``'s module: the loaded one if anything imported it already, else one that loads on first use
    (and is in ``sys.modules``, so an ``import`` of it elsewhere loads and returns the same object)."""
    with _LOCK:
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
