"""The budgets a model's encoder checks before tokenizing or decoding, as one value each, from the command
line: the media budgets (mrrm.data.media.MediaBudgets) as flags, the same in every command that reads media,
and `budgets_applied`, which puts text and media budgets on a model's encoder for a run. Nothing here sets
module state: the budgets travel with the encoder (into encoding worker processes, pickled with it) or as an
argument (Ray actors)."""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Iterator, Mapping, NamedTuple

from mrrm.common import check_positive
from mrrm.data.media import DEFAULT_MEDIA_BUDGETS, MediaBudgets

# flag (argparse dest) -> (MediaBudgets field, the flag's unit in that field's units: megapixels or a count)
MEDIA_BUDGET_FLAGS = {flag[2:].replace("-", "_"): (field, 1 if field.endswith("_per_sample") else 1e6)
                      for field, flag in MediaBudgets.FLAGS.items()}


def add_media_budget_args(ap: argparse.ArgumentParser) -> None:
    """--max-image-megapixels ... --max-sample-megapixels: the media budgets (MediaBudgets, checked before
    decoding), the same flags in every command that reads media; `media_budgets_from_args` reads them."""
    for dest, (field, unit) in MEDIA_BUDGET_FLAGS.items():
        default = getattr(DEFAULT_MEDIA_BUDGETS, field) / unit
        ap.add_argument("--" + dest.replace("_", "-"), type=float, default=None,
                        help=f"media budget, checked before decoding (default {default:g})")


def media_budgets_from_args(values: argparse.Namespace | Mapping[str, Any] | None,
                            base: MediaBudgets = DEFAULT_MEDIA_BUDGETS) -> MediaBudgets:
    """The MediaBudgets the flags give (an argparse namespace or a dict of dests, e.g. a TrainConfig's
    fields): `base` (the defaults) with each flag given (not None) in its place. A bad value is a
    ValueError naming the flag."""
    values = vars(values) if isinstance(values, argparse.Namespace) else (values or {})
    changed = {}
    for dest, (field, unit) in MEDIA_BUDGET_FLAGS.items():
        v = values.get(dest)
        if v is None:
            continue
        flag = "--" + dest.replace("_", "-")
        check_positive(flag, v)
        if unit == 1 and v != int(v):
            raise ValueError(f"{flag} must be a whole number, got {v!r}")
        if int(v * unit) < 1:
            raise ValueError(f"{flag} must be at least one pixel ({1 / unit:g} megapixels), got {v!r}")
        changed[field] = int(v * unit)
    return base.replace(**changed)


class EncoderBudgets(NamedTuple):
    """The budgets in force on an encoder: text (mrrm.data.encoding.TextBudgets) and media (MediaBudgets)."""
    text: Any
    media: MediaBudgets | None


@contextlib.contextmanager
def budgets_applied(model, *, text: Mapping[str, Any] | None = None,
                    media: MediaBudgets | None = None) -> Iterator[EncoderBudgets]:
    """`text` (TextBudgets fields, e.g. from mrrm._args.text_budget_overrides; None values keep the model's)
    and `media` (a MediaBudgets, e.g. from `media_budgets_from_args`; None keeps the encoder's) on `model`'s
    encoder for the duration: a loaded model may be shared (the cached default is), so its own budgets come
    back afterwards. Encoding workers started inside get them with the encoder. Yields the budgets in force
    (both None for a model without an mrrm encoder)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "set_media_budgets"):
        yield EncoderBudgets(None, None)
        return
    before = encoder.text_budgets, encoder.media_budgets
    try:
        yield EncoderBudgets(encoder.set_text_budgets(**(text or {})), encoder.set_media_budgets(media))
    finally:
        encoder.text_budgets, encoder.media_budgets = before
