"""Tiny vision-language backbones, tokenizers and processors built offline (no hub, no downloads).

Used for the built-in default model, the tests and the CPU benchmarks. The tokenizer is a
byte-level BPE trained from scratch on a small built-in corpus with Qwen2's pre-tokenizer (so
punctuation merges with following newlines, ".\n\n", as in the real Qwen tokenizers) and the
family's special tokens plus `<|resp_sep|>`; the backbones are Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
Molmo2 built from configs. Each family's processor carries the family's published chat template,
because the reference layout renders every sample with the checkpoint's own template.
"""
from __future__ import annotations

import copy
import functools

from mrrm.data.encoding import RESP_SEP

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
# Molmo2's media tokens (its processor expands <|image|> / <|video|> into these), in the order the
# released Molmo2 tokenizer lists them.
MOLMO2_MEDIA_TOKENS = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>",
                       "<im_low>", "<frame_start>", "<frame_end>", "<|video|>"]
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _native(config_class: str) -> bool:
    """Whether the installed transformers has this backbone natively (Molmo2 from 5.20)."""
    import transformers

    return hasattr(transformers, config_class)


# the families the installed transformers can build (the test matrices parametrize over these)
FAMILIES = QWEN_FAMILIES + (("molmo2",) if _native("Molmo2Config") else ())
# Hybrid backbones (linear-attention + full-attention text layers): built like the others, tested
# in their own modules (tests/model/test_qwen35.py), so the families above keep their test matrix.
HYBRID_FAMILIES = ("qwen3_5",) if _native("Qwen3_5Config") else ()
ALL_FAMILIES = FAMILIES + HYBRID_FAMILIES

# The families' published chat templates (the `chat_template` their Instruct checkpoints ship;
# Qwen2.5-VL ships Qwen2-VL's). The reference layout renders every sample with the checkpoint's own
# template, so the tiny models carry the real ones.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n                    {{- content_item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n                    {{- '\\n' }}\n"
    "                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
