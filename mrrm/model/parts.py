"""The parts a reward model is made of, below RewardModel itself: its configuration (RewardModelConfig,
the fields the authors' reward_model_config.json shares), the value head, and the backbone helpers that
loading and saving share (the separator token and its embedding row, the processor, the support check,
the checkpoint's file verification)."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields

import torch
from torch import nn

from mrrm.common import ACTIVATIONS, MODES, check_choice, check_int
from mrrm.data.encoding import RESP_SEP
from mrrm.data.media import VIDEO_SAMPLING
from mrrm.integrity import MANIFEST, ChecksumError, NoManifest, verify_manifest

TEXT_ATTENTION = "mrrm_varlen"
# The Qwen-VL vision towers take their packed (one call per batch) path only when the
# implementation name contains "flash"; the kernel behind it is mrrm's own.
VISION_ATTENTION = "mrrm_flash_varlen"
ACTIVATION_MODULES = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "selu": nn.SELU, "tanh": nn.Tanh}
assert tuple(ACTIVATION_MODULES) == ACTIVATIONS, "mrrm.common.ACTIVATIONS is the one list of head activations"
VALUE_HEAD_TYPES = ("linear", "mlp")
# The authors' response representations (reward_model.py): the hidden state at the response's last
# token (the paper), at its first token, both (concatenated, added, last minus first), or the mean
# over the response's tokens.
RESP_REPR_MODES = ("last", "first", "first_last_concat", "first_last_add", "first_last_sub", "response_mean")
RESP_REPR_ALIASES = {"last_token": "last", "response_end": "last", "eos": "last"}
# Backbones whose forward mrrm runs packed (varlen attention, explicit metadata); others go through
# the generic padded path. Text-only transformers LMs that use the attention interface are packed too.
PACKED_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "molmo2")
# Hybrid backbones whose recurrent (linear-attention) layers read the packing too (mrrm.model.qwen35).
LINEAR_ATTENTION_TYPES = ("qwen3_5",)
# Backbones whose vision tower keeps its own attention (only the text model goes through mrrm's).
TEXT_ONLY_ATTENTION_TYPES = ("molmo2",)
CONFIG_FILE = "mrrm_config.json"
PUBLISHED_CONFIG_FILE = "reward_model_config.json"
PUBLISHED_FIELDS = ("value_head_type", "value_head_hidden_dim", "value_head_activation", "value_head_input_dim",
                    "resp_repr_mode")


@dataclass
class RewardModelConfig:
    value_head_type: str = "mlp"               # "mlp" (the paper) or "linear" (the authors' code's default)
    value_head_hidden_dim: int | None = 1024   # None: the head's input size (the authors' default)
    value_head_activation: str = "silu"
    resp_repr_mode: str = "last"               # one of RESP_REPR_MODES
    value_head_scale: float | None = None      # None: 1 / sqrt(hidden size), as the paper
    mode: str = "joint"
    max_length: int = 8192
    max_batch_tokens: int = 16384
    chat_template: str | None = None           # None: the checkpoint's own (processor, else tokenizer)
    video_fps: float = 2.0
    video_max_frames: int = 64
    # how videos are sampled (mrrm.data.media.VIDEO_SAMPLING): "qwen" (qwen-vl-utils' reader at video_fps, what
    # mrrm-trained checkpoints before this field used) or "reference" (the authors' code: molmo_utils for
    # files, at most 2 fps with the last frame; frame folders thinned to 16 frames; no padding)
    video_sampling: str = "qwen"
    # False: the value head reads the last decoder layer's output BEFORE the backbone's final norm, as
    # the authors' code does for Qwen3-VL under its pinned transformers 4.57 (there `hidden_states[-1]`
    # is the un-normed layer output; for Qwen2-VL and Molmo2 it is the normed one)
    final_norm: bool = True
    base_model: str | None = None              # path or hub id of the base backbone (LoRA checkpoints)
    description: str = ""
    # how it was trained, written by mrrm.train (command, data, steps, held-out evaluation): the model card's
    training: dict | None = None

    def __post_init__(self):
        if self.value_head_type not in VALUE_HEAD_TYPES:
            raise ValueError(f"value_head_type must be one of {VALUE_HEAD_TYPES}, got {self.value_head_type!r}")
        check_int("value_head_hidden_dim", self.value_head_hidden_dim, allow_none=True)
        if not isinstance(self.value_head_activation, str) or \
                self.value_head_activation.lower() not in ACTIVATIONS:
            raise ValueError(f"value_head_activation must be one of {ACTIVATIONS}, "
                             f"got {self.value_head_activation!r}")
        self.value_head_activation = self.value_head_activation.lower()
        mode = RESP_REPR_ALIASES.get(self.resp_repr_mode, self.resp_repr_mode)
        if mode not in RESP_REPR_MODES:
            raise ValueError(f"resp_repr_mode must be one of {RESP_REPR_MODES}, got {self.resp_repr_mode!r}")
        self.resp_repr_mode = mode
        check_choice("mode", self.mode, MODES)
        check_choice("video_sampling", self.video_sampling, VIDEO_SAMPLING)
        if not isinstance(self.final_norm, bool):
            raise ValueError(f"final_norm must be a bool, got {self.final_norm!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "RewardModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def head_input_dim(hidden_size: int, resp_repr_mode: str) -> int:
    """The value head's input size: 2H for first_last_concat, else H."""
    return 2 * hidden_size if resp_repr_mode == "first_last_concat" else hidden_size


