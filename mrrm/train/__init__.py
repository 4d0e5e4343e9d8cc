"""Training (`python -m mrrm.train`, `mrrm train`): the recipe (listwise losses over the responses of one
pass, checkpoints and resume), sharding (FSDP2, DeepSpeed) and the built-in synthetic demo task."""
from mrrm.train.recipe import LOSSES, TrainConfig, main, parse_args, train

__all__ = ["LOSSES", "TrainConfig", "main", "parse_args", "train"]
