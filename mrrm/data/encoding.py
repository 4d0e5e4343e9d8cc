"""Encoding: a sample dict -> per-sample token layout and media tensors; a list of those -> model inputs.

A sample (the published JSONL schema): {"prompt" (or "question"): str, "responses": [str, ...], optional
"image" / "images" (path, PIL image, bytes, base64, or a list of those), "video" / "videos" (a video
file, a folder of frame images, or a frame list), optional "sampling_interval" (seconds between a
folder's frames, default 4.0), optional "id"}. Rankings are not needed for scoring.

The token layout is the authors' (github yinuoyang01/multi-response-rm,
`mr2rm/data/dataset.py::collate_multi_response_reward`), because their checkpoints were trained on
it. The checkpoint's own chat template renders

    user turn:      the media blocks, then the prompt text
    assistant turn: the N responses joined by "\\n\\n<|resp_sep|>\\n\\n"

(`add_generation_prompt=False`, no system prompt beyond what the template itself writes), and the
rendered text is tokenized as ONE string (BPE merges across a response's end and the separator's
newlines happen, ".\\n\\n" is one token for Qwen), media placeholders expanded by the backbone's own
processor (which also adds Molmo2's BOS when media are present). Response i < N is scored at the
token right before its <|resp_sep|>, the last response at the last token of the sequence (for Qwen
templates the "\\n" after <|im_end|>).

One deliberate difference: special-token text inside the prompt or a response ("<|resp_sep|>",
"<|image_pad|>", "<|im_end|>", ...) stays plain text, through the scheme of transformers' own
control-token marking (`sanitize_control_tokens`; mrrm's own where a transformers lacks it): it can
neither forge a response boundary nor open a media slot. Text without such strings tokenizes
exactly as in the authors' code.

`independent` and `single` modes need each response *alone*: the same template with an assistant
turn holding only that response (what the authors' code builds for N = 1), scored at its last
token. The tokens before the first response token that every variant shares are the layout's
prefix (see mrrm.data.packing).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mrrm.data import media
from mrrm.data.packing import PackedBatch, SampleLayout
from mrrm.errors import BatchError, SampleError

SEPARATOR_TEXT = "\n\n<|resp_sep|>\n\n"
RESP_SEP = "<|resp_sep|>"
# private-use markers around special-token text from user strings (transformers' _CONTROL_TOKEN_START
# / _END, so the processor's own sanitizing reads the same marks)
CONTROL_START, CONTROL_END = "\U000f0000", "\U000f0001"
# stands in for the assistant text while the template renders, to find where that text goes
_CONTENT_SENTINEL = "\x00mrrm:assistant-content\x00"


# how much a tokenizer normalizer can shrink text (characters in / characters out), by type; a type not
# listed (Replace, Strip, ...) can shrink it without bound
_NORMALIZER_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 1, "Prepend": 1, "BertNormalizer": None}


def _replace_shrink(spec) -> int | None:
    """A Replace normalizer of one fixed string by another (sentencepiece's " " -> "\u2581") shrinks text by
    at most len(pattern) / len(content), rounded up; a regex pattern or an empty content: no bound."""
    pattern, content = spec.get("pattern") or {}, spec.get("content")
    literal = pattern.get("String") if isinstance(pattern, dict) else None
    if not isinstance(literal, str) or not literal or not isinstance(content, str) or not content:
        return None
    return max(1, -(-len(literal) // len(content)))


def _normalizer_shrink(spec) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Replace":
        return _replace_shrink(spec)
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    return _NORMALIZER_SHRINK.get(kind)


def text_char_limit(tokenizer, max_length) -> int | None:
    """A number of characters that text longer than can never fit `max_length` tokens: every token covers at
    most as many characters as its vocabulary entry is long (byte-level and sentencepiece vocabularies), after
    a normalizer that shrinks text at most by a known factor. Lets a 10 MB response be refused before the
    tokenizer spends seconds on it. None when no such bound is known (then only the token count decides)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not max_length or backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - a tokenizer that cannot describe itself: no bound
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    if shrink is None or longest == 0:
        return None
    return int(max_length) * longest * shrink


# Where no sound bound is known (a normalizer that can shrink text without bound, such as BertNormalizer),
# the default text budget assumes at most this many characters per token of max_length: longer text is
# refused, naming the budget to raise. Natural text averages under 10 characters per token.
FALLBACK_CHARS_PER_TOKEN = 32


def _utf8_len(text: str) -> int:
    if text.isascii():  # O(1) for CPython's compact ASCII strings
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class TextBudgets:
    """Text refused BEFORE anything is tokenized: characters and UTF-8 bytes per response and per sample
    (the prompt and all responses together); None = no limit. A tokenizer spends seconds and gigabytes on
    megabytes of text (10 MB with the built-in tokenizer: +1.9 GB, 16.6 s), so text over a budget never
    reaches it.

    `for_tokenizer` derives the defaults from `text_char_limit` (a sound bound: more characters never fit
    `max_length` tokens), else `max_length * FALLBACK_CHARS_PER_TOKEN`; bytes default to 4 bytes per
    character (UTF-8's most), so only a byte budget set lower binds. `note` says where the numbers come
    from, for the messages."""

    sample_chars: int | None = None
    response_chars: int | None = None
    sample_bytes: int | None = None
    response_bytes: int | None = None
    note: str = field(default="", compare=False)
    overridden: frozenset = field(default=frozenset(), compare=False)

    FIELDS = ("sample_chars", "response_chars", "sample_bytes", "response_bytes")
    # the command-line flag of each budget (python -m mrrm.score / mrrm.eval)
    FLAGS = {"sample_chars": "--max-text-chars", "response_chars": "--max-response-chars",
             "sample_bytes": "--max-text-bytes", "response_bytes": "--max-response-bytes"}

    def __post_init__(self):
        for name in self.FIELDS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"text budget {name} must be a positive int or None, got {v!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer, max_length) -> "TextBudgets":
        bound = text_char_limit(tokenizer, max_length)
        if bound is not None:
            note = f"more characters never fit max_length={max_length} tokens with this tokenizer"
        elif max_length:
            bound = int(max_length) * FALLBACK_CHARS_PER_TOKEN
            note = (f"max_length={max_length} tokens x {FALLBACK_CHARS_PER_TOKEN} characters; this tokenizer's "
                    "normalizer gives no sound bound")
        else:
            return cls()
        return cls(bound, bound, 4 * bound, 4 * bound, note=note)

    def replace(self, **overrides) -> "TextBudgets":
        """These budgets with some replaced (None values keep the current one)."""
        unknown = sorted(set(overrides) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"unknown text budget(s) {unknown}; known: {list(self.FIELDS)}")
        changed = {k: v for k, v in overrides.items() if v is not None}
        if not changed:
            return self
        return dataclasses.replace(self, **changed, overridden=self.overridden | set(changed))

    def check(self, prompt: str, responses: Sequence[str]) -> str | None:
        """Why this text is over a budget, or None. Characters first (free), then bytes (one encode for
        text that is not ASCII)."""
        def over(what, n, unit, name):
            limit = getattr(self, name)
            scope = "response" if name.startswith("response") else "sample (prompt and responses)"
            note = f"; {self.note}" if self.note and name not in self.overridden else ""
            return (f"{what} is {n} {unit}, over the text budget of {limit} {unit} per {scope} "
                    f"({self.FLAGS[name]}, or model.encoder.set_text_budgets{note}); it was not tokenized")

        texts = [prompt, *responses]
        if self.response_chars is not None:
            for i, r in enumerate(responses):
                if len(r) > self.response_chars:
                    return over(f"response {i}", len(r), "characters", "response_chars")
        if self.sample_chars is not None:
            chars = sum(map(len, texts))
            if chars > self.sample_chars:
                return over("the text", chars, "characters", "sample_chars")
        if self.response_bytes is not None or self.sample_bytes is not None:
            sizes = [_utf8_len(t) for t in texts]
            if self.response_bytes is not None:
                for i, n in enumerate(sizes[1:]):
                    if n > self.response_bytes:
                        return over(f"response {i}", n, "bytes (UTF-8)", "response_bytes")
            if self.sample_bytes is not None and sum(sizes) > self.sample_bytes:
                return over("the text", sum(sizes), "bytes (UTF-8)", "sample_bytes")
        return None

    def check_sample(self, sample: dict) -> str | None:
        """`check` on a sample dict's prompt (or question) and responses, where they are strings (other
        problems are the encoder's to report)."""
        prompt = sample.get("prompt") or sample.get("question")
        responses = sample.get("responses")
        prompt = prompt if isinstance(prompt, str) else ""
        responses = [r for r in responses if isinstance(r, str)] if isinstance(responses, (list, tuple)) else []
        return self.check(prompt, responses)


@dataclass
class SampleText:
    """What re-tokenizing a sample's responses in another order needs (no media work again):
    the assistant turn is `head + content + tail`, where content is the responses (their special-
    token text marked as plain text) joined by the separator; `head` starts right after the last
    special token before the content, where the prefix tokens end."""

    head: str
    responses: list[str]
    tail: str
    prefix_tokens: int  # tokens of the prefix before the shared start of the assistant turn
    head_ids: list[int] = field(default_factory=list)  # the tokens of `head` alone


@dataclass
class EncodedSample:
    """One sample ready to pack: its token layout, its media tensors (the processor's outputs, e.g.
    pixel_values / image_grid_thw for Qwen, pixel_values / image_token_pooling / image_grids /
    image_num_crops for Molmo2; empty when the sample has none) and its text for reordering."""

    layout: SampleLayout
    index: int
    sample_id: Any = None
    media: dict = field(default_factory=dict)
    text: SampleText | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the joint stream (the longest of the three modes' per-sample streams but single)."""
        lay = self.layout
        return len(lay.prefix_ids) + len(lay.joint_ids)

    def __getattr__(self, name):  # media by name: enc.pixel_values, enc.image_grid_thw, ...
        m = self.__dict__.get("media")
        if m is not None and name in _MEDIA_KEYS:
            return m.get(name)
        raise AttributeError(name)


# The processors' media outputs that the backbones take (everything else they return is text).
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "image_token_pooling", "image_grids", "image_num_crops", "video_token_pooling", "video_grids")
# Index tensors into the flattened patches of all crops / frames of a batch: offset when joined.
_POOLING_KEYS = {"image_token_pooling": "pixel_values", "video_token_pooling": "pixel_values_videos"}


@dataclass
class ModelInputs:
    """A packed micro-batch with its media: what RewardModel.forward takes."""

    packed: PackedBatch
    mm_token_type_ids: torch.Tensor  # int32 [T]: 0 text, 1 image, 2 video
    media: dict = field(default_factory=dict)

    def to(self, device, dtype=None) -> "ModelInputs":
        def mv(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return ModelInputs(self.packed.to(device), self.mm_token_type_ids.to(device),
                           {k: mv(v) for k, v in self.media.items()})

    def __getattr__(self, name):
        m = self.__dict__.get("media")
        if m is not None and name in _MEDIA_KEYS:
            return m.get(name)
        raise AttributeError(name)


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


def _frame_interval(sample: dict, index: int, sid) -> float:
    """Seconds between the frames of a video given as a folder of frames: the sample's
    "sampling_interval", else its "fps", else 4.0, read as the authors' reference reads them
    (mr2rm/data/dataset.py::_resolve_videos: float(item.get("sampling_interval", item.get("fps", 4.0)));
    note that "fps" is taken there as seconds per frame). Video files and frame lists ignore it."""
    for key in ("sampling_interval", "fps"):
        value = sample.get(key)
        if value is None:
            continue
        try:
            interval = float(value)
        except (TypeError, ValueError):
            interval = float("nan")
        if isinstance(value, bool) or not (interval > 0 and math.isfinite(interval)):
            raise SampleError(index, f"{key!r} must be a positive number of seconds between frames, got {value!r}",
                              sid)
        return interval
    return media.DEFAULT_FRAME_INTERVAL


def _check_media_budgets(budgets) -> media.MediaBudgets:
    if not isinstance(budgets, media.MediaBudgets):
        raise TypeError(f"media_budgets must be an mrrm.data.media.MediaBudgets, got {type(budgets).__name__}")
    return budgets


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Encoder:
    """Turns sample dicts into EncodedSamples in the authors' layout for one backbone.

    tokenizer / processor: the checkpoint's (processor None for a text-only backbone).
    chat_template: overrides the processor's / tokenizer's own template (which is used otherwise).
    rope_index_fn: (input_ids [1,P], mm_token_type_ids [1,P], media dict) -> position ids [K, 1, P]
      (the backbone's get_rope_index), or None for 1-D positions.
    one_media_kind: the backbone takes images or a video per sample, not both (Molmo2).
    media_budgets: the mrrm.data.media.MediaBudgets every sample's media are loaded under (default
      DEFAULT_MEDIA_BUDGETS; `set_media_budgets`); like `text_budgets`, they travel with the encoder.
    """

    def __init__(self, tokenizer, processor=None, *, rope_index_fn=None, chat_template=None, max_length=8192,
                 media_base_dir=None, video_fps=2.0, video_max_frames=64, one_media_kind=False,
                 video_sampling="qwen", media_budgets: media.MediaBudgets = media.DEFAULT_MEDIA_BUDGETS):
        self.tokenizer = tokenizer
        self.processor = processor
        self.rope_index_fn = rope_index_fn
        self.max_length = max_length
        self.max_text_chars = text_char_limit(tokenizer, max_length)
        self.text_budgets = TextBudgets.for_tokenizer(tokenizer, max_length)
        self.media_budgets = _check_media_budgets(media_budgets)
        self.media_base_dir = media_base_dir
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.video_sampling = video_sampling
        self.one_media_kind = one_media_kind
        self.offset_pooling = _pooling_indexes_whole_sample(processor)
        self.sep_id = tokenizer.convert_tokens_to_ids(RESP_SEP)
        if self.sep_id is None or self.sep_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {RESP_SEP} token; add it as a special token first "
                             "(RewardModel does this when it builds or loads a backbone)")
        self.chat_template = chat_template or getattr(processor, "chat_template", None) or \
            getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("the checkpoint has no chat template (neither its processor nor its tokenizer); the "
                             "authors' layout renders every sample with it: pass chat_template=")
        if not isinstance(self.chat_template, str):
            raise ValueError("chat_template must be one template string (a dict of named templates is not supported)")
        # Special-token text in user strings is marked and then encoded as plain text.
        specials = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        self._control_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")
        self._special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")
        added = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
        self._markers_re = re.compile(f"{CONTROL_START}({'|'.join(map(re.escape, added)) or '(?!)'}){CONTROL_END}"
                                      f"|[{CONTROL_START}{CONTROL_END}]")
        self._newline_ids = tokenizer.encode("\n", add_special_tokens=False)
        # processors that keep marked special-token text plain (transformers' sanitize_control_tokens)
        self._processor_sanitizes = processor_sanitizes_control_tokens()
        # Qwen-VL vision blocks, to check the processor's prompt (see `_process_media`)
        ids = [tokenizer.convert_tokens_to_ids(getattr(processor, a, None) or "") if processor is not None else None
               for a in ("vision_start_token", "vision_end_token")]
        self._vision_start_id, self._vision_end_id = (
            (None, None) if any(i is None or i == tokenizer.unk_token_id for i in ids)
            or not getattr(processor, "video_token", None) else ids)
        self._collapse_video_wrapper = False
        self._leading = self._special_tokens_added(tokenizer)
        types = {}
        if processor is not None:
            for kind, ids in ((1, getattr(processor, "image_token_ids", [])), (2, getattr(processor, "video_token_ids", []))):
                for i in ids or []:
                    if i is not None and i >= 0:
                        types.setdefault(int(i), kind)
        self.media_token_types = types  # token id -> 1 (image) / 2 (video)
        self.image_pad_id = getattr(processor, "image_token_id", None)
        self.video_pad_id = getattr(processor, "video_token_id", None)

    @staticmethod
    def _special_tokens_added(tokenizer) -> list[int]:
        """The ids a plain `tokenizer(text)` call puts before the text (a BOS post-processor); the
        authors' code tokenizes text-only samples that way. Appended ones are not supported."""
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if at is None or len(full) - at - len(plain) != 0:
            raise ValueError("the tokenizer appends special tokens after the text; mrrm's reference layout does "
                             "not support that")
        return full[:at]

    # -- text ------------------------------------------------------------------------------------
    def _mark(self, text: str) -> str:
        """User text with its special-token text wrapped in private-use markers (any markers it already
        holds dropped first, so none can be forged), for `_ids` to encode as plain text."""
        text = text.replace(CONTROL_START, "").replace(CONTROL_END, "")
        return self._control_re.sub(f"{CONTROL_START}\\g<0>{CONTROL_END}", text)

    def _ids(self, text: str) -> list[int]:
        """Token ids of rendered text: the template's special tokens are special, marked special-token
        text from user strings is plain text. The scheme of transformers' own control-token marking
        (mark_control_tokens / encode_marked_chat, private helpers that only recent transformers have and
        whose signature changed): the text is split at the markers, the marked tokens are encoded
        without added tokens, everything else normally."""
        pieces = self._markers_re.split(text)
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # odd pieces are marked tokens
            ids += self._plain_ids(piece) if as_text else self._encode_piece(piece, False)
        return ids

    def _plain_ids(self, token_text: str) -> list[int]:
        """Ids of one piece of marked special-token text, encoded as plain text."""
        piece_ids = self._encode_piece(token_text, True)
        if self.tokenizer.convert_tokens_to_ids(token_text) in piece_ids:
            raise ValueError(f"cannot keep {token_text!r} plain text: the tokenizer produces it from plain text")
        return piece_ids

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        """A piece from the middle of a rendered chat, encoded after a newline that is then removed (so a
        SentencePiece tokenizer adds no prefix space), ignoring added tokens when `as_text`."""
        tok = self.tokenizer
        if as_text and hasattr(tok, "_encode_without_added_tokens"):
            encode = tok._encode_without_added_tokens
        elif as_text:  # transformers before the helper: special tokens split into text
            def encode(t):
                return tok.encode(t, add_special_tokens=False, split_special_tokens=True)
        else:
            def encode(t):
                return tok.encode(t, add_special_tokens=False)
        ids = encode("\n" + piece)
        if ids[:len(self._newline_ids)] == self._newline_ids:
            return ids[len(self._newline_ids):]
        return encode(piece)

    def _render(self, n_images: int, n_videos: int, prompt: str, assistant: str) -> str:
        user = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": assistant}]}]
        owner = self.processor if self.processor is not None else self.tokenizer
        return owner.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                         add_generation_prompt=False)

    def _prefix_boundary(self, head: str) -> int:
        """End of the last real special token before the assistant content: text on either side of
        a special token is tokenized independently, so the prefix tokens end exactly there."""
        ends = [m.end() for m in self._special_re.finditer(head)
                if not (m.start() and head[m.start() - 1] == "\U000f0000")]
        return ends[-1] if ends else 0

    def _joint(self, text: SampleText, order: Sequence[int] | None = None):
        """The joint assistant turn (responses in `order`): its ids, each response's score and start
        offsets (relative to the end of `text.prefix_tokens`)."""
        resp = text.responses if order is None else [text.responses[o] for o in order]
        joint = self._ids(text.head + SEPARATOR_TEXT.join(resp) + text.tail)
        seps = [i for i, t in enumerate(joint) if t == self.sep_id]
        if len(seps) != len(resp) - 1:
            raise RuntimeError(f"expected {len(resp) - 1} {RESP_SEP} tokens in the joint turn, found {len(seps)}")
        first = _common_prefix(text.head_ids, joint)
        return joint, [p - 1 for p in seps] + [len(joint) - 1], [first] + [p + 1 for p in seps]

    def _alone(self, text: SampleText):
        """Every response alone in the assistant turn: ids and the start offset of its own tokens."""
        alone = [self._ids(text.head + r + text.tail) for r in text.responses]
        return alone, [_common_prefix(text.head_ids, ids) for ids in alone]

    def _layout(self, prefix_ids, text: SampleText, sample_id=None, prefix_positions=None) -> SampleLayout:
        joint, joint_scores, joint_starts = self._joint(text)
        alone, alone_starts = self._alone(text)
        # Tokens before the first response token, the same in every variant, join the prefix (the
        # assistant header): shared in independent mode, and counted once.
        common = min(alone_starts + [joint_starts[0]])
        return SampleLayout(prefix_ids=list(prefix_ids) + joint[:common], response_ids=[a[common:] for a in alone],
                            joint_ids=joint[common:], joint_score_offsets=[s - common for s in joint_scores],
                            response_starts=[s - common for s in alone_starts],
                            joint_starts=[s - common for s in joint_starts], prefix_positions=prefix_positions,
                            sample_id=sample_id)

    # -- validation + encoding ------------------------------------------------------------------
    def encode(self, sample: dict, index: int = 0, *, media_dir=None) -> EncodedSample:
        """Validate and encode one sample; raises SampleError naming `index` (and the id).
        media_dir: base directory of this call's relative media paths (default: the encoder's
        media_base_dir); a per-call option, so a shared (cached) model is never changed."""
        sid = sample.get("id", sample.get("ID")) if isinstance(sample, dict) else None
        try:
            return self._encode(sample, index, sid, self.media_base_dir if media_dir is None else media_dir)
        except SampleError:
            raise
        except media.MediaError as e:
            raise SampleError(index, str(e), sid) from e

    def _check_text(self, sample, index, sid):
        # "question" is the authors' other name for the prompt (mr2rm/data/dataset.py::_process_sample:
        # item.get("prompt") or item.get("question"))
        prompt = sample.get("prompt") or sample.get("question")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SampleError(index, "missing or empty 'prompt' (or 'question'; a non-empty string)", sid)
        responses = sample.get("responses")
        if not isinstance(responses, (list, tuple)) or len(responses) == 0:
            raise SampleError(index, "'responses' must be a non-empty list of strings", sid)
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise SampleError(index, f"response {i} is a {type(r).__name__}, not a string", sid)
            if not r.strip():  # the authors' code silently drops these (and renumbers the rest)
                raise SampleError(index, f"response {i} is empty or only whitespace", sid)
        for what, s in [("prompt", prompt)] + [(f"response {i}", r) for i, r in enumerate(responses)]:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SampleError(index, f"{what} is not valid Unicode text ({e.reason} at character {e.start})",
                                  sid) from None
        over = self.text_budgets.check(prompt, responses)  # before anything is tokenized
        if over is not None:
            raise SampleError(index, over, sid)
        return prompt, list(responses)

    def set_text_budgets(self, **budgets) -> TextBudgets:
        """Replace some text budgets (sample_chars, response_chars, sample_bytes, response_bytes; None keeps
        the current one); returns the budgets now in force."""
        self.text_budgets = getattr(self, "text_budgets", TextBudgets()).replace(**budgets)
        return self.text_budgets

    def set_media_budgets(self, budgets: media.MediaBudgets | None = None, **overrides) -> media.MediaBudgets:
        """Replace the media budgets: `budgets` (a MediaBudgets; None keeps the current ones) with any
        MediaBudgets fields in `overrides` replaced (None values keep); returns the budgets now in force. They
        travel with the encoder (pickled into encoding worker processes)."""
        base = self.media_budgets if budgets is None else _check_media_budgets(budgets)
        self.media_budgets = base.replace(**overrides)
        return self.media_budgets

    def _encode(self, sample, index, sid, media_dir):
        if not isinstance(sample, dict):
            raise SampleError(index, f"a sample must be a dict, got {type(sample).__name__}")
        prompt, responses = self._check_text(sample, index, sid)
        images = _as_list(sample.get("images", sample.get("image")))
        videos = _as_list(sample.get("videos", sample.get("video")), frames_ok=True)
        budgets = self.media_budgets
        too_many = media.check_media_counts(len(images), len(videos), budgets=budgets)
        if too_many is not None:
            raise SampleError(index, too_many, sid)
        if (images or videos) and self.processor is None:
            raise SampleError(index, "this backbone is text-only; the sample has an image or video", sid)
        if images and videos and self.one_media_kind:
            raise SampleError(index, "this backbone (Molmo2) takes images or a video in one sample, not both", sid)
        interval = _frame_interval(sample, index, sid) if videos else media.DEFAULT_FRAME_INTERVAL
        # every image and sampled frame of the sample together, from headers before decoding
        budget = media.PixelBudget.nested(budgets.sample_pixels,
                                          f"the sample's media ({budgets.name('sample_pixels')})")
        try:
            with budget:
                pil_images = [media.load_image(im, base_dir=media_dir, budgets=budgets) for im in images]
                clips = [media.load_video(v, base_dir=media_dir, fps=self.video_fps,
                                          max_frames=self.video_max_frames, frame_interval=interval,
                                          sampling=self.video_sampling, budgets=budgets) for v in videos]
            return self._encode_loaded(index, sid, prompt, responses, pil_images, clips)
        finally:
            budget.release()  # the decoded media are dropped with this call

    def _encode_loaded(self, index, sid, prompt, responses, pil_images, clips):
        marked_prompt = self._mark(prompt)
        marked = [self._mark(r) for r in responses]
        with_sentinel = self._render(len(pil_images), len(clips), marked_prompt, _CONTENT_SENTINEL)
        if with_sentinel.count(_CONTENT_SENTINEL) != 1:
            raise SampleError(index, "the chat template does not render the assistant text exactly once", sid)
        at = with_sentinel.index(_CONTENT_SENTINEL)
        head, tail = with_sentinel[:at], with_sentinel[at + len(_CONTENT_SENTINEL):]
        content = SEPARATOR_TEXT.join(marked)
        if self._render(len(pil_images), len(clips), marked_prompt, content) != head + content + tail:
            raise SampleError(index, "the chat template changes the assistant text (e.g. strips it); the "
                                     "authors' layout needs it verbatim", sid)
        cut = self._prefix_boundary(head)
        prefix_text = head[:cut]

        out = {}
        try:
            if pil_images or clips:
                kwargs = {}
                if clips:
                    kwargs["videos_kwargs"] = {"do_sample_frames": False,
                                               "video_metadata": [c.video_metadata() for c in clips],
                                               **self._video_pixel_cap()}
                try:
                    out, prefix_ids = self._process_media(prefix_text, pil_images, [c.frames for c in clips],
                                                          kwargs)
                except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as e:
                    raise SampleError(index, f"the processor rejected the media: {type(e).__name__}: {e}", sid) from e
            else:
                prefix_ids = list(self._leading) + self._ids(prefix_text)
            text = SampleText(head=head[cut:], responses=marked, tail=tail, prefix_tokens=len(prefix_ids),
                              head_ids=self._ids(head[cut:]))
            layout = self._layout(prefix_ids, text, sample_id=sid if sid is not None else index)
        except (TypeError, ValueError, UnicodeError) as e:
            if isinstance(e, SampleError):
                raise
            raise SampleError(index, f"the tokenizer rejected the text: {type(e).__name__}: {e}", sid) from e
        enc = EncodedSample(layout=layout, index=index, sample_id=sid, text=text,
                            media={k: out[k] for k in _MEDIA_KEYS if k in out})
        if self.max_length and enc.num_tokens > self.max_length:
            P = len(layout.prefix_ids)
            raise SampleError(index, f"{enc.num_tokens} tokens exceed the length limit max_length={self.max_length} "
                                     f"({P} prompt+media, {enc.num_tokens - P} responses+separators)", sid)
        if self.rope_index_fn is not None and (pil_images or clips):
            ids = torch.tensor([layout.prefix_ids])
            types = self.token_types(ids)
            pos = self.rope_index_fn(ids, types, enc.media)
            layout.prefix_positions = pos[:, 0, :].to(torch.int64)
        return enc

    def _video_pixel_cap(self) -> dict:
        """{"cap_pixels_per_frame": ...} (media.VIDEO_PIXEL_CAP of this encoder's sampling) for a video processor
        that takes the option and was not given it by its checkpoint's config; else nothing (older
        transformers, other backbones)."""
        vp = getattr(self.processor, "video_processor", None)
        if vp is None or not hasattr(vp, "cap_pixels_per_frame") or vp.cap_pixels_per_frame is not None:
            return {}
        return {"cap_pixels_per_frame": media.VIDEO_PIXEL_CAP[self.video_sampling]}

    def _process_media(self, prefix_text: str, images, videos, kwargs) -> tuple[dict, list[int]]:
        """(the processor's output, the prefix's token ids) for rendered prefix text with media.

        Special-token text from user strings (marked, see `_mark`) stays plain text: through the
        processor's own sanitize_control_tokens where it has it (not in transformers 5.20 and older); otherwise each
        marked piece goes to the processor as <|resp_sep|> (a special token the processor leaves alone
        and the template never writes in the prompt; like the markers it splits the text on either
        side), and its plain-text ids replace that token in the output: the ids of the scheme
        `_ids` follows, and of transformers' sanitizing."""
        if self._collapse_video_wrapper and videos:
            prefix_text = self._collapsed_video_wrapper(prefix_text)
        pieces = []
        if self._processor_sanitizes:
            kwargs = dict(kwargs, sanitize_control_tokens=True)
            text = prefix_text
        else:
            if self._markers_re.sub("", prefix_text).count(RESP_SEP):
                raise ValueError(f"the chat template writes {RESP_SEP} into the prompt")

            def stand_in(m):
                pieces.append(m.group(1))  # None for a lone marker: it only breaks the text
                return RESP_SEP
            text = self._markers_re.sub(stand_in, prefix_text)
        out = self.processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt",
                             **kwargs)
        ids = out["input_ids"][0].tolist()
        if videos and not self._collapse_video_wrapper and self._nested_vision_start(ids):
            # this processor wraps every frame itself but keeps the template's wrapper around them all
            # (Qwen3-VL's processor in transformers 5.10 to 5.20 at least; 4.57 and 5.25 collapse it): collapse
            # it here, as they do, so the prompt is the one the checkpoint was trained on
            self._collapse_video_wrapper = True
            return self._process_media(prefix_text, images, videos, {k: v for k, v in kwargs.items()
                                                                      if k != "sanitize_control_tokens"})
        if self._nested_vision_start(ids):
            raise ValueError("the processor's prompt nests one vision block in another")
        if pieces:
            at = [i for i, t in enumerate(ids) if t == self.sep_id]
            if len(at) != len(pieces):
                raise RuntimeError(f"expected {len(pieces)} stand-ins for special-token text in the processor's "
                                   f"output, found {len(at)}")
            plain, last = [], 0
            for i, piece in zip(at, pieces):
                plain += ids[last:i] + (self._plain_ids(piece) if piece else [])
                last = i + 1
            ids = plain + ids[last:]
        return out, ids

    def _collapsed_video_wrapper(self, text: str) -> str:
        """The template's <|vision_start|><|video_pad|><|vision_end|> as a bare <|video_pad|> (marked
        user text is never matched: its markers sit between the tokens)."""
        p = self.processor
        return text.replace(p.vision_start_token + p.video_token + p.vision_end_token, p.video_token)

    def _nested_vision_start(self, ids: list[int]) -> bool:
        """Whether a <|vision_start|> opens inside another vision block (before its <|vision_end|>)."""
        start, end = self._vision_start_id, self._vision_end_id
        if start is None or end is None:
            return False
        depth = 0
        for t in ids:
            if t == start:
                if depth:
                    return True
                depth = 1
            elif t == end:
                depth = 0
        return False

    def token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids of token ids (0 text, 1 image, 2 video), as the processor marks them."""
        types = torch.zeros(ids.shape, dtype=torch.int32)
        for kind in (1, 2):
            wanted = [i for i, k in self.media_token_types.items() if k == kind]
            if wanted:
                types[torch.isin(ids, torch.tensor(wanted, dtype=ids.dtype))] = kind
        return types

    def reorder(self, encoded: EncodedSample, order: Sequence[int]) -> EncodedSample:
        """The sample with its responses in `order` (copy.responses[j] = original.responses[order[j]]):
        the joint turn is tokenized again (BPE merges depend on the neighbours); each response alone,
        the prefix and the media are reused."""
        order = list(order)
        old = encoded.layout
        n = len(old.response_ids)
        if sorted(order) != list(range(n)):
            raise ValueError(f"order must be a permutation of 0..{n - 1}, got {order}")
        if encoded.text is None:
            raise ValueError("this EncodedSample has no text to re-tokenize (built by hand?)")
        text = dataclasses.replace(encoded.text, responses=[encoded.text.responses[o] for o in order])
        joint, joint_scores, joint_starts = self._joint(text)
        common = len(old.prefix_ids) - encoded.text.prefix_tokens  # the assistant header in the prefix
        if joint[:common] != old.prefix_ids[encoded.text.prefix_tokens:]:
            raise RuntimeError("the shared assistant header changed with the response order")
        lay = dataclasses.replace(old, response_ids=[old.response_ids[o] for o in order],
                                  response_starts=[old.response_starts[o] for o in order], joint_ids=joint[common:],
                                  joint_score_offsets=[s - common for s in joint_scores],
                                  joint_starts=[s - common for s in joint_starts])
        return dataclasses.replace(encoded, layout=lay, text=text)

    def encode_all(self, samples: Sequence[dict], *, errors: str = "raise", media_dir=None):
        """Encode every sample. errors='raise': a BatchError listing every bad sample (before any
        compute); errors='skip': bad samples become None in the returned list, with the errors.
        media_dir: as in `encode`."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        encoded, bad = [], []
        for i, s in enumerate(samples):
            try:
                encoded.append(self.encode(s, i, media_dir=media_dir))
            except SampleError as e:
                bad.append(e)
                encoded.append(None)
        if bad and errors == "raise":
            raise BatchError(bad)
        return encoded, bad


