"""Media loading: image and video sources -> decoded pixels, ready for a Qwen-VL processor.

Images
    ``load_image(src)`` returns a fully decoded RGB ``PIL.Image.Image``. Accepted sources:

    - a path (``str`` or ``os.PathLike``); a relative path is resolved against ``base_dir`` when
      given, else against the working directory;
    - a ``PIL.Image.Image`` (copied, never modified), or an HxW / HxWxC uint8 numpy array;
    - raw encoded bytes (``bytes``, ``bytearray``, ``memoryview``);
    - a base64 string, plain or as a data URL ``"data:image/png;base64,...."``;
    - a Hugging Face ``datasets.Image`` dict ``{"bytes": ..., "path": ...}`` (bytes win when set).

    How a ``str`` is read, in this order: (1) a ``data:`` prefix makes it a data URL; (2) a
    ``scheme://`` URL is refused (no network here); (3) a string naming an existing file (after
    ``base_dir``) is a path; (4) otherwise it is base64 only if it consists of base64 characters,
    decodes, and the decoded bytes are recognised by PIL as an image; (5) otherwise it is a missing
    path. A path wins over base64, and a missing path never turns into garbage pixels: a string
    such as "abcd" decodes as base64 but is not an image, so it is reported as a missing file.

    Images with transparency are composited onto white (as qwen-vl-utils does); everything else
    goes through ``Image.convert("RGB")``. Multi-frame images give their first frame. EXIF
    orientation is not applied (neither transformers nor qwen-vl-utils applies it).

Videos
    ``load_video(src)`` returns a `VideoClip` whose ``frames`` is a uint8 torch tensor
    ``[F, 3, H, W]``: the layout the Hugging Face video processors convert every input to
    (``Qwen2VLVideoProcessor``, ``Qwen3VLVideoProcessor``), and what qwen-vl-utils returns. The
    processors take it as is; ``clip.video_metadata()`` gives their ``video_metadata`` (Qwen3-VL
    uses it for frame timestamps). Pass the frames with the processor's ``do_sample_frames=False``
    (the Qwen2-VL default): the sampling below has already been done.

    A file is decoded with decord when it is importable (``VideoReader(path, num_threads=1)``,
    ``get_avg_fps``, ``get_batch``), else with PyAV; when decord fails on a file, PyAV is tried
    before giving up. ``backend="decord"|"pyav"`` (or the environment variable
    ``MRRM_VIDEO_BACKEND``) forces one backend, with no fallback. Without a forced backend, AVI
    files go to PyAV: decord returns wrong frames when seeking in AVIs with B-frames. decord can
    also hang, holding the GIL, on files whose container declares more frames than it holds
    (dmlc/decord#373); where that matters, set ``MRRM_VIDEO_BACKEND=pyav``. PyAV decodes the
    stream once from the start and keeps only the chosen frames; it refuses a file that decodes
    to far fewer frames than its container declares (cut short), and still images.

    Frame sampling follows qwen-vl-utils (``smart_nframes`` and its decord reader), see
    `sample_frame_indices`. A list of frames (or a [F, H, W, 3] uint8 array) is taken as it is,
    only thinned evenly to ``max_frames`` when longer; its frame rate is ``frames_fps``.

    A video may also be a FOLDER of frame images (the layout of MM-RLHF-RewardBench and of the
    authors' MR2Bench video data): `list_frame_folder` gives its .jpeg/.jpg/.png files in file-name
    order; it is thinned like a frame list and charged to the video budgets from the kept frames'
    headers before any is decoded; its frames are ``frame_interval`` seconds apart (default 4.0, the
    authors' ``sampling_interval``), so frame k is at k * interval seconds as in their reference.

    Every clip has a multiple of ``frame_factor`` frames (the vision tower's temporal patch):
    a clip that would fall short repeats its last frame, as qwen-vl-utils does for frame lists.

Fingerprints
    ``media_fingerprint(src)`` is a short stable hash for caching and for grouping samples that
    share media. Encoded sources (path, bytes, base64, data URL, HF dict) hash their encoded bytes,
    so one file gives one fingerprint whichever way it arrives; decoded sources (PIL images, arrays)
    hash their pixels. A file and the PIL image decoded from it therefore differ.

Budgets
    What one sample may decode is one `MediaBudgets` value (pixels per image, per video frame, per video,
    per sample; images and videos per sample), checked from headers BEFORE decoding. It is passed
    explicitly (``load_image(src, budgets=...)``, ``load_video(src, budgets=...)``; default
    DEFAULT_MEDIA_BUDGETS): there is no module-level budget state. The model's encoder carries one
    (``encoder.media_budgets``) and commands set it from their flags (mrrm.data.budgets). `PixelBudget`
    charges decoded pixels across calls (a sample inside a request inside a server).

Every failure to read media raises `MediaError` (a ``ValueError``) naming what failed and why.
Wrong arguments (a bad ``fps``, an unknown backend) raise ``ValueError``; a forced backend that is
not installed raises ``ImportError``.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import io
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mrrm.errors import MediaError, MrrmError, OverBudget

# A video given as a FOLDER of frame images (MM-RLHF-RewardBench, MR2Bench-Video): its frames are the
# folder's regular files with these suffixes (any case), in file-name order. The suffixes are the
# authors' (github yinuoyang01/multi-response-rm, mr2rm/data/dataset.py::_resolve_videos globs *.jpeg,
# *.jpg, *.png); the order is MM-RLHF's (yfzhang114/MM-RLHF, llava/eval/eval_mm_reward_bench.py::
# process_video sorts the file names), the same as the authors' for a folder of one suffix.
FRAME_FILE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Seconds between consecutive frames of a folder (its timestamps are frame position x interval), unless a
# sample gives "sampling_interval": the authors' default (_generate_timestamps_from_frames, 4.0).
DEFAULT_FRAME_INTERVAL = 4.0
# How a video is sampled (RewardModelConfig.video_sampling; a checkpoint scores with what it was trained
# with): "qwen" is qwen-vl-utils' reader (sample_frame_indices, at the model's video_fps, padded to the
# temporal patch); "reference" is the authors' code (github yinuoyang01/multi-response-rm,
# collate_multi_response_reward + molmo_utils.process_vision_info): a file at most REFERENCE_MAX_FPS
# frames per second with its last frame (molmo_utils' "uniform_last_frame", at most
# REFERENCE_MAX_FRAMES frames), a frame folder thinned to REFERENCE_FOLDER_MAX_FRAMES frames (their
# collate's max_video_frames), never padded (the processor gets the frames and metadata as theirs does).
VIDEO_SAMPLING = ("qwen", "reference")
# The per-frame pixel cap of the Qwen-VL video processors (transformers' `cap_pixels_per_frame`, which warns on
# every video until it is given): each frame held to an even share of a whole-video pixel budget, as
# qwen-vl-utils' reader resizes its frames (True), or only the per-frame size limit (False). It follows the
# sampling: "qwen" is qwen-vl-utils' reader, and capped as it is; the authors' code ("reference") ran a
# transformers without the cap. The cap binds only on long videos (over ~300 sampled frames at Qwen-VL's sizes).
VIDEO_PIXEL_CAP = {"qwen": True, "reference": False}
REFERENCE_MAX_FPS = 2.0
REFERENCE_MAX_FRAMES = 384
REFERENCE_FOLDER_MAX_FRAMES = 16
# The image formats decoded (PIL format ids): those whose header gives the size that is decoded. Others are
# refused by name before anything is decoded: an ICO's directory can say 256x256 for a 13000x13000 PNG that
# PIL decodes inside Image.open (+648 MB); JPEG 2000, ICNS, DDS, PSD, EPS, ... are rare in VLM data and
# delegate to decoders whose allocations no header check bounds. TIFF is read with its tile size checked too.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM")  # JPEG includes MPO
# Video containers read with PyAV even where decord is installed: their frame size can change inside the
# stream (AVI's header can lie about it; MPEG transport / program streams change resolution in-band), and
# only the PyAV reader sees every decoded frame's size (decord silently rescales to the first one's).
PYAV_CONTAINERS = ("AVI", "MPEG-TS", "MPEG-PS")


@dataclass(frozen=True)
class MediaBudgets:
    """The media one sample may decode, checked from headers BEFORE anything is decoded: one value, passed
    explicitly to `load_image` / `load_video` / `check_media_counts` (``budgets=``), carried by the model's
    encoder (``model.encoder.media_budgets``, pickled with it into encoding workers) and set from the same
    flags in every command that reads media (mrrm.data.budgets). The defaults are DEFAULT_MEDIA_BUDGETS.

    image_pixels: one image's pixels. A few hundred bytes of PNG can declare 81 megapixels (243 MB of RGB,
      more in the processor); 50 MP (150 MB RGB) passes any camera photo, and Qwen-VL processors resize to
      <= 12.8 MP anyway. Raise it for larger scans.
    video_frame_pixels / video_pixels: one video frame (4K UHD), and one video's sampled frames together
      (2**29, ~1.6 GB RGB, 64 4K frames), from the container's header and the frames sampled: a 31 KB mp4
      can declare 64 frames of 3072x3072 (1.8 GB of RGB; decord aborts the process when that allocation fails).
    images_per_sample / videos_per_sample: media per sample (every prompt of the reward benchmarks has at
      most a few).
    sample_pixels: all the images and video frames one sample decodes together (mrrm.data.encoding holds
      them at once and the processor makes a copy): 2**29 pixels (~1.6 GB RGB, ~4-5 GB peak with the copies).
    """

    image_pixels: int = 50_000_000
    video_frame_pixels: int = 3840 * 2160
    video_pixels: int = 2**29
    images_per_sample: int = 32
    videos_per_sample: int = 8
    sample_pixels: int = 2**29

    # the command-line flag of each budget (mrrm.data.budgets; pixels are given in megapixels there)
    FLAGS = {"image_pixels": "--max-image-megapixels", "video_frame_pixels": "--max-video-frame-megapixels",
             "video_pixels": "--max-video-megapixels", "images_per_sample": "--max-images-per-sample",
             "videos_per_sample": "--max-videos-per-sample", "sample_pixels": "--max-sample-megapixels"}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"media budget {f.name} ({self.FLAGS[f.name]}) must be a positive int, got {v!r}")

    def name(self, field: str) -> str:
        """How messages name a budget: its flag and its field."""
        return f"{self.FLAGS[field]}; MediaBudgets.{field}"

    def replace(self, **overrides) -> "MediaBudgets":
        """These budgets with some replaced (None values keep the current one)."""
        changed = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changed) if changed else self


DEFAULT_MEDIA_BUDGETS = MediaBudgets()


def check_media_counts(images: int, videos: int, *, budgets: MediaBudgets = DEFAULT_MEDIA_BUDGETS) -> str | None:
    """Why a sample with this many images / videos is refused (budgets.images_per_sample /
    videos_per_sample), or None."""
    if images > budgets.images_per_sample:
        return (f"{images} images, over the limit of {budgets.images_per_sample} per sample "
                f"({budgets.name('images_per_sample')})")
    if videos > budgets.videos_per_sample:
        return (f"{videos} videos, over the limit of {budgets.videos_per_sample} per sample "
                f"({budgets.name('videos_per_sample')})")
    return None


__all__ = [
    "DEFAULT_MEDIA_BUDGETS",
    "MediaBudgets",
    "MediaError",
    "OverBudget",
    "PixelBudget",
    "VideoClip",
    "load_image",
    "list_frame_folder",
    "load_video",
    "media_fingerprint",
    "sample_frame_indices",
]

VIDEO_BACKENDS = ("decord", "pyav")
_BACKEND_ENV = "MRRM_VIDEO_BACKEND"
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/_\-]+={0,2}")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


_ACTIVE_BUDGET: contextvars.ContextVar["PixelBudget | None"] = contextvars.ContextVar("mrrm_pixel_budget",
                                                                                   default=None)


class PixelBudget:
    """The decoded pixels (images and sampled video frames) a unit of work may hold, charged from
    headers BEFORE anything is decoded; exceeding it raises OverBudget naming the medium.

    Used as a context manager: every load_image / load_video inside the ``with`` (same thread or
    context) is charged to it, and through `parent` to the budget that was active when it was made
    (a sample inside a request inside a server's pool). `release()` returns what was charged (to
    the parents too) once the decoded media are freed. Thread-safe. Media already in memory (PIL
    images, arrays) are not charged.
    """

    def __init__(self, limit: int, name: str, *, parent: "PixelBudget | None" = None, shared: bool = False):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"a pixel budget's limit must be a positive int, got {limit!r}")
        self.limit, self.name, self.parent, self.shared = limit, name, parent, shared
        self.used = 0
        self._lock = threading.Lock()
        self._tokens: list = []

    @classmethod
    def nested(cls, limit: int, name: str) -> "PixelBudget":
        """A budget whose parent is the one active here (if any)."""
        return cls(limit, name, parent=_ACTIVE_BUDGET.get())

    def charge(self, pixels: int, label: str) -> None:
        with self._lock:
            if self.used + pixels > self.limit:
                raise OverBudget(f"{label}: decoding its {pixels / 1e6:.4g} megapixels would take {self.name} "
                                 f"over its limit of {self.limit / 1e6:.4g} megapixels "
                                 f"({self.used / 1e6:.4g} already held)", self)
            if self.parent is not None:
                self.parent.charge(pixels, label)  # raises before anything is charged here
            self.used += pixels

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self.used -= pixels
        if self.parent is not None:
            self.parent._give_back(pixels)

    def release(self) -> None:
        """Return everything charged so far (to the parents too)."""
        with self._lock:
            used, self.used = self.used, 0
        if self.parent is not None and used:
            self.parent._give_back(used)

    def __enter__(self) -> "PixelBudget":
        self._tokens.append(_ACTIVE_BUDGET.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_BUDGET.reset(self._tokens.pop())


def _charge(pixels: int, label: str) -> None:
    budget = _ACTIVE_BUDGET.get()
    if budget is not None:
        budget.charge(pixels, label)


# --------------------------------------------------------------------------------------------------
# Sources: paths, base64, HF dicts
# --------------------------------------------------------------------------------------------------


def _resolve_path(src: str | os.PathLike, base_dir: str | os.PathLike | None) -> Path:
    path = Path(os.fspath(src))
    if base_dir is not None and not path.is_absolute():
        path = Path(os.fspath(base_dir)) / path
    return path


def _check_file(path: Path, label: str) -> None:
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long, an embedded NUL, ...
        raise MediaError(f"{label}: not a usable path ({e})") from e
    if not exists:
        raise MediaError(f"{label}: file not found")
    if not path.is_file():
        raise MediaError(f"{label}: not a regular file")


def _decode_data_url(text: str, label: str) -> bytes:
    header, comma, payload = text.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaError(f"{label}: only base64 data URLs ('data:<type>;base64,<data>') are supported")
    data = _b64decode(payload)
    if data is None:
        raise MediaError(f"{label}: invalid base64 payload")
    return data


def _b64decode(text: str) -> bytes | None:
    """Strict base64 (standard or URL-safe alphabet, whitespace ignored, padding optional), or None."""
    text = "".join(text.split())
    if not text or not _BASE64_CHARS.fullmatch(text):
        return None
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        return None
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_image_bytes(data: bytes) -> bool:
    """Does PIL recognise these bytes as an image of IMAGE_FORMATS (header only: cheap), or do they start
    with the magic number of a format mrrm refuses (then its refusal names it)? Nothing else of another
    format is parsed: an ICO would be decoded inside Image.open."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS):
            return True
    except Exception:
        return _sniff_format(data[:64]) is not None