MOLMO2_CHAT_TEMPLATE = (
    "{% set DEMO_STYLES = ['point_count','pointing','cosyn_point','user_qa','long_caption','short_caption',"
    "'video_long_caption','video_short_caption','video_point_track_per_frame','video_point_track_start_end',"
    "'video_point_track_all_frames','video_single_point_track_start_end','video_transcript',"
    "'video_clip_caption_start_end','video_clip_caption_start_end_in_seconds','video_clip_transcript_start_end',"
    "'video_clip_transcript_start_end_in_seconds','video_frame_caption_timestamp',"
    "'video_frame_caption_timestamp_in_seconds','correction_qa','text_sft','video_point','video_point_count',"
    "'video_count','video_count_point','multi_image_pointing','multi_image_counting','multi_image_point_then_count',"
    "'multi_image_count_then_point','demo','a_okvqa_mc','ai2_diagram_no_letter','ai2_diagram','science_qa',"
    "'multi_image_mc','multi_image_mc_exp','mantis_instruct_mc','video_multiple_choice',"
    "'video_multiple_choice_count_without_pointing','video_multiple_choice_multiple_correct',"
    "'video_multiple_choice_w_subtitle'] %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% set has_subtitle = messages and messages[0]['role'].lower() == "
    "'subtitle' %}{% for message in messages %}{% if message['content'] is not string %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% elif content['type'] == 'video' or 'video' in content or "
    "'video_url' in content %}{% set video_count.value = video_count.value + 1 %}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if image_count.value == 1 %}{{ '<|image|>' }}{% elif image_count.value > 1 %}{% for i in "
    "range(image_count.value) %}{{ 'Image ' ~ (i + 1) ~ '<|image|>' }}{% endfor %}{% endif %}{% for _ in "
    "range(video_count.value) %}{{ '<|video|>' }}{% endfor %}{% if has_subtitle %}{{ messages[0]['content'] }}"
    "{% endif %}{% for message in messages %}{% set role = message['role'].lower() %}{% if role == 'subtitle' %}"
    "{% continue %}{% endif %}{% set conv_index = loop.index - (1 if has_subtitle else 0) %}{%- if (conv_index % 2 "
    "== 1 and role != 'user') or (conv_index % 2 == 0 and role != 'assistant') -%}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}{% if message['content'] is string %}"
    "{% set text_content = message['content'] %}{% else %}{% set m = namespace(text='') %}{% for content in "
    "message['content'] %}{% if content['type'] == 'text' %}{% if content['style'] is defined and content['style'] "
    "not in DEMO_STYLES %}{% set seg = content['style'] ~ ': ' ~ content['text'] %}{% else %}{% set seg = "
    "content['text'] %}{% endif %}{% set m.text = m.text ~ ('' if not m.text else ' ') ~ seg %}{% endif %}"
    "{% endfor %}{% set text_content = m.text %}{% endif %}{% if role == 'user' %}{% if not (has_subtitle and "
    "loop.index == 2) and not (not has_subtitle and loop.first) %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>user\\n' }}{{ text_content }}{{ '<|im_end|>\\n' }}{% else %} {# assistant #}"
    "{{ '<|im_start|>assistant\\n' }}{{ text_content }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# qwen3_5: Qwen3-VL's template (the published Qwen3.5 template is not available offline; its
# processor is Qwen3-VL's, so the media blocks render the same way).
CHAT_TEMPLATES = {"qwen2_vl": QWEN2_VL_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
                  "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE, "qwen3_5": QWEN3_VL_CHAT_TEMPLATE,
                  "molmo2": MOLMO2_CHAT_TEMPLATE}

# Qwen2's pre-tokenizer split (the real Qwen2/2.5/3 and Molmo2 tokenizers use it): punctuation keeps
# the newlines that follow it (".\n\n" is one pre-token), so the separator's "\n\n" can merge with the
# end of a response.
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = """
the a an is are was were of in on at to from with and or not this that what which who where how many
image video picture frame shown shows show there here left right top bottom middle center corner
red green blue yellow orange purple pink brown black white gray grey cyan magenta colour color
circle square triangle star cross ring shape shapes dot dots line lines object objects background
one two three four five six seven eight nine ten zero count number moving moves up down stays still
answer question yes no maybe it its cat dog car house tree person sky water big small large tiny
describe describes description first second third fourth best worst response assistant user system
because so very quite slightly mostly only also then when while near far above below inside outside
""".split()


def _corpus():
    words = _WORDS
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 7)]
    lines += [f"There are {n} {w}s." for n in range(12) for w in ("circle", "square", "dot")]
    lines += [f"The {c} {s} is at the {p}." for c in words[40:52] for s in ("circle", "square", "triangle")
              for p in ("left", "right", "top", "bottom")]
    # chat-shaped text: a word alone at the start of a line (an answer right after the template's
    # "\n"), line breaks after words and punctuation, as rendered chats have them
    lines += [w for w in words for _ in range(3)]
    lines += [f"{w}{p}{nl}{v}" for w, v in zip(words[::3], words[1::3]) for p in ("", ".", "!", "?", ":")
              for nl in ("\n", "\n\n")]
    lines += ["".join(chr(c) for c in range(32, 127))]  # every printable ASCII character
    return lines


def special_tokens(family: str = "qwen2_vl") -> list[str]:
    """The family's special tokens, <|resp_sep|> last (as the authors' code adds it)."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")
    extra = MOLMO2_MEDIA_TOKENS if family == "molmo2" else []
    return QWEN_SPECIAL_TOKENS + extra + [RESP_SEP]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, specials: tuple[str, ...]) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 640, family: str = "qwen2_vl", *, with_separator: bool = True):
    """A byte-level BPE tokenizer with the family's special tokens and <|resp_sep|> (all special).

    with_separator=False leaves <|resp_sep|> out, as in a base model's tokenizer before the authors'
    code adds it. Molmo2's tokenizer has "<|im_end|>" as its BOS (its processor prepends the BOS to
    every text that comes with media)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(family)
    if not with_separator:
        specials = specials[:-1]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size, tuple(specials))),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_end|>" if family == "molmo2" else None,
                                  additional_special_tokens=specials[1:])
    tok.chat_template = CHAT_TEMPLATES[family]
    return tok


