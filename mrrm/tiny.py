"""Tiny Qwen-VL backbones, tokenizers and processors built offline (no hub, no downloads).

Used for the built-in default model, the tests and the CPU benchmarks. The tokenizer is a
byte-level BPE trained from scratch on a small built-in corpus, with the Qwen chat/vision special
tokens and `<|resp_sep|>`; the backbones are Qwen2-VL, Qwen2.5-VL and Qwen3-VL built from configs.
"""
from __future__ import annotations

import copy
import functools

RESP_SEP = "<|resp_sep|>"
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

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
    lines += ["".join(chr(c) for c in range(32, 127))]  # every printable ASCII character
    return lines


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS + [RESP_SEP],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with Qwen's special tokens and <|resp_sep|> (all special)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=QWEN_SPECIAL_TOKENS[1:] + [RESP_SEP])
    return tok


def build_config(family: str = "qwen2_vl", *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, vision_width: int = 32, vision_depth: int = 2,
                 patch_size: int = 8, initializer_range: float = 0.02, rope_theta: float = 10000.0, tokenizer=None):
    """A tiny backbone config of `family`; token ids taken from `tokenizer` (default: build_tokenizer())."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tok = tokenizer or build_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden_size // heads
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


def build_processors(family: str = "qwen2_vl", *, patch_size: int = 8, image_pixels: int = 64 * 64,
                     video_pixels: int = 64 * 64):
    """(image_processor, video_processor) of `family` sized for tiny models: a 64x64 image with
    patch 8 and merge 2 becomes 16 tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    image = Qwen2VLImageProcessor(min_pixels=image_pixels // 4, max_pixels=image_pixels, **common)
    if family == "qwen3_vl":
        from transformers import Qwen3VLVideoProcessor as VideoProcessor
        video = VideoProcessor(size={"shortest_edge": video_pixels // 4, "longest_edge": video_pixels * 16},
                               **common)
    else:
        VideoProcessor = Qwen2VLVideoProcessor
        video = VideoProcessor(min_pixels=video_pixels // 4, max_pixels=video_pixels, **common)
    return image, video


def build_backbone(config):
    """A randomly initialised backbone (the VL model without LM head) from `config` (not mutated)."""
    from transformers import AutoModel

    return AutoModel.from_config(copy.deepcopy(config))
