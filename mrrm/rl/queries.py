"""What RL frameworks send a remote reward model, turned back into an mrrm sample.

OpenRLHF (0.9.1 - 0.11.x) posts, per rollout, `prompts` = the policy's chat-templated prompt text and
`query` = decode(prompt_ids + response_ids, skip_special_tokens=False): the template, the policy's
stop token (EOS) after the response, and, for a vision prompt, the processor's expansion of every media
placeholder. A long text prompt may be left-truncated in `query` while `prompts` keeps it whole. The
reward model wants the user's text, its media and the bare response, under ITS OWN template:

- `response_of(query, prompt)`: the response text (template tail and stop/pad tokens stripped), also
  when `query` holds only the end of the prompt (left truncation) or expanded media placeholders (any
  family: the prompt's text between placeholders is matched in order, whatever each expansion is);
- `user_turn(prompt)`: the last user message of a chat-templated prompt in a known format (`TEMPLATES`)
  or the policy tokenizer's own template (`template_frame`), with its media placeholders
  (`MEDIA_PLACEHOLDERS`) counted and removed. It never guesses: a prompt that carries chat-template
  markup in no known format is a QueryError that names `--policy-tokenizer`; only a prompt with no
  markup at all is the user's message as it is (or every prompt, with `prompt_format="plain"`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mrrm.errors import QueryError

# text a policy's decode leaves after the response: end-of-turn / end-of-text / padding tokens
DEFAULT_STOP_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<eos>",
                      "</s>", "<|end|>", "<|eom_id|>", "<pad>", "<|pad|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
                      "<|END_OF_TURN_TOKEN|>")

# media placeholders of the common VLM families, as their chat templates / processors write them
# (family, kind, pattern); a pattern also matches the placeholder's expanded form where that is a span
MEDIA_PLACEHOLDERS = (
    ("Qwen-VL", "image", r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>"),
    ("Qwen-VL", "video", r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>"),
    ("Gemma 3", "image", r"<start_of_image>(?:<image_soft_token>)*(?:<end_of_image>)?"),
    ("InternVL", "image", r"<img>(?:<IMG_CONTEXT>)*</img>"),
    ("Llama 3.2 Vision / Molmo", "image", r"<\|image\|>"),
    ("Molmo", "video", r"<\|video\|>"),
    ("Phi-3.5-vision", "image", r"<\|image_\d+\|>"),
    ("LLaVA / InternVL / Idefics", "image", r"<image>"),
    ("LLaVA-NeXT-Video / InternVL", "video", r"<video>"),
)
# every placeholder starts with "<": factored out, the regex engine scans for it as a literal (~300x faster
# on long text than trying each alternative at every character)
assert all(pat.startswith("<") for _, _, pat in MEDIA_PLACEHOLDERS)
_MEDIA = re.compile("<(?:" + "|".join(f"(?P<{kind}{i}>{pat[1:]})" for i, (_, kind, pat) in enumerate(MEDIA_PLACEHOLDERS))
                    + ")")
_PAD_RUN = re.compile(r"<(\|image_pad\|>|\|video_pad\|>)(?:<\1)*")


@dataclass(frozen=True)
class Template:
    name: str
    user_start: str            # the text that opens a user turn
    user_end: tuple[str, ...]  # the texts that may close it (the first one found ends the message)


# the chat formats policies use; a prompt's LAST user turn is taken
TEMPLATES = (
    Template("ChatML / Qwen / InternVL", "<|im_start|>user\n", ("<|im_end|>",)),
    Template("Phi-4", "<|im_start|>user<|im_sep|>", ("<|im_end|>",)),
    Template("Llama 3", "<|start_header_id|>user<|end_header_id|>\n\n", ("<|eot_id|>",)),
    Template("Gemma", "<start_of_turn>user\n", ("<end_of_turn>",)),
    Template("Phi-3 / Zephyr", "<|user|>\n", ("<|end|>", "</s>")),
    Template("Command-R", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", ("<|END_OF_TURN_TOKEN|>",)),
    Template("DeepSeek V3 / R1", "<｜User｜>", ("<｜Assistant｜>",)),
    Template("Mistral / Llama 2", "[INST]", ("[/INST]",)),
    Template("Idefics / SmolVLM", "User:", ("<end_of_utterance>",)),
    Template("Vicuna / LLaVA-1.5", "USER:", ("ASSISTANT:",)),
)

# chat-template markup: a prompt that holds any of it (media placeholders aside) and matches no known
# template cannot be taken apart without the policy's tokenizer
_MARKUP = re.compile(r"<\|[A-Za-z0-9_]+\|>|<｜[^｜<>]{1,40}｜>|</?s>|<bos>|<eos>|\[/?INST\]|<(?:start|end)_of_turn>"
                     r"|<end_of_utterance>|^[ \t]*(?:#+[ \t]*)?(?:system|user|assistant|human|gpt|model|bot)[ \t]*:",
                     re.IGNORECASE | re.MULTILINE)
PROMPT_FORMATS = ("auto", "plain")
MAX_TRUNCATION_CANDIDATES = 64  # places a left-truncated query is tried against its prompt (bounds the work)


@dataclass
class UserTurn:
    text: str          # the user's message, media placeholders removed
    images: int = 0    # image placeholders it held
    videos: int = 0


def collapse_media_pads(text: str) -> str:
    """Runs of expanded media pad tokens (<|image_pad|> x 16 ...) -> one pad, as in an unexpanded prompt."""
    return _PAD_RUN.sub(lambda m: "<" + m.group(1), text)


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


def _after_expanded_media(query: str, prompt: str) -> int | None:
    """Where the prompt ends in `query` when the query holds the prompt with its media placeholders
    expanded (by whatever the family's processor writes): the prompt's text between placeholders is
    found in order, each piece at its first place after the previous one. None when it does not fit."""
    pieces = _MEDIA.split(prompt)
    texts = pieces[::1 + _MEDIA.groups]  # split() interleaves the groups' captures; keep the text pieces
    if len(texts) < 2 or not query.startswith(texts[0]):
        return None
    at = len(texts[0])
    for piece in texts[1:]:
        found = query.find(piece, at)
        if found == -1:
            return None
        at = found + len(piece)
    return at


def _after_truncated_prompt(query: str, prompt: str, min_overlap: int) -> int | None:
    """Where the prompt ends in `query` when the query starts with an END of the prompt (OpenRLHF cut its
    tokens at the left): the longest suffix of the prompt that starts the query. Each candidate is checked
    at both ends first, and at most MAX_TRUNCATION_CANDIDATES are compared in full (bounded work on
    repetitive text)."""
    need = min(min_overlap, len(prompt))
    probe, tail = query[:need], prompt[-need:]
    start, tried = prompt.find(probe), 0
    while start != -1 and tried < MAX_TRUNCATION_CANDIDATES:
        length = len(prompt) - start
        if query.startswith(tail, length - need):  # the candidate's end lines up with the prompt's end
            tried += 1
            if prompt.startswith(query[:length], start):
                return length
        start = prompt.find(probe, start + 1)
    return None


def response_of(query: str, prompt: str, stop_texts=DEFAULT_STOP_TEXTS, *, min_overlap: int = 16) -> str:
    """The response in `query` = prompt + response (+ stop tokens), the prompt possibly left-truncated
    or with its media placeholders expanded. A truncated query must still hold the prompt's last
    `min_overlap` characters (or all of a shorter prompt); otherwise QueryError."""
    if not prompt:
        raise QueryError("the prompt is empty")
    if query.startswith(prompt):
        return strip_stop_texts(query[len(prompt):], stop_texts)
    end = _after_expanded_media(query, prompt)
    if end is not None:
        return strip_stop_texts(query[end:], stop_texts)
    q, p = collapse_media_pads(query), collapse_media_pads(prompt)
    if q.startswith(p):
        return strip_stop_texts(q[len(p):], stop_texts)
    end = _after_truncated_prompt(q, p, min_overlap)
    if end is not None:
        return strip_stop_texts(q[end:], stop_texts)
    raise QueryError("the query neither starts with its prompt nor with the end of it (a query is the prompt, "
                     "possibly cut at the left, followed by the response)")


def count_media(text: str) -> UserTurn:
    """`text` without its media placeholders (MEDIA_PLACEHOLDERS), and how many images / videos they were."""
    counts = {"image": 0, "video": 0}

    def drop(m: re.Match) -> str:
        counts[m.lastgroup.rstrip("0123456789")] += 1
        return ""

    rest = _MEDIA.sub(drop, text)
    return UserTurn(rest.strip(), counts["image"], counts["video"])


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


def _known_template(prompt: str) -> str | None:
    """The last user message of `prompt` in one of TEMPLATES (the latest-starting user turn), or None."""
    best = None
    for t in TEMPLATES:
        at = prompt.rfind(t.user_start)
        if at == -1 or (best is not None and at <= best[0]):
            continue
        body = prompt[at + len(t.user_start):]
        ends = [i for i in (body.find(e) for e in t.user_end) if i != -1]
        if ends:
            best = (at, body[:min(ends)])
    return None if best is None else best[1]


def user_turn(prompt: str, frame: tuple[str, str] | None = None, *, prompt_format: str = "auto") -> UserTurn:
    """The last user message of a chat-templated prompt and its media placeholders.

    `frame`: the policy template's (before, after) from `template_frame`, tried first (an exact
    single-turn match); then the known TEMPLATES. A prompt in neither is the user's message as it is
    only when it carries no chat-template markup; otherwise QueryError (pass the policy's tokenizer).
    prompt_format="plain": every prompt is the user's message as it is (placeholders still counted)."""
    if prompt_format == "plain":
        return count_media(prompt)
    if prompt_format != "auto":
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if frame is not None:
        before, after = frame
        if prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before) + len(after):
            return count_media(prompt[len(before): len(prompt) - len(after)])
    message = _known_template(prompt)
    if message is not None:
        return count_media(message)
    turn = count_media(prompt)
    markup = _MARKUP.search(_MEDIA.sub("", prompt))
    if markup is not None:
        raise QueryError(f"the prompt carries chat-template markup ({markup.group(0).strip()!r}) in a format mrrm "
                         "does not recognise; start the server with --policy-tokenizer <the policy's tokenizer> "
                         "(or policy_tokenizer=) so its template is taken off exactly, or --prompt-format plain to "
                         "score prompts as they are")
    return turn
