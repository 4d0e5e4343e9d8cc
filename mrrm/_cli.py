"""What the command-line tools (and the RL reward functions) share: argument types, the model
arguments with their one set of defaults, and loading a model from them."""
from __future__ import annotations

import argparse
import os

from .common import MODES, check_positive

DTYPES = ("float32", "bfloat16", "float16")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_workers_arg(ap: argparse.ArgumentParser) -> None:
    """--workers N (score, eval): encoding in worker processes ahead of the model (mrrm.pipeline)."""
    ap.add_argument("--workers", type=non_negative_int, default=0,
                    help="encode (tokenize, decode media) in N worker processes ahead of the model (default 0: "
                         "in this process); pays with the model on a GPU and spare CPU cores")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model, --mode, --max-batch-tokens, --device, --dtype, --verify: the same flags, defaults and help
    in every command that scores (score, eval, serve); load_model(..., verify=args.verify) honours --verify."""
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (mrrm or the paper's layout) or Hugging Face Hub id (org/name, "
                         "org/name@revision); default: the built-in default model")
    ap.add_argument("--mode", choices=MODES, default=None, help="scoring mode (default: the model's, joint)")
    ap.add_argument("--max-batch-tokens", type=positive_int, default=None,
                    help="token budget of one packed forward pass (default: the model's)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: as loaded)")
    ap.add_argument("--verify", action="store_true",
                    help="check every file of the checkpoint against the checksums.sha256 that save_pretrained "
                         "writes before loading (a damaged or changed file is an error naming it); off by default: "
                         "it reads every byte once more")


def resolve_device(device) -> str:
    """The one device default: cuda when available, else cpu. An explicit device is checked here
    (ValueError), before any model is built."""
    import torch

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
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
    return getattr(torch, dtype)


def load_model(model=None, *, device=None, dtype=None, mode=None, verify: bool = False):
    """mrrm.load with the commands' defaults: the device from resolve_device, a dtype by name, and
    a clear error when `model` is neither None, a directory nor a Hub id (org/name[@revision]),
    before anything is downloaded. verify: mrrm.load's (--verify)."""
    from .api import load
    from .hub import split_hub_id

    if model is not None and not os.path.isdir(os.fspath(model)) and split_hub_id(os.fspath(model)) is None:
        raise ValueError(f"model {os.fspath(model)!r} is neither a directory (an mrrm checkpoint or the paper's "
                         "layout) nor a Hugging Face Hub id (org/name, org/name@revision)")
    return load(None if model is None else os.fspath(model), device=resolve_device(device),
                dtype=resolve_dtype(dtype), mode=mode or "joint", verify=verify)


# flag -> (mrrm.media constant, the flag's unit in that constant's units)
MEDIA_BUDGETS = {
    "max_image_megapixels": ("MAX_IMAGE_PIXELS", 1e6),
    "max_video_frame_megapixels": ("MAX_VIDEO_FRAME_PIXELS", 1e6),
    "max_video_megapixels": ("MAX_VIDEO_DECODED_PIXELS", 1e6),
    "max_images_per_sample": ("MAX_IMAGES_PER_SAMPLE", 1),
    "max_videos_per_sample": ("MAX_VIDEOS_PER_SAMPLE", 1),
    "max_sample_megapixels": ("MAX_SAMPLE_DECODED_PIXELS", 1e6),
}


def add_media_budget_args(ap: argparse.ArgumentParser) -> None:
    """--max-image-megapixels ... --max-videos-per-sample: the media budgets of mrrm.media (checked
    before decoding), the same flags in every command that reads media."""
    from . import media

    for flag, (const, unit) in MEDIA_BUDGETS.items():
        default = getattr(media, const) / unit
        ap.add_argument("--" + flag.replace("_", "-"), type=float, default=None,
                        help=f"media budget, checked before decoding (default {default:g})")


def current_media_budgets() -> dict:
    """mrrm.media's budgets now, as flag values: what another process (encoding workers, Ray actors)
    applies with `apply_media_budgets` (module constants do not travel between processes)."""
    from . import media

    return {flag: getattr(media, const) / unit for flag, (const, unit) in MEDIA_BUDGETS.items()}


def apply_media_budgets(values) -> None:
    """Set mrrm.media's budgets from parsed flags (a dict or argparse namespace; None = keep)."""
    from . import media

    values = vars(values) if isinstance(values, argparse.Namespace) else values
    for flag, (const, unit) in MEDIA_BUDGETS.items():
        v = values.get(flag)
        if v is None:
            continue
        check_positive("--" + flag.replace("_", "-"), v)
        if unit == 1 and v != int(v):
            raise ValueError(f"--{flag.replace('_', '-')} must be a whole number, got {v!r}")
        setattr(media, const, int(v * unit))
