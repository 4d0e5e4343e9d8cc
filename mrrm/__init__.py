"""mrrm: multi-response reward models. N candidate answers judged in one forward pass.

    import mrrm
    mrrm.score({"prompt": "What is shown?", "image": img, "responses": ["a cat", "a dog"]})
    model = mrrm.load(path)          # path=None: the built-in default model

The package follows the data path (docs/layout.md): mrrm.data (media, encoding, packing, records,
pipeline) -> mrrm.model (the reward model, backbones, checkpoints) -> mrrm.ops (the ops and their
dispatch) -> mrrm.kernels (Triton, the repository's top-level kernels/ folder) and mrrm._C (C++/CUDA);
the jobs on top: mrrm.train, mrrm.eval, mrrm.rl, mrrm.cli. Everything below is imported on first use,
so `import mrrm` stays light (no torch, no transformers).
"""
import importlib
import os
import sys

__version__ = "0.1.0"


def _mount_kernels() -> None:
    """mrrm.kernels is the repository's top-level kernels/ folder (no __init__.py, so it never shadows
    Hugging Face's `kernels` package from the repository root). A wheel installs it as kernels/;
    from a checkout or an editable install it is mounted here as the namespace package mrrm.kernels."""
    if "mrrm.kernels" in sys.modules or os.path.isdir(os.path.join(__path__[0], "kernels")):
        return
    folder = os.path.join(os.path.dirname(__path__[0]), "kernels")
    if os.path.isfile(os.path.join(folder, "varlen_attention.py")):
        spec = importlib.machinery.ModuleSpec("mrrm.kernels", None, is_package=True)
        spec.submodule_search_locations = [folder]
        module = importlib.util.module_from_spec(spec)
        sys.modules["mrrm.kernels"] = module


_mount_kernels()


class _TorchBeforeExtension:
    """mrrm._C links against torch's shared libraries (libc10, libtorch): torch must be loaded before it. The
    package no longer imports torch itself, so this finder imports it when mrrm._C is first asked for, then
    leaves finding the extension to the usual finders."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname == "mrrm._C":
            import torch  # noqa: F401  (heavy: only when the extension is imported)
        return None


sys.meta_path.insert(0, _TorchBeforeExtension)

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "load": "mrrm.model.api",
    "score": "mrrm.model.api",
    "RewardModel": "mrrm.model.reward_model",
    "RewardModelConfig": "mrrm.model.parts",
    "PackedBatch": "mrrm.data.packing",
    "SampleLayout": "mrrm.data.packing",
    "pack": "mrrm.data.packing",
    "pack_micro_batches": "mrrm.data.packing",
    "split_scores": "mrrm.data.packing",
}
_SUBMODULES = ("ops", "errors", "data", "model", "train", "eval", "rl", "cli", "kernels",
               "serve", "grpo", "prefgraph", "flops", "demo", "tour")  # the last six: command entry points


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"mrrm.{name}")
    elif name == "oracle":
        value = importlib.import_module("mrrm.ops.oracle")
    else:
        errors = importlib.import_module("mrrm.errors")
        if name not in errors.__all__:
            raise AttributeError(f"module 'mrrm' has no attribute {name!r}")
        value = getattr(errors, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["load", "score", "RewardModel", "RewardModelConfig", "PackedBatch", "SampleLayout", "pack",
           "pack_micro_batches", "split_scores", "ops", "errors", "MrrmError"]
