"""The public entry points: `mrrm.load` and `mrrm.score`."""
from __future__ import annotations

import functools
import hashlib
import os

import torch

from mrrm.data.encoding import SampleError
from mrrm.model import tiny
from mrrm.model.hub import resolve, split_hub_id
from mrrm.model.parts import RewardModelConfig, verify_checkpoint
from mrrm.model.reward_model import RewardModel

DEFAULT_DESCRIPTION = ("built-in default: a RANDOM tiny Qwen2-VL-style model (untrained; hidden 64, 2 layers, "
                       "vision width 32, patch 8). Its scores carry no meaning until `python -m mrrm.train` "
                       "trains it.")
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")


def build_default_model(seed: int = 0):
    """The built-in default: shipped weights when the package has them (mrrm/model/default_model/), else a
    random tiny model built deterministically from `seed` (labelled as such in its config)."""

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
    """Load a reward model. path=None: the built-in default (cached; docs/scoring.md). Otherwise an mrrm
    checkpoint directory (RewardModel.save_pretrained), a checkpoint in the authors' layout
    (reward_model_config.json + value_head.pt + an adapter or a merged model, e.g. the released
    yinuoy/MR2-Molmo2-4B-RM), or a Hugging Face Hub id of either ("org/name", at `revision`),
    downloaded and cached by huggingface_hub (token: HF_TOKEN or `hf auth login` unless given;
    HF_HUB_OFFLINE=1 reads the cache only).

    verify=True checks every file of the checkpoint against the checksums.sha256 that save_pretrained
    writes before anything is loaded (mrrm.integrity.ChecksumError naming a damaged, missing or added
    file, or the missing manifest). Off by default: it reads every byte once more (docs/scoring.md, "Checkpoint
    integrity", has the measured cost)."""

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
    in that many worker processes (mrrm.data.pipeline)."""
    if model is None:
        model = load()
    elif isinstance(model, (str, os.PathLike)):
        model = load(model)
    return model.score(batch, mode=mode, max_batch_tokens=max_batch_tokens, permutations=permutations,
                       errors=errors, media_dir=media_dir, workers=workers)


# What the commands (and the RL reward functions) add to mrrm.load: the device default, dtype names,
# a model argument checked before anything downloads, and the identity a scoring run records.
def resolve_device(device) -> str:
    """The one device default: cuda when available, else cpu. An explicit device is checked here
    (ValueError), before any model is built."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (use cpu)")
    return str(dev)


def resolve_dtype(dtype):
    """None, a torch.dtype, or its name ('bfloat16', ...) -> None or the torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
    return getattr(torch, dtype)


def load_model(model=None, *, device=None, dtype=None, mode=None, verify: bool = False):
    """mrrm.load with the commands' defaults: the device from resolve_device, a dtype by name, and
    a clear error when `model` is neither None, a directory nor a Hub id (org/name[@revision]),
    before anything is downloaded. verify: mrrm.load's (--verify)."""

    if model is not None and not os.path.isdir(os.fspath(model)) and split_hub_id(os.fspath(model)) is None:
        raise ValueError(f"model {os.fspath(model)!r} is neither a directory (an mrrm checkpoint or the paper's "
                         "layout) nor a Hugging Face Hub id (org/name, org/name@revision)")
    return load(None if model is None else os.fspath(model), device=resolve_device(device),
                dtype=resolve_dtype(dtype), mode=mode or "joint", verify=verify)


# checkpoint_fingerprint: files up to this size are hashed whole; larger ones (the weights) by their size
# and three blocks of FINGERPRINT_BLOCK bytes (start, middle, end)
FINGERPRINT_WHOLE_BYTES = 16 * 2**20
FINGERPRINT_BLOCK = 2**20


def checkpoint_fingerprint(folder: str) -> str:
    """A cheap content fingerprint of a checkpoint folder (16 hex digits): every file's relative path and
    size, small files (configs, tokenizer, value head) hashed whole and large ones (weights) sampled at
    three places. Two different fine-tunes differ in it; it is not a checksum of every byte (a flipped
    byte in an unsampled part of the weights goes unnoticed). Hidden files and *.md are left out."""
    h = hashlib.blake2b(digest_size=8)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(".md"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            with open(path, "rb") as f:  # Hub snapshots hold links to the cache's blobs: followed
                size = os.fstat(f.fileno()).st_size
                h.update(f"{rel}\0{size}\0".encode("utf-8", "surrogateescape"))
                if size <= FINGERPRINT_WHOLE_BYTES:
                    while block := f.read(1 << 20):
                        h.update(block)
                else:
                    for at in (0, size // 2, size - FINGERPRINT_BLOCK):
                        f.seek(at)
                        h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


def model_identity(model=None) -> dict:
    """What a scoring run records about its model (python -m mrrm.score's settings record): {"model": the
    checkpoint's absolute path, "org/name@commit" for a Hub id, or "built-in default"; "model_fingerprint":
    checkpoint_fingerprint of its files}. Resolves a Hub id as loading does (the cache, or a download)."""

    if model is None:
        if os.path.isdir(DEFAULT_MODEL_DIR):
            return {"model": "built-in default", "model_fingerprint": checkpoint_fingerprint(DEFAULT_MODEL_DIR)}
        return {"model": "built-in default", "model_fingerprint": "random tiny model, seed 0"}
    spec = os.fspath(model)
    if os.path.isdir(spec):
        return {"model": os.path.abspath(spec), "model_fingerprint": checkpoint_fingerprint(spec)}
    parts = split_hub_id(spec)
    if parts is None:
        raise ValueError(f"model {spec!r} is neither a directory (an mrrm checkpoint or the paper's layout) nor a "
                         "Hugging Face Hub id (org/name, org/name@revision)")
    folder = resolve(spec)
    return {"model": f"{parts[0]}@{os.path.basename(os.path.normpath(folder))}",
            "model_fingerprint": checkpoint_fingerprint(folder)}


def skip_reason(model, sample: dict, index: int, media_dir: str) -> str:
    """Why model.score(errors='skip') skipped a sample: its encoder's complaint (the score command's and
    its Ray engine's per-sample error)."""
    encode = getattr(getattr(model, "encoder", None), "encode", None)
    if encode is None:
        return "the model skipped this sample (it gives no reason)"
    try:
        encode(sample, index, media_dir=media_dir)
    except SampleError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - reported per sample, never fatal
        return f"{type(e).__name__}: {e}"
    return "the model skipped this sample (it encodes on its own; no reason given)"