# formats outside IMAGE_FORMATS recognised by their magic number (at least 4 bytes), to be refused by name
_REFUSED_SNIFFED = ("ICO", "CUR", "ICNS", "JPEG2000", "DDS", "PSD", "EPS", "QOI", "BLP", "FTEX", "AVIF")


def _sniff_format(prefix: bytes) -> str | None:
    """The refused PIL format (_REFUSED_SNIFFED) whose magic number `prefix` starts with, or None."""
    Image.init()
    for fmt in _REFUSED_SNIFFED:
        factory_accept = Image.OPEN.get(fmt)
        accept = factory_accept[1] if factory_accept else None
        try:
            if accept is not None and accept(prefix) is True:
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's check on too few bytes
            continue
    return None


def _classify_string(text: str, base_dir, what: str = "image") -> tuple[str, Any, str]:
    """("path", Path, label) or ("bytes", bytes, label) for a str source; see the module doc."""
    if text[:5].lower() == "data:":
        return "bytes", _decode_data_url(text, "data URL"), "data URL"
    if _URL_SCHEME.match(text):
        raise MediaError(f"URL {text[:200]!r}: URLs are not fetched (no network); download it first")
    path = _resolve_path(text, base_dir)
    label = f"{what} file {str(path)!r}"
    try:
        exists = path.exists()
    except (OSError, ValueError):  # e.g. a name too long for the file system (long base64)
        exists = False
    if exists:
        return "path", path, label
    data = _b64decode(text)
    if data is not None and _is_image_bytes(data):
        return "bytes", data, "base64 image string"
    if len(text) > 300:  # long strings are almost never paths: keep the message readable
        raise MediaError(f"image string of {len(text)} characters: neither an existing file nor base64 of an image")
    raise MediaError(f"{label}: file not found (and the string is not base64 of an image)")