def build_config(family: str = "qwen2_vl", *, vocab_size: int = 640, hidden_size: int = 64, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, vision_width: int = 32, vision_depth: int = 2,
                 patch_size: int | None = None, initializer_range: float = 0.02, rope_theta: float = 10000.0,
                 tokenizer=None):
    """A tiny backbone config of `family`; token ids taken from `tokenizer` (default: the family's
    build_tokenizer()). patch_size defaults to 8 (Qwen) or 14 (Molmo2, its crops are 28x28 pixels)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    if family not in ALL_FAMILIES:
        raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")
    tok = tokenizer or build_tokenizer(vocab_size, family)
    head_dim = hidden_size // heads
    if family == "molmo2":
        return _molmo2_config(tok, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                              head_dim=head_dim, vision_width=vision_width, vision_depth=vision_depth,
                              patch_size=patch_size or MOLMO2_PATCH, initializer_range=initializer_range,
                              rope_theta=rope_theta)
    patch_size = patch_size or 8
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    half = head_dim // 2  # mrope sections (t, h, w) must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": rope_theta}
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=8192, rope_parameters=rope, initializer_range=initializer_range,
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    common = dict(bos_token_id=None, eos_token_id=text["eos_token_id"], pad_token_id=tok.pad_token_id,
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3_5":
        return _qwen3_5_config(text, common, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                               vision_width=vision_width, vision_depth=vision_depth, patch_size=patch_size,
                               rope_theta=rope_theta, initializer_range=initializer_range)
    if family == "qwen3_vl":
        text.update(head_dim=head_dim)
        vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=hidden_size, num_position_embeddings=256,
                      deepstack_visual_indexes=[vision_depth - 1], initializer_range=initializer_range)
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    elif family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=hidden_size, window_size=4 * patch_size, fullatt_block_indexes=[vision_depth - 1],
                      initializer_range=initializer_range)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    else:
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                      initializer_range=initializer_range)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    return cfg


def qwen3_5_layer_types(layers: int) -> list[str]:
    """Qwen3.5's pattern: three Gated DeltaNet layers, then one full-attention layer, repeated (a
    model of fewer than 4 layers ends on a full-attention layer, so it has both kinds from 2 up)."""
    types = [("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(layers)]
    if layers < 4:
        types[-1] = "full_attention"
    return types


def _qwen3_5_config(text, common, *, layers, heads, kv_heads, head_dim, vision_width, vision_depth, patch_size,
                    rope_theta, initializer_range):
    """A tiny Qwen3.5: its text layers mix Gated DeltaNet (linear attention; grouped value heads, as
    the released models have twice as many value heads as key heads) with gated full attention whose
    partial rotary embedding is an interleaved 3-D mrope, as the released configs set it."""
    from transformers import Qwen3_5Config

    if layers < 2:
        raise ValueError(f"a tiny Qwen3.5 needs at least 2 layers (linear and full attention), got {layers}")
    rotary_half = head_dim // 4  # partial_rotary_factor 0.5: a quarter of head_dim per half
    section = [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3]
    text = dict(text, head_dim=head_dim, layer_types=qwen3_5_layer_types(layers),
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5,
                                 "mrope_section": section, "mrope_interleaved": True},
                linear_conv_kernel_dim=4, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                linear_num_key_heads=max(1, kv_heads), linear_num_value_heads=2 * max(1, kv_heads))
    vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=2,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=text["hidden_size"], num_position_embeddings=256,
                  initializer_range=initializer_range)
    return Qwen3_5Config(text_config=text, vision_config=vision, **common)


# Molmo2's crops: 28x28 pixels of 14-pixel patches (2x2 patches), pooled 2x2 into one token per
# crop row... tiny, but the real geometry: overlapping crops plus a low-resolution view.
MOLMO2_PATCH = 14
MOLMO2_CROP = 28


def _molmo2_config(tok, *, hidden_size, layers, heads, kv_heads, head_dim, vision_width, vision_depth, patch_size,
                   initializer_range, rope_theta):
    from transformers import Molmo2Config

    ids = {t: tok.convert_tokens_to_ids(t) for t in MOLMO2_MEDIA_TOKENS}
    crop = MOLMO2_CROP
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_depth,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=vision_width // 2, patch_size=patch_size,
                  image_size=[crop, crop], num_position_embeddings=(crop // patch_size) ** 2,
                  initializer_range=initializer_range)
    adapter = dict(vision_feature_layer=[-1], hidden_size=vision_width, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=vision_width // 2, intermediate_size=2 * hidden_size, text_hidden_size=hidden_size,
                   initializer_range=initializer_range)
    # The released tokenizer has more ids than the base vocabulary: Molmo2 keeps its media tokens in
    # an "additional" embedding table after the base one. Here the base covers every id.
    text = dict(vocab_size=len(tok), additional_vocab_size=0, hidden_size=hidden_size,
                intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, initializer_range=initializer_range,
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Molmo2Config(vision_config=vision, adapter_config=adapter, text_config=text,
                        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
                        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
                        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
                        initializer_range=initializer_range, tie_word_embeddings=False)


def build_processors(family: str = "qwen2_vl", *, patch_size: int | None = None, image_pixels: int = 64 * 64,
                     video_pixels: int = 64 * 64):
    """(image_processor, video_processor) of `family` sized for tiny models: a 64x64 image with
    patch 8 and merge 2 becomes 16 tokens (Qwen); Molmo2 cuts it into at most 4 overlapping 28x28
    crops plus a low-resolution view."""
    if family == "molmo2":
        from transformers import Molmo2ImageProcessor, Molmo2VideoProcessor

        patch = patch_size or MOLMO2_PATCH
        crop = {"height": MOLMO2_CROP, "width": MOLMO2_CROP}
        image = Molmo2ImageProcessor(size=crop, patch_size=patch, pooling_size=[2, 2], max_crops=4,
                                     overlap_margins=[0, 0], image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video = Molmo2VideoProcessor(size=crop, patch_size=patch, pooling_size=[1, 1], image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, do_sample_frames=False)
        return image, video
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=patch_size or 8, merge_size=2, temporal_patch_size=2)
    # sizes as a fresh `size` dict, never min_pixels= / max_pixels=: transformers 5.15 and older write
    # those into the class's own default `size` dict, so every Qwen2-VL processor built later in the
    # process without an explicit size would inherit the tiny sizes
    image = Qwen2VLImageProcessor(size={"shortest_edge": image_pixels // 4, "longest_edge": image_pixels}, **common)
    if family in ("qwen3_vl", "qwen3_5"):  # Qwen3.5's processors are Qwen3-VL's
        from transformers import Qwen3VLVideoProcessor as VideoProcessor
        video = VideoProcessor(size={"shortest_edge": video_pixels // 4, "longest_edge": video_pixels * 16},
                               **common)
    else:
        VideoProcessor = Qwen2VLVideoProcessor
        video = VideoProcessor(size={"shortest_edge": video_pixels // 4, "longest_edge": video_pixels}, **common)
    return image, video


def processor_class(family: str):
    import transformers

    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
            "qwen3_5": "Qwen3VLProcessor", "molmo2": "Molmo2Processor"}[family]
    return getattr(transformers, name)


def build_processor(family: str = "qwen2_vl", tokenizer=None, **processor_kw):
    """The family's full processor (tokenizer + image and video processors + its chat template)."""
    tok = tokenizer if tokenizer is not None else build_tokenizer(family=family)
    image, video = build_processors(family, **processor_kw)
    return processor_class(family)(image_processor=image, tokenizer=tok, video_processor=video,
                                   chat_template=CHAT_TEMPLATES[family])


def build_backbone(config):
    """A randomly initialised backbone (the VL model without LM head) from `config` (not mutated)."""
    from transformers import AutoModel

    return AutoModel.from_config(copy.deepcopy(config))
