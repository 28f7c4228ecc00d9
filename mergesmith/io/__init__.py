"""Files: checkpoint reading, the sharded atomic writer and the model card. Knows nothing of methods."""

from mergesmith.io.checkpoint import CheckpointReader, StateDictReader, TensorSource
from mergesmith.io.writer import OutputTensor, ShardedWriter, atomic_output_dir

__all__ = ["CheckpointReader", "StateDictReader", "TensorSource", "OutputTensor", "ShardedWriter", "atomic_output_dir"]
