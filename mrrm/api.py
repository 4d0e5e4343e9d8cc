"""The public entry points: `mrrm.load` and `mrrm.score`."""
from __future__ import annotations

import functools
import os

import torch

DEFAULT_DESCRIPTION = ("built-in default: a RANDOM tiny Qwen2-VL-style model (untrained; hidden 64, 2 layers, "
                       "vision width 32, patch 8). Its scores carry no meaning until `python -m mrrm.train` "
                       "trains it.")
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")


def build_default_model(seed: int = 0):
    """The built-in default: shipped weights when the package has them (mrrm/default_model/), else a
    random tiny model built deterministically from `seed` (labelled as such in its config)."""
    from . import tiny
    from .model import RewardModel, RewardModelConfig

    if os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "mrrm_config.json")):
        return RewardModel.from_pretrained(DEFAULT_MODEL_DIR)
    tok = tiny.build_tokenizer()
    cfg = tiny.build_config("qwen2_vl", tokenizer=tok)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        backbone = tiny.build_backbone(cfg)
        proc = tiny.build_processor("qwen2_vl", tok)
        model = RewardModel(backbone, tok, proc, RewardModelConfig(description=DEFAULT_DESCRIPTION,
                                                                   max_length=4096, max_batch_tokens=8192))
    return model.eval()


@functools.lru_cache(maxsize=4)
def _cached_default(device: str | None, dtype: torch.dtype | None, mode: str):
    model = build_default_model()
    model.config.mode = mode
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def load(path=None, *, device=None, dtype=None, mode: str = "joint", revision: str | None = None, token=None,
         verify: bool = False):
    """Load a reward model. path=None: the built-in default (cached; see README). Otherwise an mrrm
    checkpoint directory (RewardModel.save_pretrained), a checkpoint in the authors' layout
    (reward_model_config.json + value_head.pt + an adapter or a merged model, e.g. the released
    yinuoy/MR2-Molmo2-4B-RM), or a Hugging Face Hub id of either ("org/name", at `revision`),
    downloaded and cached by huggingface_hub (token: HF_TOKEN or `hf auth login` unless given;
    HF_HUB_OFFLINE=1 reads the cache only).

    verify=True checks every file of the checkpoint against the checksums.sha256 that save_pretrained
    writes before anything is loaded (mrrm.integrity.ChecksumError naming a damaged, missing or added
    file, or the missing manifest). Off by default: it reads every byte once more (README, "Checkpoint
    integrity", has the measured cost)."""
    from .hub import resolve
    from .model import RewardModel, RewardModelConfig, verify_checkpoint

    RewardModelConfig(mode=mode)  # validates the mode
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}")
    if path is None:
        if revision is not None:
            raise ValueError("revision= applies to a Hub id; the built-in default has none")
        if verify:
            if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "mrrm_config.json")):
                raise ValueError("verify=True: this install has no shipped default model files to verify (the "
                                 "built-in default is then built in memory)")
            verify_checkpoint(DEFAULT_MODEL_DIR)
        return _cached_default(str(device) if device is not None else None, dtype, mode)
    return RewardModel.from_pretrained(resolve(path, revision=revision, token=token), device=device, dtype=dtype,
                                       mode=mode, verify=verify)


def score(batch, model=None, *, mode=None, max_batch_tokens=None, permutations=1, errors="raise", media_dir=None,
          workers=0):
    """Score every response of every sample -> list[list[float]] (see RewardModel.score).

    batch: one sample dict or a list in the published schema ({"prompt", "responses", optional
    "image"/"images"/"video"/"videos", "id"}); model: a RewardModel or a checkpoint path (default:
    the built-in default model); media_dir: base directory of relative media paths; workers: encode
    in that many worker processes (mrrm.pipeline)."""
    if model is None:
        model = load()
    elif isinstance(model, (str, os.PathLike)):
        model = load(model)
    return model.score(batch, mode=mode, max_batch_tokens=max_batch_tokens, permutations=permutations,
                       errors=errors, media_dir=media_dir, workers=workers)
