"""mergesmith: merge fine-tuned checkpoints of one architecture into one model."""

from mergesmith.errors import MergeError
from mergesmith.merge import merge, merge_state_dicts, plan_merge
from mergesmith.methods import merge_tensors, method_names

__version__ = "0.1.0"
__all__ = ["MergeError", "merge", "merge_state_dicts", "plan_merge", "merge_tensors", "method_names"]
