"""The data path up to the model: records (preference files -> samples), media (images and videos,
decoded within budgets), encoding (a sample -> token ids and score positions), packing (samples ->
one packed stream) and pipeline (encoding in worker processes ahead of the model)."""
from mrrm.data.records import BadRecord, check_rankings, iter_jsonl, iter_records, load_records, normalize

__all__ = ["BadRecord", "check_rankings", "iter_jsonl", "iter_records", "load_records", "normalize"]