def _hf_dict_source(src: dict, label_prefix: str = "image") -> tuple[Any, str | None]:
    """A Hugging Face datasets.Image dict -> (bytes or path, path-for-messages)."""
    data, path = src.get("bytes"), src.get("path")
    if data is not None:
        return data, path
    if path is not None:
        return path, path
    raise MediaError(f"{label_prefix} dict: has neither 'bytes' nor 'path' (keys: {sorted(src)})")


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image; transparency is composited onto white (qwen-vl-utils' to_rgb)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


@contextlib.contextmanager
def _image_errors(label: str):
    """PIL's many exceptions on bad image data -> MediaError naming `label` and the reason."""
    try:
        yield
    except MediaError:
        raise
    except FileNotFoundError as e:
        raise MediaError(f"{label}: file not found") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{label}: not an image (or an unsupported image format; mrrm reads "
                         f"{', '.join(IMAGE_FORMATS)})") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"{label}: too large to decode safely ({e})") from e
    except PermissionError as e:
        raise MediaError(f"{label}: permission denied") from e
    except MemoryError:  # the machine, not the file: never reported as a corrupt image
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise MediaError(f"{label}: corrupt or truncated image ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _open_image(fp: Path | io.BytesIO, label: str):
    """PIL's Image.open limited to IMAGE_FORMATS (nothing decoded yet); yields (image, the pixels decoding
    it holds at once: its own, or a TIFF tile's when larger). A format outside the list is refused by
    name, before PIL parses more than its magic number."""
    with _image_errors(label):
        try:
            image = Image.open(fp, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
                prefix = fp.read(64)
            else:
                with open(fp, "rb") as fh:
                    prefix = fh.read(64)
            fmt = _sniff_format(prefix)
            if fmt is not None:
                raise MediaError(f"{label}: {fmt} images are refused: mrrm decodes only {', '.join(IMAGE_FORMATS)}, "
                                 "formats whose header gives the size that is decoded (an ICO's directory, for one, "
                                 "can declare 256x256 for a far larger picture); convert it to PNG or JPEG") from None
            raise
        with image:
            pixels = image.width * image.height
            if image.format == "TIFF":  # libtiff allocates a whole tile, whatever the image's size
                tile = (image.tag_v2.get(322), image.tag_v2.get(323))  # TileWidth, TileLength
                if all(isinstance(t, int) and t > 0 for t in tile) and tile[0] * tile[1] > pixels:
                    pixels = tile[0] * tile[1]
                    image.info["mrrm_tile"] = tile
            yield image, pixels


def _size_text(image: Image.Image, pixels: int) -> str:
    tile = image.info.get("mrrm_tile")
    if tile is not None and pixels > image.width * image.height:
        return (f"{image.width}x{image.height} stored in {tile[0]}x{tile[1]} tiles (decoding holds a whole tile: "
                f"{pixels / 1e6:.1f} megapixels)")
    return f"{image.width}x{image.height} = {pixels / 1e6:.1f} megapixels"


def _decode_image(fp: Path | io.BytesIO, label: str, *, budgets: MediaBudgets = DEFAULT_MEDIA_BUDGETS,
                  charge: bool = True) -> Image.Image:
    """Decode an image file or buffer under budgets.image_pixels; charged to the active PixelBudget from
    its header unless the caller has charged it already (a frame folder charges all its frames at once)."""
    with _open_image(fp, label) as (image, pixels):
        if pixels > budgets.image_pixels:  # from the header: nothing decoded yet
            raise MediaError(f"{label}: {_size_text(image, pixels)}, over the limit of "
                             f"{budgets.image_pixels / 1e6:g} megapixels ({budgets.name('image_pixels')})")
        if charge:
            _charge(pixels, label)
        image.load()  # decode everything now: truncated files fail here, not later
        return _to_rgb(image)


def _image_size(fp: Path, label: str, limit: int | None = None, limit_name: str = "") -> tuple[int, int]:
    """(width, height) from an image file's header; nothing decoded. With `limit`: refused (MediaError)
    when a TIFF's tile, larger than the image, is over it (the caller checks width x height itself)."""
    with _open_image(fp, label) as (image, pixels):
        if limit is not None and pixels > max(limit, image.width * image.height):
            raise MediaError(f"{label}: {_size_text(image, pixels)}, over the limit of {limit} pixels per frame "
                             f"({limit_name})")
        return image.width, image.height


def _image_from_array(array: np.ndarray, label: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(f"{label}: array dtype must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"{label}: array shape must be HxW, HxWx1, HxWx3 or HxWx4, got {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"{label}: empty image {tuple(array.shape)}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _load_image(src: Any, base_dir, label: str | None, budgets: MediaBudgets) -> Image.Image:
    """load_image with an optional label naming the source in messages (e.g. a frame of a list)."""
    if isinstance(src, Image.Image):
        name = label or "PIL image"
        try:
            src.load()
        except Exception as e:
            raise MediaError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from e
        return _to_rgb(src)
    if isinstance(src, np.ndarray):
        return _image_from_array(src, label or "image array")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{label or 'image bytes'}: empty")
        return _decode_image(io.BytesIO(data), label or "image bytes", budgets=budgets)
    if isinstance(src, dict):
        inner, path = _hf_dict_source(src)
        if label is None and isinstance(inner, (bytes, bytearray, memoryview)):
            label = "image bytes" + (f" (from {path!r})" if path else "")
        return _load_image(inner, base_dir, label, budgets)
    if isinstance(src, str):
        try:
            kind, value, default_label = _classify_string(src, base_dir)
        except MediaError as e:
            raise MediaError(f"{label}: {e}" if label else str(e)) from e
        name = f"{label} ({default_label})" if label else default_label
        if kind == "path":
            _check_file(value, name)
            return _decode_image(value, name, budgets=budgets)
        return _decode_image(io.BytesIO(value), name, budgets=budgets)
    if isinstance(src, os.PathLike):
        path = _resolve_path(src, base_dir)
        name = f"image file {str(path)!r}"
        name = f"{label} ({name})" if label else name
        _check_file(path, name)
        return _decode_image(path, name, budgets=budgets)
    raise MediaError(f"{label or 'image source'}: unsupported type {type(src).__name__}")


def load_image(src: Any, *, base_dir: str | os.PathLike | None = None,
               budgets: MediaBudgets = DEFAULT_MEDIA_BUDGETS) -> Image.Image:
    """Decode an image source (see the module doc) into a new, fully loaded RGB PIL image; an image over
    budgets.image_pixels is refused from its header."""
    return _load_image(src, base_dir, None, budgets)


# --------------------------------------------------------------------------------------------------
# Video: frame sampling
# --------------------------------------------------------------------------------------------------


def _check_sampling_args(fps: float, min_frames: int, max_frames: int, frame_factor: int) -> None:
    if not (isinstance(frame_factor, int) and frame_factor >= 1):
        raise ValueError(f"frame_factor must be an int >= 1, got {frame_factor!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if min_frames < 0:
        raise ValueError(f"min_frames must be >= 0, got {min_frames}")
    if max_frames < frame_factor:
        raise ValueError(f"max_frames must be >= frame_factor ({frame_factor}), got {max_frames}")


def _plan_indices(total_frames: int, source_fps: float, fps: float, min_frames: int, max_frames: int,
                  frame_factor: int) -> tuple[list[int], int]:
    """(indices, number sampled before padding); see sample_frame_indices."""
    f = frame_factor
    lo = math.ceil(min_frames / f) * f
    hi = math.floor(min(max_frames, total_frames) / f) * f
    nframes = total_frames / source_fps * fps
    nframes = min(max(nframes, lo), hi, total_frames)
    nframes = math.floor(nframes / f) * f
    if nframes < f:  # fewer than frame_factor frames in the whole video: take them all
        nframes = total_frames
    # torch.linspace (float32) and round-half-to-even, exactly as qwen-vl-utils' decord reader.
    indices = torch.linspace(0, total_frames - 1, nframes).round().long().tolist()
    return _pad_indices(indices, f), len(indices)


def _thin_indices(total_frames: int, max_frames: int, f: int) -> tuple[list[int], int]:
    """(indices, number kept before padding) of a frame list: all of it, or floor_f(max_frames)
    evenly spaced frames when longer; padded to a multiple of f."""
    keep = math.floor(max_frames / f) * f
    if total_frames > keep:
        indices = torch.linspace(0, total_frames - 1, keep).round().long().tolist()
    else:
        indices = list(range(total_frames))
    return _pad_indices(indices, f), len(indices)


def reference_sample_times(duration: float, max_frames: int = REFERENCE_MAX_FRAMES,
                           max_fps: float = REFERENCE_MAX_FPS) -> np.ndarray:
    """The times (seconds from the first frame) the authors' code samples a video file at: molmo_utils'
    sample_times in "uniform_last_frame" mode. Every 1 / max_fps seconds plus the last instant when that
    fits in max_frames, else max_frames times evenly over the duration, both ends included."""
    if (max_frames - 1) / max_fps < duration:
        return np.linspace(0, duration, num=max_frames, endpoint=True, dtype=np.float64)
    return np.concatenate([np.arange(0.0, stop=duration, step=1 / max_fps), [duration]], axis=0)


def _plan_reference(total: int, source_fps: float, timeline: Callable[[], _Timeline]) -> tuple[list[int], dict]:
    """(indices, the processor's video metadata) of a file under the authors' sampling: each sampled
    time goes to the first frame ending after it (molmo_utils' searchsorted on the frame end times)."""
    line = timeline()
    times = reference_sample_times(line.duration)
    indices = np.minimum(np.searchsorted(line.end_times, times + line.offset, side="right"), len(line.end_times) - 1)
    meta = {"total_num_frames": int(total), "fps": float(source_fps), "duration": float(line.duration),
            "frames_indices": (times * source_fps).tolist()}
    return [int(i) for i in indices], meta


def reference_thin_indices(total_frames: int, max_frames: int = REFERENCE_FOLDER_MAX_FRAMES) -> list[int]:
    """The frames of a folder the authors' collate keeps: all of them up to max_frames, else
    round(j * (total - 1) / (max - 1)) for j < max, duplicates dropped and refilled from the end."""
    if total_frames <= max_frames:
        return list(range(total_frames))
    kept = []
    for j in range(max_frames):
        i = min(int(round(j * (total_frames - 1) / (max_frames - 1))), total_frames - 1)
        if i not in kept:
            kept.append(i)
    i = total_frames - 1
    while len(kept) < max_frames and i >= 0:
        if i not in kept:
            kept.append(i)
        i -= 1
    return sorted(kept)


def _reference_folder_order(names: list[str]) -> list[str]:
    """A folder's frames in the authors' order: the .jpeg files by name, then .jpg, then .png."""
    return [n for suffix in FRAME_FILE_SUFFIXES for n in sorted(names) if n.lower().endswith(suffix)]


def thin_frame_list(total_frames: int, max_frames: int, frame_factor: int = 2) -> list[int]:
    """The indices of a frame list of `total_frames` that load_video keeps (with its padding): a caller
    may decode only these frames and hand load_video the shorter list, for the same clip."""
    return _thin_indices(total_frames, max_frames, frame_factor)[0]


def _pad_indices(indices: list[int], f: int) -> list[int]:
    """`indices` with the last one repeated up to a multiple of f entries."""
    return indices + indices[-1:] * (-len(indices) % f)


def sample_frame_indices(total_frames: int, source_fps: float, *, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768, frame_factor: int = 2) -> list[int]:
    """Indices of the frames to keep from a video of `total_frames` frames at `source_fps`.

    qwen-vl-utils' ``smart_nframes`` with ``fps``: n = total_frames / source_fps * fps (duration
    times fps), clamped to [ceil_f(min_frames), floor_f(min(max_frames, total_frames))] and to
    total_frames, then floored to a multiple f of frame_factor; the indices are
    ``linspace(0, total_frames - 1, n).round()``. Frames are never invented: a video shorter than
    min_frames gives all of its frames (floored to a multiple of f). Where qwen-vl-utils raises
    (fewer than frame_factor frames in the video) this takes every frame and repeats the last one
    up to frame_factor. The result is sorted, may repeat an index, and has a multiple of f entries.
    """
    _check_sampling_args(fps, min_frames, max_frames, frame_factor)
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if not (source_fps > 0 and math.isfinite(source_fps)):
        raise ValueError(f"source_fps must be a positive number, got {source_fps!r}")
    return _plan_indices(total_frames, source_fps, fps, min_frames, max_frames, frame_factor)[0]


# --------------------------------------------------------------------------------------------------
# Video: the clip and the decoders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VideoClip:
    """Sampled frames of one video.

    frames:            uint8 tensor [F, 3, H, W] (RGB), F a multiple of the frame_factor used.
    sample_fps:        frames per second of video time in the sampled clip
                       (= source_fps * sampled / source_num_frames; the repeated padding frames do
                       not count). Qwen2.5-VL's ``second_per_grid_ts`` is temporal_patch / this.
    source_fps:        the source's average frame rate (``frames_fps`` for a frame list).
    frame_indices:     index in the source of each of the F frames (sorted, may repeat).
    duration_s:        source_num_frames / source_fps (the duration qwen-vl-utils samples over).
    path:              the resolved file or frame-folder path, None for a frame list.
    source_num_frames: frames in the source.
    backend:           "decord", "pyav" or "frames" (a frame list or folder).
    """

    frames: torch.Tensor
    sample_fps: float
    source_fps: float
    frame_indices: tuple[int, ...]
    duration_s: float
    path: str | None
    source_num_frames: int
    backend: str
    processor_metadata: dict | None = None  # set by the "reference" sampling: exactly what theirs passes

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[2])

    @property
    def width(self) -> int:
        return int(self.frames.shape[3])

    def video_metadata(self) -> dict:
        """The clip as a dict of transformers' ``VideoMetadata`` fields (a processor's
        ``video_metadata=`` argument accepts it; Qwen3-VL computes timestamps from it). Under the
        "reference" sampling, the metadata the authors' code passes (molmo_utils': fractional
        frames_indices = sampled time x fps; a folder's fps = 1 / the mean gap of its kept frames)."""
        if self.processor_metadata is not None:
            return {**self.processor_metadata, "width": self.width, "height": self.height}
        return {
            "total_num_frames": self.source_num_frames,
            "fps": self.source_fps,
            "width": self.width,
            "height": self.height,
            "duration": self.duration_s,
            "video_backend": self.backend,
            "frames_indices": list(self.frame_indices),
        }


class _ReadFailure(MrrmError):
    """A reason a backend could not read a file (wrapped into MediaError by load_video)."""


# Given (total_frames, source_fps, timeline), which frame indices to fetch. timeline() gives the
# reader's (end time of each frame, duration, time of the first frame) in seconds, computed only when
# a plan asks for it (the authors' sampling does; qwen-vl-utils' does not).
_Chooser = Callable[[int, float, Callable[[], "_Timeline"]], list[int]]


class _Timeline(NamedTuple):
    end_times: np.ndarray
    duration: float
    offset: float


@functools.lru_cache(maxsize=1)
def _decord():
    try:
        import decord
    except Exception:  # ImportError, or a broken native library
        return None
    return decord


class _FramePlan:
    """A reader's plan (which frames to keep) with the video budgets: the per-frame limit checked and the
    kept frames charged BEFORE any is decoded into an array, from the size the container declares, else
    (no size known) from the first decoded frame's. Every decoded frame's real size is then checked
    against it (`frame`): a stream whose frame size changes, or whose header lies about it, is refused at
    the first frame that differs, before that frame is converted or kept."""

    def __init__(self, plan: Callable[[int, float, Callable[[], "_Timeline"]], list[int]],
                 size: tuple[int, int] | None, label: str, budgets: MediaBudgets):
        self.plan, self.size, self.label, self.budgets = plan, size, label, budgets
        self.count: int | None = None
        self.charged = False  # a second reader (after the first failed) re-plans the same frames: charge once
        if size is not None:
            self._check_frame(*size)

    def _check_frame(self, w: int, h: int) -> None:
        limit = self.budgets.video_frame_pixels
        if w * h > limit:
            raise MediaError(f"{self.label}: frames of {w}x{h} are over the limit of {limit} pixels "
                             f"({self.budgets.name('video_frame_pixels')})")

    def _charge(self) -> None:
        w, h = self.size
        pixels = self.count * w * h
        limit = self.budgets.video_pixels
        if pixels > limit:
            raise MediaError(f"{self.label}: {self.count} frames of {w}x{h} would decode to {pixels / 1e6:.0f} "
                             f"megapixels, over the limit of {limit / 1e6:.0f} ({self.budgets.name('video_pixels')})")
        if not self.charged:
            _charge(pixels, self.label)
            self.charged = True

    def __call__(self, total: int, source_fps: float, timeline) -> list[int]:
        indices = self.plan(total, source_fps, timeline)
        self.count = len(indices)
        if self.size is not None:
            self._charge()
        return indices

    def frame(self, w: int, h: int, ordinal: int) -> None:
        """A decoded frame's real size, checked before the frame is converted or kept."""
        if self.size is None:  # the container did not say: the first frame sets the size, charged now
            self._check_frame(w, h)
            self.size = (w, h)
            if self.count is not None:
                self._charge()
        elif (w, h) != self.size:
            declared = "the stream's header says" if ordinal else "the container declares"
            raise MediaError(f"{self.label}: frame {ordinal} is {w}x{h} but {declared} {self.size[0]}x{self.size[1]}; "
                             "videos whose frame size changes (or whose header misstates it) are refused: the budgets "
                             "are charged from one frame size. Re-encode it at one size")


def _read_decord(path: str, choose: _FramePlan) -> tuple[np.ndarray, int, float]:
    decord = _decord()
    reader = decord.VideoReader(path, num_threads=1)
    try:
        total = len(reader)
        if total <= 0:
            raise _ReadFailure("zero frames")
        source_fps = float(reader.get_avg_fps())
        if not (source_fps > 0 and math.isfinite(source_fps)):
            raise _ReadFailure(f"unknown frame rate ({source_fps})")

        frame_times = reader.get_frame_timestamp

        def timeline():  # as molmo_utils' decord reader: decord's per-frame (start, end) times
            stamps = np.asarray(frame_times(list(range(total))), dtype=np.float64)
            return _Timeline(stamps[:, 1], float(stamps[-1, 1] - stamps[0, 0]), float(stamps[0, 0]))

        indices = choose(total, source_fps, timeline)
        if choose.size is None:  # no size from the container's header: one frame decoded to learn it
            first = reader[0]
            shape = first.shape
            del first
            choose.frame(int(shape[1]), int(shape[0]), 0)
        batch = reader.get_batch(indices)
        # decord's bridge may be set globally to torch/tf/mxnet; asnumpy is the native one.
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if frames.ndim == 4:
            choose.frame(int(frames.shape[2]), int(frames.shape[1]), int(indices[0]) if len(indices) else 0)
    finally:
        del reader
    return frames, total, source_fps


def _pyav_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return None


def _decoder_options(budgets: MediaBudgets) -> dict:
    """FFmpeg codec options for every PyAV decode: `max_pixels` makes the decoder itself refuse a frame
    over the per-frame budget before allocating it (10% over budgets.video_frame_pixels: FFmpeg checks the
    width rounded up to its row alignment; the exact check is _FramePlan.frame on each decoded frame)."""
    return {"max_pixels": str(int(budgets.video_frame_pixels * 1.1))}


def _pyav_open(path: str, budgets: MediaBudgets):
    import av

    # the same cap while the container is probed (avformat_find_stream_info decodes a few frames)
    return av.open(path, stream_options=[_decoder_options(budgets)] * 16)


def _pyav_decode(path: str, wanted: set[int], choose: _FramePlan) -> tuple[dict[int, np.ndarray], int]:
    """Decode the whole first video stream; every frame's size checked (choose.frame) before the wanted
    ones are converted to RGB arrays and kept."""
    kept: dict[int, np.ndarray] = {}
    count = 0
    with _pyav_open(path, choose.budgets) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = _decoder_options(choose.budgets)
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            choose.frame(frame.width, frame.height, count - 1)
            if count - 1 in wanted:
                kept[count - 1] = frame.to_ndarray(format="rgb24")
    return kept, count


def _read_pyav(path: str, choose: _FramePlan) -> tuple[np.ndarray, int, float]:
    import av

    try:
        container = _pyav_open(path, choose.budgets)
    except av.error.FFmpegError as e:
        raise _ReadFailure(f"not a video, or corrupt ({e})") from e
    with container:
        demuxer = container.format.name
        if demuxer == "image2" or demuxer.endswith("_pipe"):  # ffmpeg reads a still as 1 frame
            raise _ReadFailure(f"an image ({demuxer.removesuffix('_pipe')}), not a video")
        if not container.streams.video:
            raise _ReadFailure("not a video (no video stream)")
        stream = container.streams.video[0]
        source_fps = _pyav_fps(stream)
        declared = total = stream.frames  # from the container's index (exact in mp4/mov)
        if total <= 0:  # not in the header (mkv, webm): count packets, which needs no decoding
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if source_fps is None:
        raise _ReadFailure("unknown frame rate")
    if total <= 0:
        raise _ReadFailure("zero frames")

    def timeline():
        return _pyav_timeline(path, choose.budgets)

    try:
        indices = choose(total, source_fps, timeline)
        kept, decoded = _pyav_decode(path, set(indices), choose)
        if decoded != total:
            if decoded == 0:
                raise _ReadFailure("zero frames")
            # Far fewer frames than the container declares: the file is cut short (the demuxer
            # stops quietly at a packet boundary). A few frames off: an inexact header; sample
            # again on the true count.
            if declared > 0 and declared - decoded > max(2, declared // 100):
                raise _ReadFailure(f"truncated video ({declared} frames declared, {decoded} decoded)")
            total = decoded
            indices = choose(total, source_fps, timeline)
            kept, decoded = _pyav_decode(path, set(indices), choose)
    except av.error.FFmpegError as e:
        limit = choose.budgets.video_frame_pixels
        raise _ReadFailure(f"corrupt or truncated video, or a frame over the limit of {limit} pixels "
                           f"({choose.budgets.name('video_frame_pixels')}), which the decoder refuses ({e})") from e
    return np.stack([kept[i] for i in indices]), total, source_fps


def _pyav_timeline(path: str, budgets: MediaBudgets) -> _Timeline:
    """Frame end times, duration and start of the first video stream, as molmo_utils' PyAV reader
    (load_video_pyav_noseek) computes them from the decoded frames' pts; its comparison of the stream's
    duration in seconds with the last frame's raw pts is kept as it is."""
    with _pyav_open(path, budgets) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = _decoder_options(budgets)
        fps = stream.average_rate or stream.guessed_rate
        pts = [frame.pts for frame in container.decode(stream)]
        base = stream.time_base
        start = pts[0] * base
        end = stream.duration
        if end is not None:
            end *= base
        if end is None or end < pts[-1]:
            end = pts[-1] * base + 1 / fps
        duration = float(end - start)
    return _Timeline(np.array([float(p * base) for p in pts[1:]] + [duration]), duration, float(start))


_READERS = {"decord": _read_decord, "pyav": _read_pyav}


def _pyav_container(path: Path) -> str | None:
    """Which of PYAV_CONTAINERS a file is, from its first bytes (None for any other): AVI (RIFF....AVI ),
    an MPEG transport stream (a 0x47 sync byte every 188 bytes, or every 192 in M2TS), an MPEG program
    stream (a pack header 00 00 01 BA)."""
    with open(path, "rb") as fh:
        head = fh.read(580)
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    for first, step in ((0, 188), (4, 192)):
        if len(head) >= first + 2 * step + 1 and all(head[first + k * step] == 0x47 for k in range(3)):
            return "MPEG-TS"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG-PS"
    return None


def _backends_to_try(backend: str | None, path: Path) -> list[str]:
    backend = backend or os.environ.get(_BACKEND_ENV) or None
    if backend is not None:
        if backend not in VIDEO_BACKENDS:
            raise ValueError(f"backend must be one of {VIDEO_BACKENDS} or None, got {backend!r}")
        if backend == "decord" and _decord() is None:
            raise ImportError("backend='decord' was asked for but decord is not importable (pip install decord)")
        if backend == "pyav":
            _require_av()
        return [backend]
    # decord returns wrong frames when it seeks in AVI files with B-frames (dmlc/decord#195, #252;
    # reproduced here), and rescales every frame of a stream whose size changes to the first one's:
    # the containers of PYAV_CONTAINERS go to PyAV unless decord is asked for by name.
    if _decord() is not None and _pyav_container(path) is None:
        return ["decord", "pyav"]
    _require_av()
    return ["pyav"]


def _require_av() -> None:
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImportError("reading video files needs PyAV or decord: pip install av (or decord)") from e


def _probe_frame_size(path: Path, budgets: MediaBudgets) -> tuple[int, int] | None:
    """(width, height) of the first video stream from the container's header (PyAV, nothing decoded
    beyond what probing the stream decodes, under the decoder's max_pixels); None when PyAV is missing
    or cannot tell (then the first decoded frame sets it, before any frame is kept)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return None
    try:
        with _pyav_open(str(path), budgets) as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            return (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
    except Exception:  # noqa: BLE001 - not readable by PyAV: the readers say why
        return None


def _load_video_file(path: Path, plan: _Chooser, backend: str | None,
                     budgets: MediaBudgets) -> tuple[np.ndarray, int, float, str]:
    label = f"video file {str(path)!r}"
    _check_file(path, label)
    if path.stat().st_size == 0:
        raise MediaError(f"{label}: empty file")
    budgeted = _FramePlan(plan, _probe_frame_size(path, budgets), label, budgets)
    failures = []
    for name in _backends_to_try(backend, path):
        try:
            frames, total, source_fps = _READERS[name](str(path), budgeted)
        except MediaError:
            raise  # over a budget, or a frame size that changes: no other reader would do better
        except _ReadFailure as e:
            failures.append(f"{name}: {e}")
        except Exception as e:  # decord raises RuntimeError / DECORDError with little detail
            failures.append(f"{name}: {type(e).__name__}: {str(e).strip()[:300]}")
        else:
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                failures.append(f"{name}: unexpected frame array {frames.dtype} {tuple(frames.shape)}")
                continue
            return frames, total, source_fps, name
    raise MediaError(f"{label}: cannot read as a video ({'; '.join(failures)})")


def _frames_from_list(frames: Sequence[Any], base_dir, budgets: MediaBudgets) -> np.ndarray:
    if len(frames) == 0:
        raise MediaError("frame list: zero frames")
    arrays = []
    for i, frame in enumerate(frames):
        label = f"frame {i} of the frame list"
        if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8:
            array = frame  # the common case: no round trip through PIL
        else:
            array = np.asarray(_load_image(frame, base_dir, label, budgets))
        if arrays and array.shape != arrays[0].shape:
            raise MediaError(f"{label}: size {array.shape[1]}x{array.shape[0]} differs from frame 0's "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}")
        arrays.append(array)
    return np.stack(arrays)


def list_frame_folder(folder: str | os.PathLike, *, label: str | None = None) -> list[str]:
    """The frame file names of a video given as a folder of frame images, in play order: the folder's
    regular files whose suffix is one of FRAME_FILE_SUFFIXES (any case), sorted by name (plain string
    order: name frames with zero-padded numbers, "frame_0002.jpg" before "frame_0010.jpg"). Other
    files (a .txt, a .DS_Store) are ignored. MediaError for a missing or unreadable folder, or one
    without a frame image."""
    path = Path(os.fspath(folder))
    label = label or f"frame folder {str(path)!r}"
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        raise MediaError(f"{label}: folder not found") from None
    except NotADirectoryError:
        raise MediaError(f"{label}: not a folder") from None
    except OSError as e:
        raise MediaError(f"{label}: cannot list the folder ({type(e).__name__}: {e.strerror or e})") from None
    names = []
    for entry in entries:
        if not entry.name.lower().endswith(FRAME_FILE_SUFFIXES):
            continue
        try:  # a dangling symlink is kept, to be refused by name when read, not silently dropped
            keep = entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
        except OSError:  # unreadable: likewise refused when read
            keep = True
        if keep:
            names.append(entry.name)
    if not names:
        raise MediaError(f"{label}: no frame images ({', '.join(FRAME_FILE_SUFFIXES)} files) in the folder")
    return sorted(names)


def _is_frame_folder(src: Any, base_dir) -> bool:
    """Does a str / PathLike video source name an existing folder (a video given as frame images)?"""
    if isinstance(src, str) and (src[:5].lower() == "data:" or _URL_SCHEME.match(src)):
        return False
    try:
        return os.path.isdir(_resolve_path(src, base_dir))
    except (OSError, ValueError):
        return False


def _sample_frame_folder(src: str | os.PathLike, base_dir, max_frames: int, f: int,
                         interval: float, sampling: str, budgets: MediaBudgets) -> "_SampledFrames":
    """A frame folder thinned like a frame list (thin_frame_list) and checked against the video budgets
    (budgets.video_frame_pixels and video_pixels, the active PixelBudget) from the kept frames'
    headers BEFORE any frame is decoded. Its frame rate is 1 / interval, so frame k is at k * interval
    seconds: the authors' timestamps (mr2rm/data/dataset.py::_generate_timestamps_from_frames gives the
    frames, in order, idx * sampling_interval).

    A source may carry `open_frame(name) -> PathLike` (the reward server's confinement: each kept frame
    opened and checked under its media root) and `media_label` (its name in messages)."""
    if not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"frame_interval must be a positive number of seconds, got {interval!r}")
    path = _resolve_path(src, base_dir)
    display = getattr(src, "media_label", None) or str(path)
    label = f"frame folder {display!r}"
    names = list_frame_folder(path, label=label)
    total = len(names)
    if sampling == "reference":
        names = _reference_folder_order(names)
        indices = reference_thin_indices(total)
        sampled = len(indices)
    else:
        indices, sampled = _thin_indices(total, max_frames, f)
    chosen = sorted(set(indices))  # only the kept frames are opened and decoded
    opener = getattr(src, "open_frame", None)
    sources = {}
    try:
        size = None
        for i in chosen:
            frame_label = f"{label}: frame {names[i]!r}"
            sources[i] = opener(names[i]) if opener is not None else path / names[i]
            w, h = _image_size(Path(os.fspath(sources[i])), frame_label, budgets.video_frame_pixels,
                               budgets.name("video_frame_pixels"))
            if w * h > budgets.video_frame_pixels:
                raise MediaError(f"{frame_label}: {w}x{h} is over the limit of {budgets.video_frame_pixels} pixels "
                                 f"per frame ({budgets.name('video_frame_pixels')})")
            if size is not None and (w, h) != size:
                raise MediaError(f"{frame_label}: size {w}x{h} differs from frame {names[chosen[0]]!r}'s "
                                 f"{size[0]}x{size[1]}")
            size = (w, h)
        pixels = len(indices) * size[0] * size[1]
        if pixels > budgets.video_pixels:
            raise MediaError(f"{label}: {len(indices)} frames of {size[0]}x{size[1]} would decode to "
                             f"{pixels / 1e6:.0f} megapixels, over the limit of {budgets.video_pixels / 1e6:.0f} "
                             f"({budgets.name('video_pixels')})")
        _charge(pixels, label)
        decoded = {}
        for i in chosen:
            image = _decode_image(Path(os.fspath(sources[i])), f"{label}: frame {names[i]!r}", budgets=budgets,
                                  charge=False)
            decoded[i] = np.asarray(image)
            if decoded[i].shape[:2] != (size[1], size[0]):  # the file changed since its header was read
                raise MediaError(f"{label}: frame {names[i]!r} changed while it was read")
    finally:
        for source in sources.values():
            if hasattr(source, "close"):
                source.close()
    frames = np.stack([decoded[i] for i in indices])
    meta = None
    if sampling == "reference":  # molmo_utils' metadata for frames with timestamps (k * interval)
        times = np.array([i * interval for i in indices], dtype=np.float64)
        # one frame: theirs divides by the mean of no gaps (nan); mrrm takes 1 / interval
        rate = 1 / (times[1:] - times[:-1]).mean() if len(times) > 1 else 1 / interval
        meta = {"total_num_frames": len(indices), "fps": float(rate), "frames_indices": (times * rate).tolist()}
    return _SampledFrames(frames, indices, sampled, total, 1.0 / interval, display, "frames", meta)


class _SampledFrames(NamedTuple):
    """The frames load_video kept from a source, and how they were chosen."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    indices: list[int]  # index in the source of each frame, padding included
    num_sampled: int  # frames chosen before padding
    total_frames: int  # frames in the source
    source_fps: float
    path: str | None  # the resolved file or frame-folder path, None for a frame list
    backend: str  # "decord", "pyav" or "frames" (a frame list or folder)
    metadata: dict | None = None  # the processor's video metadata when the sampling fixes it ("reference")


def _sample_frame_list(src: Sequence[Any] | np.ndarray, base_dir, max_frames: int, f: int,
                       frames_fps: float, budgets: MediaBudgets) -> _SampledFrames:
    """A frame list or [F, H, W, 3] array at frames_fps, thinned evenly to floor_f(max_frames) frames."""
    if not (frames_fps > 0 and math.isfinite(frames_fps)):
        raise ValueError(f"frames_fps must be a positive number, got {frames_fps!r}")
    if isinstance(src, np.ndarray) and (src.dtype != np.uint8 or src.shape[-1] != 3):
        raise MediaError(f"frame array: must be uint8 [F, H, W, 3], got {src.dtype} {tuple(src.shape)}")
    if len(src) == 0:
        raise MediaError("frame list: zero frames")
    total = len(src)
    indices, sampled = _thin_indices(total, max_frames, f)
    if isinstance(src, np.ndarray):
        frames = src[indices]
    else:
        chosen = sorted(set(indices))  # decode only the frames kept
        decoded = dict(zip(chosen, _frames_from_list([src[i] for i in chosen], base_dir, budgets)))
        frames = np.stack([decoded[i] for i in indices])
    return _SampledFrames(frames, indices, sampled, total, float(frames_fps), None, "frames")


def _sample_video_file(src: str | os.PathLike, base_dir, fps: float, min_frames: int, max_frames: int, f: int,
                       backend: str | None, sampling: str, budgets: MediaBudgets) -> _SampledFrames:
    """A video file decoded by a backend, sampled with _plan_indices (as sample_frame_indices), or as
    the authors' code samples it (_plan_reference)."""
    if isinstance(src, str) and (src[:5].lower() == "data:" or _URL_SCHEME.match(src)):
        raise MediaError(f"video source {src[:100]!r}: URLs and data URLs are not supported; give a file path")
    resolved = _resolve_path(src, base_dir)
    last_plan: list = []  # the plan of the read that succeeded: (indices, sampled, metadata)

    def plan(total: int, source_fps: float, timeline) -> list[int]:
        if sampling == "reference":
            indices, meta = _plan_reference(total, source_fps, timeline)
            last_plan[:] = [(indices, len(indices), meta)]
        else:
            last_plan[:] = [(*_plan_indices(total, source_fps, fps, min_frames, max_frames, f), None)]
        return last_plan[0][0]

    # a caller's own name for an opened file (e.g. the reward server's /proc/self/fd path): `media_label`
    display = getattr(src, "media_label", None) or str(resolved)
    try:
        frames, total_frames, source_fps, name = _load_video_file(resolved, plan, backend, budgets)
    except MediaError as e:
        if display == str(resolved):
            raise
        raise MediaError(str(e).replace(str(resolved), display)) from None
    indices, sampled, meta = last_plan[0]
    if meta is not None:
        meta = dict(meta, video_backend=name)
    return _SampledFrames(frames, indices, sampled, total_frames, source_fps, display, name, meta)


def _clip(s: _SampledFrames) -> VideoClip:
    """The VideoClip of sampled frames: [F, H, W, 3] arrays become one [F, 3, H, W] tensor."""
    if s.frames.shape[0] != len(s.indices):  # a backend returned the wrong count
        raise MediaError(f"video {s.path or 'frame list'}: got {s.frames.shape[0]} frames for {len(s.indices)} indices")
    tensor = torch.from_numpy(np.ascontiguousarray(s.frames)).permute(0, 3, 1, 2).contiguous()
    return VideoClip(
        frames=tensor,
        sample_fps=s.source_fps * s.num_sampled / s.total_frames,
        source_fps=s.source_fps,
        frame_indices=tuple(int(i) for i in s.indices),
        duration_s=s.total_frames / s.source_fps,
        path=s.path,
        source_num_frames=int(s.total_frames),
        backend=s.backend,
        processor_metadata=s.metadata,
    )


def load_video(
    src: Any,
    *,
    base_dir: str | os.PathLike | None = None,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    frame_factor: int = 2,
    backend: str | None = None,
    frames_fps: float = 2.0,
    frame_interval: float = DEFAULT_FRAME_INTERVAL,
    sampling: str = "qwen",
    budgets: MediaBudgets = DEFAULT_MEDIA_BUDGETS,
) -> VideoClip:
    """Decode and sample a video (see the module doc).

    src: a path (``str`` / ``os.PathLike``; relative to ``base_dir`` when given) of a video file or of
    a FOLDER of frame images, or a list of frames (PIL images, HxWx3 uint8 arrays, or any other
    `load_image` source; all of one size) or a [F, H, W, 3] uint8 array. A file is sampled at ``fps``
    with `sample_frame_indices`; a frame list is kept whole at ``frames_fps``, thinned evenly to
    floor_f(max_frames) frames when longer, and padded by repeating its last frame to a multiple of
    ``frame_factor``. A folder (`list_frame_folder`: its .jpeg/.jpg/.png files in name order) is thinned
    like a frame list BEFORE decoding, its frames ``frame_interval`` seconds apart (the authors' 4.0).
    sampling="reference" samples files and folders as the authors' code does (VIDEO_SAMPLING; fps,
    min_frames and max_frames then do not apply to them, and nothing is padded).
    budgets: the video limits (video_frame_pixels, video_pixels; image_pixels for each frame of a list
    given as encoded images), checked from headers before any frame is decoded.
    """
    _check_sampling_args(fps, min_frames, max_frames, frame_factor)
    if sampling not in VIDEO_SAMPLING:
        raise ValueError(f"sampling must be one of {VIDEO_SAMPLING}, got {sampling!r}")
    if sampling == "reference":
        frame_factor = 1
    if isinstance(src, (list, tuple)) or (isinstance(src, np.ndarray) and src.ndim == 4):
        sampled = _sample_frame_list(src, base_dir, max_frames, frame_factor, frames_fps, budgets)
    elif isinstance(src, (str, os.PathLike)) and _is_frame_folder(src, base_dir):
        sampled = _sample_frame_folder(src, base_dir, max_frames, frame_factor, frame_interval, sampling, budgets)
    elif isinstance(src, (str, os.PathLike)):
        sampled = _sample_video_file(src, base_dir, fps, min_frames, max_frames, frame_factor, backend, sampling,
                                     budgets)
    else:
        raise MediaError(f"video source: unsupported type {type(src).__name__}")
    return _clip(sampled)


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def _fingerprint_update(h, src: Any, base_dir) -> None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        h.update(b"encoded\0")
        h.update(bytes(src))
    elif isinstance(src, Image.Image):
        h.update(f"pixels\0{src.mode}\0{src.size[0]}x{src.size[1]}\0".encode())
        h.update(src.tobytes())
    elif isinstance(src, np.ndarray):
        array = np.ascontiguousarray(src)
        h.update(f"array\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    elif isinstance(src, dict):
        _fingerprint_update(h, _hf_dict_source(src, "media")[0], base_dir)
    elif isinstance(src, (list, tuple)):
        h.update(f"list\0{len(src)}\0".encode())
        for item in src:
            h.update(media_fingerprint(item, base_dir=base_dir).encode())
    elif isinstance(src, (str, os.PathLike)):
        if isinstance(src, str):
            kind, value, label = _classify_string(src, base_dir, what="media")
        else:
            path = _resolve_path(src, base_dir)
            kind, value, label = "path", path, f"media file {str(path)!r}"
        if kind == "bytes":
            _fingerprint_update(h, value, base_dir)
            return
        if value.is_dir():  # a video as a folder of frames: its frame names and contents, in order
            names = list_frame_folder(value)
            h.update(f"folder\0{len(names)}\0".encode())
            for name in names:
                h.update(name.encode("utf-8", "surrogateescape") + b"\0")
                h.update(media_fingerprint(value / name).encode())
            return
        _check_file(value, label)
        h.update(b"encoded\0")
        with open(value, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        raise MediaError(f"media source: unsupported type {type(src).__name__}")


def media_fingerprint(src: Any, *, base_dir: str | os.PathLike | None = None) -> str:
    """A short (16 hex digits) stable hash of a media source's content.

    Paths (image or video, read whole), bytes, base64 strings, data URLs and HF dicts hash the
    encoded bytes, so they agree for the same file; PIL images and arrays hash mode, size and
    pixels; a list (of frames) hashes its items in order. Raises MediaError for a missing path.
    """
    h = hashlib.blake2b(digest_size=8)
    _fingerprint_update(h, src, base_dir)
    return h.hexdigest()
