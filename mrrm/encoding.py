"""Encoding: a sample dict -> per-sample token layout and media tensors; a list of those -> model inputs.

A sample (the published JSONL schema): {"prompt": str, "responses": [str, ...], optional "image" /
"images" (path, PIL image, bytes, base64, or a list of those), "video" / "videos" (path or frame
list), optional "id"}. Rankings are not needed for scoring.

Token layout (Qwen-VL chat format):
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{media}{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n r_1 \\n\\n<|resp_sep|>\\n\\n r_2 ... r_N
The media placeholders are expanded by the backbone's own processor (so Qwen3-VL's per-frame
timestamps come out right). The prompt and every response are tokenized with special-token text
kept as plain text (`split_special_tokens=True`): a response containing "<|resp_sep|>" or
"<|image_pad|>" can neither forge a response boundary nor open a media slot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import media
from .packing import PackedBatch, SampleLayout, pack

SEPARATOR_TEXT = "\n\n<|resp_sep|>\n\n"
RESP_SEP = "<|resp_sep|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


class SampleError(ValueError):
    """A sample that cannot be scored: names its index (and id) and the reason."""

    def __init__(self, index: int, reason: str, sample_id: Any = None):
        self.index, self.reason, self.sample_id = index, reason, sample_id
        where = f"sample {index}" + (f" (id={sample_id!r})" if sample_id is not None else "")
        super().__init__(f"{where}: {reason}")


class BatchError(ValueError):
    """Several bad samples, all reported at once (validation runs before any compute)."""

    def __init__(self, errors: list[SampleError]):
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} bad sample(s):\n  {lines}")


@dataclass
class EncodedSample:
    """One sample ready to pack: its token layout and its media tensors (None when absent)."""

    layout: SampleLayout
    index: int
    sample_id: Any = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        lay = self.layout
        return len(lay.prefix_ids) + sum(len(r) for r in lay.response_ids) + \
            len(lay.separator_ids) * (len(lay.response_ids) - 1)


@dataclass
class ModelInputs:
    """A packed micro-batch with its media: what RewardModel.forward takes."""

    packed: PackedBatch
    mm_token_type_ids: torch.Tensor  # int32 [T]: 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def to(self, device, dtype=None) -> "ModelInputs":
        def mv(t, float_ok=False):
            if t is None:
                return None
            if float_ok and dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return ModelInputs(self.packed.to(device), mv(self.mm_token_type_ids), mv(self.pixel_values, True),
                           mv(self.image_grid_thw), mv(self.pixel_values_videos, True), mv(self.video_grid_thw))


def _as_list(x, frames_ok=False):
    """One media source or a list of them. With frames_ok (videos), a list of frames is one video."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) and not (frames_ok and _is_frame_list(x)) else [x]


