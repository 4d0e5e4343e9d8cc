"""What RL frameworks send a remote reward model, turned back into an mrrm sample.

OpenRLHF (0.9.1 - 0.11.x) posts, per rollout, `prompts` = the policy's chat-templated prompt text and
`query` = decode(prompt_ids + response_ids, skip_special_tokens=False): the template, the policy's
stop token (EOS) after the response, and, for a vision prompt, every expanded media pad token. A long
prompt may be left-truncated in `query` while `prompts` keeps it whole. The reward model wants the
user's text, its media and the bare response, under ITS OWN template:

- `response_of(query, prompt)`: the response text (template tail and stop/pad tokens stripped), also
  when `query` holds only the end of the prompt (left truncation) or expanded media pads;
- `user_turn(prompt)`: the last user message of a chat-templated prompt (ChatML / Qwen, Llama 3,
  Gemma, Mistral [INST], or the policy tokenizer's own template), with its media placeholders counted
  and removed; a prompt in no known template is taken as it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# text a policy's decode leaves after the response: end-of-turn / end-of-text / padding tokens
DEFAULT_STOP_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<eos>",
                      "</s>", "<|end|>", "<|eom_id|>", "<pad>", "<|pad|>")

# media placeholders in a templated prompt (Qwen-VL families first, then the generic ones)
_IMAGE_SPAN = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
_VIDEO_SPAN = re.compile(r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>")
_GENERIC_IMAGE = re.compile(r"<image>")
_GENERIC_VIDEO = re.compile(r"<video>")
_PAD_RUN = re.compile(r"(<\|image_pad\|>|<\|video_pad\|>)+")

# (user-turn start, user-turn end, assistant header) of the chat formats policies use
_TEMPLATES = (
    ("<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"),                            # ChatML / Qwen
    ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),                                     # Llama 3
    ("<start_of_turn>user\n", "<end_of_turn>", "<start_of_turn>model\n"),                       # Gemma
    ("[INST]", "[/INST]", "[/INST]"),                                                            # Mistral / Llama 2
)


@dataclass
class UserTurn:
    text: str          # the user's message, media placeholders removed
    images: int = 0    # image placeholders it held
    videos: int = 0


class QueryError(ValueError):
    """A query or prompt that cannot be taken apart (the message says which and why)."""


def collapse_media_pads(text: str) -> str:
    """Runs of expanded media pad tokens (<|image_pad|> x 16 ...) -> one pad, as in an unexpanded prompt."""
    return _PAD_RUN.sub(lambda m: m.group(1), text)


def strip_stop_texts(text: str, stop_texts=DEFAULT_STOP_TEXTS) -> str:
    """`text` without the stop / pad token texts at its end (repeated: EOS then padding)."""
    stops = tuple(s for s in stop_texts if s)
    changed = True
    while changed and text:
        changed = False
        for s in stops:
            if text.endswith(s):
                text, changed = text[: -len(s)], True
    return text


def response_of(query: str, prompt: str, stop_texts=DEFAULT_STOP_TEXTS, *, min_overlap: int = 16) -> str:
    """The response in `query` = prompt + response (+ stop tokens), the prompt possibly left-truncated
    or carrying expanded media pads. A truncated query must still hold the prompt's last `min_overlap`
    characters (or all of a shorter prompt); otherwise QueryError."""
    if not prompt:
        raise QueryError("the prompt is empty")
    if query.startswith(prompt):
        return strip_stop_texts(query[len(prompt):], stop_texts)
    q, p = collapse_media_pads(query), collapse_media_pads(prompt)
    if q.startswith(p):
        return strip_stop_texts(q[len(p):], stop_texts)
    # left truncation: the longest suffix of the prompt that starts the query
    need = min(min_overlap, len(p))
    probe = q[:need]
    start = p.find(probe)
    while start != -1:
        if q.startswith(p[start:]):
            return strip_stop_texts(q[len(p) - start:], stop_texts)
        start = p.find(probe, start + 1)
    raise QueryError("the query neither starts with its prompt nor with the end of it (a query is the prompt, "
                     "possibly cut at the left, followed by the response)")


def _count_media(text: str) -> UserTurn:
    images = len(_IMAGE_SPAN.findall(text))
    videos = len(_VIDEO_SPAN.findall(text))
    text = _VIDEO_SPAN.sub("", _IMAGE_SPAN.sub("", text))
    images += len(_GENERIC_IMAGE.findall(text))
    videos += len(_GENERIC_VIDEO.findall(text))
    text = _GENERIC_VIDEO.sub("", _GENERIC_IMAGE.sub("", text))
    return UserTurn(text.strip(), images, videos)


def template_frame(tokenizer) -> tuple[str, str] | None:
    """(text before, text after) the user's message in a single-turn prompt rendered by a tokenizer's
    own chat template with the generation prompt (its default system prompt included), or None when
    it has no template or does not keep a message verbatim."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    sentinel = "MRRM-USER-MESSAGE-SENTINEL"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain user turn: not usable here
        return None
    if not isinstance(text, str) or text.count(sentinel) != 1:
        return None
    before, after = text.split(sentinel)
    return before, after


def user_turn(prompt: str, frame: tuple[str, str] | None = None) -> UserTurn:
    """The last user message of a chat-templated prompt and its media placeholders. `frame`: the
    policy template's (before, after) from `template_frame`, tried first (an exact single-turn match).
    A prompt in no known format is the user's message as it is."""
    if frame is not None:
        before, after = frame
        if prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before) + len(after):
            return _count_media(prompt[len(before): len(prompt) - len(after)])
    for start, end, _header in _TEMPLATES:
        at = prompt.rfind(start)
        if at == -1:
            continue
        body = prompt[at + len(start):]
        stop = body.find(end)
        if stop != -1:
            return _count_media(body[:stop])
    return _count_media(prompt)
