"""Merge methods: pure tensor functions, registered with their parameters (see registry.py)."""

from mergesmith.methods import curvature, entrywise, geometric, subspace, task_arithmetic  # noqa: F401  (registers the methods)
from mergesmith.methods.registry import MergeMethod, Param, get_method, merge_tensors, method_names, register

__all__ = ["MergeMethod", "Param", "get_method", "merge_tensors", "method_names", "register"]