def _is_frame_list(x):
    """A video given as a list of frames (PIL images or arrays), not a list of videos."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    return not isinstance(first, (str, bytes, list, tuple, dict)) and hasattr(first, "size")


class Encoder:
    """Turns sample dicts into EncodedSamples for one backbone's tokenizer and processor.

    processor: the family's HF processor (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor)
      or None for a text-only backbone (then `tokenizer` is used alone).
    rope_index_fn: (input_ids [1,P], mm_token_type_ids [1,P], image_grid_thw, video_grid_thw,
      second_per_grid_ts) -> position ids [3, 1, P] (the backbone's get_rope_index), or None for 1-D.
    """

    def __init__(self, tokenizer, processor=None, *, rope_index_fn=None, system_prompt="You are a helpful assistant.",
                 max_length=8192, media_base_dir=None, video_fps=2.0, video_max_frames=64, score_at="last"):
        self.tokenizer = tokenizer
        self.processor = processor
        self.rope_index_fn = rope_index_fn
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.media_base_dir = media_base_dir
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.score_at = score_at
        sep_id = tokenizer.convert_tokens_to_ids(RESP_SEP)
        if sep_id is None or sep_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {RESP_SEP} token; add it as a special token first "
                             "(RewardModel does this when it builds or loads a backbone)")
        self.separator_ids = self._ids(SEPARATOR_TEXT, special=True)
        if self.separator_ids.count(sep_id) != 1:
            raise ValueError(f"the separator {SEPARATOR_TEXT!r} must tokenize to exactly one {RESP_SEP} token")
        self.separator_index = self.separator_ids.index(sep_id)
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_pad_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")

    # -- tokenization ---------------------------------------------------------------------------
    def _ids(self, text: str, *, special: bool) -> list[int]:
        """special=False keeps special-token text (e.g. "<|resp_sep|>") as plain text."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    def _head_text(self, n_images: int, n_videos: int) -> str:
        system = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else ""
        return system + "<|im_start|>user\n" + IMAGE_PLACEHOLDER * n_images + VIDEO_PLACEHOLDER * n_videos

    # -- validation + encoding ------------------------------------------------------------------
    def encode(self, sample: dict, index: int = 0) -> EncodedSample:
        """Validate and encode one sample; raises SampleError naming `index` (and the id)."""
        sid = sample.get("id", sample.get("ID")) if isinstance(sample, dict) else None
        try:
            return self._encode(sample, index, sid)
        except SampleError:
            raise
        except media.MediaError as e:
            raise SampleError(index, str(e), sid) from e

    def _encode(self, sample, index, sid):
        if not isinstance(sample, dict):
            raise SampleError(index, f"a sample must be a dict, got {type(sample).__name__}")
        prompt = sample.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SampleError(index, "missing or empty 'prompt' (a non-empty string)", sid)
        responses = sample.get("responses")
        if not isinstance(responses, (list, tuple)) or len(responses) == 0:
            raise SampleError(index, "'responses' must be a non-empty list of strings", sid)
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise SampleError(index, f"response {i} is a {type(r).__name__}, not a string", sid)
        images = _as_list(sample.get("images", sample.get("image")))
        videos = _as_list(sample.get("videos", sample.get("video")), frames_ok=True)
        if (images or videos) and self.processor is None:
            raise SampleError(index, "this backbone is text-only; the sample has an image or video", sid)
        pil_images = [media.load_image(im, base_dir=self.media_base_dir) for im in images]
        clips = [media.load_video(v, base_dir=self.media_base_dir, fps=self.video_fps,
                                  max_frames=self.video_max_frames) for v in videos]
        head = self._head_text(len(pil_images), len(clips))
        out = {}
        if pil_images or clips:
            kwargs = {}
            if clips:
                kwargs["videos_kwargs"] = {"do_sample_frames": False,
                                           "video_metadata": [c.video_metadata() for c in clips]}
            try:
                out = self.processor(text=[head], images=pil_images or None, videos=[c.frames for c in clips] or None,
                                     return_tensors="pt", **kwargs)
            except Exception as e:  # the processor's own complaint, attributed to this sample
                raise SampleError(index, f"the processor rejected the media: {type(e).__name__}: {e}", sid) from e
            head_ids = out["input_ids"][0].tolist()
            head_types = out["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in out else None
        else:
            head_ids, head_types = self._ids(head, special=True), None
        prompt_ids = self._ids(prompt, special=False)
        tail_ids = self._ids("<|im_end|>\n<|im_start|>assistant\n", special=True)
        prefix = head_ids + prompt_ids + tail_ids
        resp_ids = []
        for i, r in enumerate(responses):
            ids = self._ids(r, special=False)
            if not ids:
                raise SampleError(index, f"response {i} is empty", sid)
            resp_ids.append(ids)
        enc = EncodedSample(layout=SampleLayout(prefix_ids=prefix, response_ids=resp_ids,
                                                separator_ids=self.separator_ids, separator_index=self.separator_index,
                                                sample_id=sid if sid is not None else index),
                            index=index, sample_id=sid,
                            pixel_values=out.get("pixel_values"), image_grid_thw=out.get("image_grid_thw"),
                            pixel_values_videos=out.get("pixel_values_videos"), video_grid_thw=out.get("video_grid_thw"),
                            second_per_grid_ts=out.get("second_per_grid_ts"))
        n = enc.num_tokens + (len(self.separator_ids) if self.score_at == "separator" else 0)
        if self.max_length and n > self.max_length:
            raise SampleError(index, f"{n} tokens exceed the length limit max_length={self.max_length} "
                                     f"({len(prefix)} prompt+media, {n - len(prefix)} responses+separators)", sid)
        if self.rope_index_fn is not None and (pil_images or clips):
            types = torch.tensor(head_types + [0] * (len(prefix) - len(head_types)), dtype=torch.int32)
            pos = self.rope_index_fn(torch.tensor([prefix]), types[None], enc.image_grid_thw, enc.video_grid_thw,
                                     enc.second_per_grid_ts)
            enc.layout.prefix_positions = pos[:, 0, :].to(torch.int64)
        return enc

    def encode_all(self, samples: Sequence[dict], *, errors: str = "raise"):
        """Encode every sample. errors='raise': a BatchError listing every bad sample (before any
        compute); errors='skip': bad samples become None in the returned list, with the errors."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        encoded, bad = [], []
        for i, s in enumerate(samples):
            try:
                encoded.append(self.encode(s, i))
            except SampleError as e:
                bad.append(e)
                encoded.append(None)
        if bad and errors == "raise":
            raise BatchError(bad)
        return encoded, bad


def _cat(parts):
    parts = [p for p in parts if p is not None]
    return torch.cat(parts, 0) if parts else None


def attach_media(packed: PackedBatch, encoded: Sequence[EncodedSample], *, image_pad_id=None,
                 video_pad_id=None) -> ModelInputs:
    """Join a packed batch with its samples' media (`encoded[b]` is packed sample b). Media follow
    the order of their placeholder tokens in the stream: once per sample in joint/independent
    modes, once per sequence in single mode (the conventional reward model re-encodes the image
    for every response)."""
    reps = [1] * len(encoded)
    if packed.mode == "single":
        reps = [len(e.layout.response_ids) for e in encoded]
    pv, ig, pvv, vg = [], [], [], []
    for e, r in zip(encoded, reps):
        for _ in range(r):
            pv.append(e.pixel_values)
            ig.append(e.image_grid_thw)
            pvv.append(e.pixel_values_videos)
            vg.append(e.video_grid_thw)
    types = torch.zeros(packed.num_tokens, dtype=torch.int32)
    if image_pad_id is not None:
        types[packed.input_ids == image_pad_id] = 1
    if video_pad_id is not None:
        types[packed.input_ids == video_pad_id] = 2
    return ModelInputs(packed, types, _cat(pv), _cat(ig), _cat(pvv), _cat(vg))


def collate(encoded: Sequence[EncodedSample], mode: str = "joint", *, score_at: str = "last",
            image_pad_id=None, video_pad_id=None) -> ModelInputs:
    """Pack encoded samples into one ModelInputs (see attach_media for the media order)."""
    packed = pack([e.layout for e in encoded], mode, score_at=score_at)
    return attach_media(packed, encoded, image_pad_id=image_pad_id, video_pad_id=video_pad_id)


def with_cyclic_orders(encoded: EncodedSample, k: int) -> list[tuple[EncodedSample, list[int]]]:
    """k copies of a sample whose responses are cyclically shifted (evenly spaced shifts, k capped
    at N); each with `order` such that copy.responses[j] = original.responses[order[j]]."""
    n = len(encoded.layout.response_ids)
    k = max(1, min(k, n))
    out = []
    for j in range(k):
        shift = round(j * n / k)
        order = [(i + shift) % n for i in range(n)]
        lay = dataclasses.replace(encoded.layout, response_ids=[encoded.layout.response_ids[o] for o in order])
        out.append((dataclasses.replace(encoded, layout=lay), order))
    return out