def unwrap(backbone):
    """The plain transformers model under a peft wrapper."""
    get = getattr(backbone, "get_base_model", None)
    return get() if callable(get) else backbone


def build_value_head(input_dim: int, head_type: str = "mlp", hidden_dim: int | None = 1024,
                     activation: str = "silu") -> nn.Module:
    """The authors' value head, weights N(0, 0.01) and biases 0: nn.Linear(input_dim, 1) ("linear"),
    or Linear(input_dim, D) -> act -> Linear(D, 1) ("mlp", D = hidden_dim, None = input_dim)."""
    if head_type == "linear":
        head = nn.Linear(input_dim, 1)
        layers = (head,)
    elif head_type == "mlp":
        D = hidden_dim or input_dim
        head = nn.Sequential(nn.Linear(input_dim, D), ACTIVATION_MODULES[activation](), nn.Linear(D, 1))
        layers = (head[0], head[2])
    else:
        raise ValueError(f"value_head_type must be one of {VALUE_HEAD_TYPES}, got {head_type!r}")
    for lin in layers:
        nn.init.normal_(lin.weight, std=0.01)
        nn.init.zeros_(lin.bias)
    return head


def head_linears(head: nn.Module) -> tuple[nn.Linear, ...]:
    """The head's Linear layers: (linear,) or (first, second)."""
    return (head,) if isinstance(head, nn.Linear) else (head[0], head[2])


def text_hidden_size(backbone) -> int:
    cfg = unwrap(backbone).config
    return getattr(cfg, "text_config", cfg).hidden_size


# Files a model directory may hold besides those its manifest lists: the model card push_to_hub writes after
# save_pretrained (no loader reads it)
UNLISTED_MODEL_FILES = ("README.md",)


