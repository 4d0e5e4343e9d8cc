"""mrrm: multi-response reward models. N candidate answers judged in one forward pass.

    import mrrm
    mrrm.score({"prompt": "What is shown?", "image": img, "responses": ["a cat", "a dog"]})
    model = mrrm.load(path)          # path=None: the built-in default model

The model layer (transformers, peft) is imported on first use, so `import mrrm` stays light.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .api import load, score  # noqa: E402
from .packing import PackedBatch, SampleLayout, pack, pack_micro_batches, split_scores  # noqa: E402


def __getattr__(name):  # lazy: RewardModel pulls in transformers
    if name == "RewardModel":
        from .model import RewardModel
        return RewardModel
    if name == "RewardModelConfig":
        from .model import RewardModelConfig
        return RewardModelConfig
    raise AttributeError(f"module 'mrrm' has no attribute {name!r}")


__all__ = ["ops", "reference", "load", "score", "RewardModel", "RewardModelConfig", "PackedBatch", "SampleLayout",
           "pack", "pack_micro_batches", "split_scores"]
