"""Temporary: the Task dataclass now lives in mergesmith.quality.tasks."""

from mergesmith.quality.tasks import Task  # noqa: F401