def processor_sanitizes_control_tokens() -> bool:
    """Whether transformers' processors take sanitize_control_tokens (keep marked special-token text
    plain): newer transformers only."""
    from transformers.processing_utils import TextKwargs

    return "sanitize_control_tokens" in getattr(TextKwargs, "__annotations__", {})


def _pooling_indexes_whole_sample(processor) -> bool:
    """Whether a processor's pooling indices (Molmo2's image_token_pooling / video_token_pooling) index
    the patches of the whole sample, so that joining samples must offset them: transformers < 5.25 and
    the remote-code Molmo2. transformers >= 5.25's native Molmo2 indexes each image's (each video's)
    own patches, and its model offsets them itself (image_num_crops, the videos' frame counts)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not type(image_processor).__module__.startswith("transformers.models.molmo2"):
        return True
    import inspect

    from transformers.models.molmo2.modeling_molmo2 import Molmo2Model

    return "image_num_crops" not in inspect.signature(Molmo2Model.get_image_features).parameters


def _join_media(per_sequence: list[dict], offset_pooling: bool = True) -> dict:
    """Concatenate the sequences' media along dim 0, in stream order. offset_pooling: pooling indices
    point into the flattened patches of all crops (or frames) so far, so they are offset (-1 stays
    padding); else each indexes its own image's / video's patches (the backbone offsets them)."""
    out: dict[str, list] = {}
    patches = {k: 0 for k in _POOLING_KEYS.values()}
    for m in per_sequence:
        for k, v in m.items():
            if k in _POOLING_KEYS and offset_pooling:
                src = _POOLING_KEYS[k]
                v = torch.where(v >= 0, v + patches[src], v)
            out.setdefault(k, []).append(v)
        for src in patches:
            if src in m:
                patches[src] += m[src].shape[0] * m[src].shape[1] if m[src].dim() >= 3 else m[src].shape[0]
    return {k: torch.cat(v, 0) for k, v in out.items()}


def attach_media(packed: PackedBatch, encoded: Sequence[EncodedSample], encoder: Encoder) -> ModelInputs:
    """Join a packed batch with its samples' media (`encoded[b]` is packed sample b). Media follow
    the order of their placeholder tokens in the stream: once per sample in joint/independent
    modes, once per sequence in single mode (the conventional reward model re-encodes the image
    for every response)."""
    reps = [1] * len(encoded)
    if packed.mode == "single":
        reps = [len(e.layout.response_ids) for e in encoded]
    seqs = [e.media for e, r in zip(encoded, reps) for _ in range(r) if e.media]
    return ModelInputs(packed, encoder.token_types(packed.input_ids),
                       _join_media(seqs, getattr(encoder, "offset_pooling", True)))


def with_cyclic_orders(encoder: Encoder, encoded: EncodedSample, k: int) -> list[tuple[EncodedSample, list[int]]]:
    """k copies of a sample whose responses are cyclically shifted (evenly spaced shifts, k capped
    at N); each with `order` such that copy.responses[j] = original.responses[order[j]]."""
    n = len(encoded.layout.response_ids)
    k = max(1, min(k, n))
    out = []
    for j in range(k):
        shift = round(j * n / k)
        order = [(i + shift) % n for i in range(n)]
        out.append((encoded if shift == 0 else encoder.reorder(encoded, order), order))
    return out
