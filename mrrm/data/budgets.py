"""The media budgets of mrrm.data.media as command-line flags, the same in every command that reads media."""
from __future__ import annotations

import argparse

from mrrm.common import check_positive
from mrrm.data import media

# flag -> (mrrm.data.media constant, the flag's unit in that constant's units)
MEDIA_BUDGETS = {
    "max_image_megapixels": ("MAX_IMAGE_PIXELS", 1e6),
    "max_video_frame_megapixels": ("MAX_VIDEO_FRAME_PIXELS", 1e6),
    "max_video_megapixels": ("MAX_VIDEO_DECODED_PIXELS", 1e6),
    "max_images_per_sample": ("MAX_IMAGES_PER_SAMPLE", 1),
    "max_videos_per_sample": ("MAX_VIDEOS_PER_SAMPLE", 1),
    "max_sample_megapixels": ("MAX_SAMPLE_DECODED_PIXELS", 1e6),
}


def add_media_budget_args(ap: argparse.ArgumentParser) -> None:
    """--max-image-megapixels ... --max-videos-per-sample: the media budgets of mrrm.data.media (checked
    before decoding), the same flags in every command that reads media."""
    for flag, (const, unit) in MEDIA_BUDGETS.items():
        default = getattr(media, const) / unit
        ap.add_argument("--" + flag.replace("_", "-"), type=float, default=None,
                        help=f"media budget, checked before decoding (default {default:g})")


def current_media_budgets() -> dict:
    """mrrm.data.media's budgets now, as flag values: what another process (encoding workers, Ray actors)
    applies with `apply_media_budgets` (module constants do not travel between processes)."""
    return {flag: getattr(media, const) / unit for flag, (const, unit) in MEDIA_BUDGETS.items()}


def apply_media_budgets(values) -> None:
    """Set mrrm.data.media's budgets from parsed flags (a dict or argparse namespace; None = keep)."""
    values = vars(values) if isinstance(values, argparse.Namespace) else values
    for flag, (const, unit) in MEDIA_BUDGETS.items():
        v = values.get(flag)
        if v is None:
            continue
        check_positive("--" + flag.replace("_", "-"), v)
        if unit == 1 and v != int(v):
            raise ValueError(f"--{flag.replace('_', '-')} must be a whole number, got {v!r}")
        setattr(media, const, int(v * unit))
