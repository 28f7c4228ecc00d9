"""Files: checkpoint reading, the sharded atomic writer and the model card. Knows nothing of methods."""

from mergesmith.io.checkpoint import CheckpointReader, StateDictReader, TensorSource
from mergesmith.io.writer import ShardedWriter, atomic_output_dir

__all__ = ["CheckpointReader", "StateDictReader", "TensorSource", "ShardedWriter", "atomic_output_dir"]
