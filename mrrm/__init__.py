"""mrrm: multi-response reward models. N candidate answers judged in one forward pass."""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .packing import PackedBatch, SampleLayout, pack, pack_micro_batches, split_scores  # noqa: E402

__all__ = ["ops", "reference", "PackedBatch", "SampleLayout", "pack", "pack_micro_batches", "split_scores"]
