"""mergesmith: merge fine-tuned checkpoints of one architecture into one model.

The public names load on first use (PEP 562), so that ``mergesmith --help``, a recipe error and the CLI's
signal handling do not wait for ``import torch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergesmith.errors import MergeError

__version__ = "0.1.0"
__all__ = ["MergeError", "merge", "merge_state_dicts", "plan_merge", "predict_damage", "merge_tensors",
           "method_names", "measure_checkpoint"]

_LAZY = {"merge": "mergesmith.api", "merge_state_dicts": "mergesmith.api", "plan_merge": "mergesmith.api",
         "predict_damage": "mergesmith.api",
         "merge_tensors": "mergesmith.methods", "method_names": "mergesmith.methods",
         "measure_checkpoint": "mergesmith.measure.checkpoint"}

if TYPE_CHECKING:
    from mergesmith.api import merge, merge_state_dicts, plan_merge, predict_damage
    from mergesmith.measure.checkpoint import measure_checkpoint
    from mergesmith.methods import merge_tensors, method_names


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mergesmith' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value