def verify_checkpoint(path) -> list[str]:
    """Check every file of a saved model against its checksums.sha256 (written by save_pretrained, both
    layouts). Returns the files checked; raises ChecksumError naming the first that is damaged, missing
    or not listed, or saying that the checkpoint has no manifest and what to do. A LoRA checkpoint's
    base model lives elsewhere (config.base_model) and is not covered."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    try:
        return verify_manifest(path, allow_unlisted=UNLISTED_MODEL_FILES)
    except NoManifest:
        raise ChecksumError(f"{path}: verify=True (--verify), but the checkpoint has no {MANIFEST} to check its files "
                            "against (saved by an older mrrm or by other code). Load it without verification, or "
                            "load it once from a copy you trust and save it again with save_pretrained, which "
                            "writes one") from None


# Backbones transformers has natively only from a version on: (model_type, transformers class, version)
NATIVE_SINCE = {"molmo2": ("Molmo2Config", "5.20"), "qwen3_5": ("Qwen3_5Config", "5.5")}


def check_backbone_support(path) -> None:
    """A clear error, before transformers' own, when the checkpoint's backbone needs a newer transformers
    than the installed one (Molmo2 is native from 5.20; its released checkpoint's remote code is not run)."""
    import transformers

    try:
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return
    need = NATIVE_SINCE.get(model_type)
    if need and not hasattr(transformers, need[0]):
        raise ImportError(f"{path}: a {model_type} backbone needs transformers >= {need[1]} (native {model_type}); "
                          f"installed {transformers.__version__}: pip install 'transformers>={need[1]}'")


@contextlib.contextmanager
def quiet_loading():
    """transformers' progress bars ("Loading weights") off while mrrm loads a checkpoint, so that a command's
    stderr carries mrrm's own lines; back on afterwards. Kept when transformers is set to INFO or more
    verbose (TRANSFORMERS_VERBOSITY=info), or when they are off already."""
    from transformers.utils import logging as hf_logging  # loaded with the checkpoint's classes anyway

    if hf_logging.get_verbosity() <= hf_logging.INFO or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_processor(path):
    """(tokenizer, processor or None) saved at `path`: text-only checkpoints have a tokenizer only."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):  # text-only checkpoints have no processor
        proc = None
    if proc is not None and hasattr(proc, "tokenizer") and hasattr(proc, "image_processor"):
        return proc.tokenizer, proc
    return AutoTokenizer.from_pretrained(path), None


def ensure_separator_token(tokenizer, backbone=None) -> bool:
    """Add <|resp_sep|> as a special token when the tokenizer lacks it (as the authors' code does),
    then make sure the backbone has an embedding row for every token id (`ensure_embedding_rows`).
    Returns whether the token was added."""
    sep = tokenizer.convert_tokens_to_ids(RESP_SEP)
    added = sep is None or sep == tokenizer.unk_token_id
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [RESP_SEP]}, replace_extra_special_tokens=False)
    if backbone is not None:
        ensure_embedding_rows(backbone, tokenizer)
    return added


def ensure_embedding_rows(backbone, tokenizer) -> int:
    """Grow the input embedding so that every token id of `tokenizer` has a row; returns the rows added.

    The rule, deterministic and documented: rows that exist are used as they are (a base model whose
    embedding already covers <|resp_sep|>, as Qwen's and Molmo2's padded vocabularies do, keeps that
    row); missing rows are appended, each set to the mean of the existing rows. That is what the
    authors' code gets from `resize_token_embeddings` (transformers samples the new rows from a
    normal distribution around that mean with covariance 1e-9 x the embedding covariance, noise of
    order 1e-5 of the embedding scale). The embedding is never shrunk (rows past the tokenizer are
    never read)."""
    needed = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    emb = backbone.get_input_embeddings()
    old = emb.weight.shape[0]
    if needed <= old:
        return 0
    text = unwrap(backbone).config.get_text_config()
    base_rows = text.vocab_size
    backbone.resize_token_embeddings(needed, mean_resizing=False)
    emb = backbone.get_input_embeddings()
    with torch.no_grad():
        emb.weight[old:] = emb.weight[:old].float().mean(0, keepdim=True).to(emb.weight.dtype)
    if getattr(text, "additional_vocab_size", None):
        # Molmo2 builds its embedding from vocab_size + additional_vocab_size rows, and
        # resize_token_embeddings overwrites vocab_size with the total: saved so, the checkpoint would
        # not reload. The new rows join the additional table, as the authors' code grows its
        # `new_embedding` (and the LM head keeps the base vocabulary, as theirs).
        text.vocab_size = base_rows
        text.additional_vocab_size = needed - base_rows
    return needed - old
