"""Training (`python -m mrrm.train`, `mrrm train`): the recipe (listwise losses over the responses of one
pass, checkpoints and resume), sharding (FSDP2, DeepSpeed), the CPU thread policy and the built-in
synthetic demo task. The recipe (and torch) load on first use of its names, so that the entry points
can set the OpenMP wait policy before torch loads (mrrm.train.threads)."""
__all__ = ["LOSSES", "TrainConfig", "main", "parse_args", "train"]


def __getattr__(name):
    if name in __all__:
        from mrrm.train import recipe  # lazy: torch loads with it, after the entry point set the OpenMP wait policy

        return getattr(recipe, name)
    raise AttributeError(f"module 'mrrm.train' has no attribute {name!r}")
