"""The multi-response reward model: a VL backbone without LM head + a value head at each response's end.

    RewardModel(backbone, tokenizer, processor, config)
      .forward(inputs: ModelInputs) -> scores [M]       one packed pass, no vocabulary logits
      .score(batch, mode=..., ...)  -> list[list[float]]
      .save_pretrained(dir) / RewardModel.from_pretrained(dir)   (also reads the paper's layout)

The backbone's attention (text and vision) runs through mrrm.ops.varlen_attention, registered with
transformers' AttentionInterface. Packing metadata (cu_seqlens, mask, segment ids) travels as an
explicit keyword argument to every attention call; nothing relies on transformers detecting
packed sequences from position ids.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import ops
from .ops._validate import tensor_version
from .encoding import Encoder, ModelInputs, RESP_SEP, attach_media, with_cyclic_orders
from .packing import pack_micro_batches

TEXT_ATTENTION = "mrrm_varlen"
# The Qwen-VL vision towers take their packed (one call per batch) path only when the
# implementation name contains "flash"; the kernel behind it is mrrm's own.
VISION_ATTENTION = "mrrm_flash_varlen"
ACTIVATION_MODULES = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "selu": nn.SELU, "tanh": nn.Tanh}
RESP_REPR_ALIASES = {"last": "last", "last_token": "last", "response_end": "last", "eos": "last",
                     "separator": "separator", "sep": "separator", "sep_token": "separator", "resp_sep": "separator"}
# Backbones whose forward mrrm runs packed (varlen attention, explicit metadata); others go through
# the generic padded path. Text-only transformers LMs that use the attention interface are packed too.
PACKED_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CONFIG_FILE = "mrrm_config.json"
PUBLISHED_CONFIG_FILE = "reward_model_config.json"


@dataclass
class RewardModelConfig:
    value_head_type: str = "mlp"
    value_head_hidden_dim: int = 1024
    value_head_activation: str = "silu"
    resp_repr_mode: str = "last"          # "last" (the paper) or "separator"
    value_head_scale: float | None = None  # None: 1 / sqrt(hidden size), as the paper
    mode: str = "joint"
    max_length: int = 8192
    max_batch_tokens: int = 16384
    system_prompt: str | None = "You are a helpful assistant."
    video_fps: float = 2.0
    video_max_frames: int = 64
    base_model: str | None = None          # path or hub id of the base backbone (LoRA checkpoints)
    description: str = ""

    def __post_init__(self):
        if self.value_head_type != "mlp":
            raise ValueError(f"value_head_type {self.value_head_type!r} is not supported (only 'mlp')")
        if self.value_head_activation not in ACTIVATION_MODULES:
            raise ValueError(f"value_head_activation must be one of {tuple(ACTIVATION_MODULES)}, "
                             f"got {self.value_head_activation!r}")
        if self.resp_repr_mode not in RESP_REPR_ALIASES:
            raise ValueError(f"resp_repr_mode must be one of {sorted(RESP_REPR_ALIASES)}, got {self.resp_repr_mode!r}")
        self.resp_repr_mode = RESP_REPR_ALIASES[self.resp_repr_mode]
        if self.mode not in ("joint", "independent", "single"):
            raise ValueError(f"mode must be joint, independent or single, got {self.mode!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "RewardModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VarlenMeta:
    """Packing metadata handed to every text attention call of one forward."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: str
    segment_ids: torch.Tensor | None = None


_LAST_VISION_META = None  # (weakref cu_seqlens, version, VarlenMeta)


def _vision_meta(cu: torch.Tensor, max_len) -> VarlenMeta:
    """The vision tower's packing metadata, built once per forward: every block passes the same
    cu_seqlens tensor, and reading its longest sequence is a host sync that would otherwise stall
    the GPU queue once per block."""
    global _LAST_VISION_META
    last = _LAST_VISION_META
    version = tensor_version(cu)
    if last is not None and last[0]() is cu and last[1] == version:
        return last[2]
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    meta = VarlenMeta(cu.to(torch.int32), max_len, "bidirectional")
    _LAST_VISION_META = (weakref.ref(cu), version, meta)
    return meta


def mrrm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, S, D], key/value [1, Hkv, S, D] -> ([1, S, Hq, D], None)."""
    if query.shape[0] != 1:
        raise RuntimeError("mrrm attention runs on packed streams (batch dimension 1); got batch "
                           f"{query.shape[0]}. Use RewardModel.forward, which packs the batch.")
    if dropout and module.training:
        raise RuntimeError("mrrm attention has no attention dropout; set the backbone's attention_dropout to 0")
    S = query.shape[2]
    if getattr(module, "is_causal", True) is False:  # a vision tower: full attention within each image
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            meta = VarlenMeta(torch.tensor([0, S], dtype=torch.int32, device=query.device), S, "bidirectional")
        else:
            meta = _vision_meta(cu, kwargs.get("max_length_q"))
    else:
        meta = kwargs.get("mrrm_varlen")
        if meta is None:
            raise RuntimeError("mrrm attention was called without packing metadata (mrrm_varlen); "
                               "run the backbone through RewardModel.forward")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, H, D]
    out = ops.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, mask=meta.mask,
                               segment_ids=meta.segment_ids, softmax_scale=scaling, check_inputs=False)
    return out[None], None


def _no_mask(*args, **kwargs):
    """The mask function of mrrm attention: masks come from VarlenMeta, never a dense [T, T] tensor."""
    return None


def register_attention():
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in (TEXT_ATTENTION, VISION_ATTENTION):
        AttentionInterface.register(name, mrrm_attention)
        AttentionMaskInterface.register(name, _no_mask)


def use_mrrm_attention(backbone) -> None:
    """Route the backbone's text and vision attention through mrrm.ops.varlen_attention."""
    register_attention()
    base = unwrap(backbone)
    base.set_attn_implementation(TEXT_ATTENTION)
    visual = getattr(base, "visual", None)
    if visual is not None:
        visual.config._attn_implementation_internal = VISION_ATTENTION


def supports_packed(base) -> bool:
    """Whether mrrm can run this backbone packed: the Qwen-VL families, or a text-only transformers
    model whose attention goes through the AttentionInterface."""
    if base.config.model_type in PACKED_VL_TYPES:
        return True
    return not hasattr(base, "visual") and bool(getattr(base, "_supports_attention_backend", False)) \
        and not hasattr(base.config, "vision_config")


def unwrap(backbone):
    """The plain transformers model under a peft wrapper."""
    get = getattr(backbone, "get_base_model", None)
    return get() if callable(get) else backbone


def build_value_head(hidden_size: int, head_dim: int = 1024, activation: str = "silu") -> nn.Sequential:
    """Linear(H, D) -> act -> Linear(D, 1), weights N(0, 0.01), biases 0 (the paper's head)."""
    head = nn.Sequential(nn.Linear(hidden_size, head_dim), ACTIVATION_MODULES[activation](), nn.Linear(head_dim, 1))
    for lin in (head[0], head[2]):
        nn.init.normal_(lin.weight, std=0.01)
        nn.init.zeros_(lin.bias)
    return head


def text_hidden_size(backbone) -> int:
    cfg = unwrap(backbone).config
    return getattr(getattr(cfg, "text_config", cfg), "hidden_size")


def _media_kwargs(inputs: ModelInputs, shape_types) -> dict:
    """The backbone's media keyword arguments; `shape_types` lays out mm_token_type_ids [T] like
    the input ids (one packed row, or the padded rows)."""
    media = {}
    if inputs.pixel_values is not None:
        media.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    if inputs.pixel_values_videos is not None:
        media.update(pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw)
    if media:
        media["mm_token_type_ids"] = shape_types(inputs.mm_token_type_ids)
    return media


def padded_batch(inputs: ModelInputs, pad_id: int) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Cut a packed stream back into a right-padded batch, one row per sequence: the keyword
    arguments of a padded forward (input_ids [S, L], attention_mask, media) and (row, col) with
    padded[row, col] = packed[t] for every packed token t. Used by the generic padded path and by
    bench_perf's published-code baseline."""
    pb = inputs.packed
    lengths = (pb.cu_seqlens[1:] - pb.cu_seqlens[:-1]).long()
    S, L = lengths.numel(), int(lengths.max())
    row = torch.repeat_interleave(torch.arange(S, device=lengths.device), lengths)
    col = torch.arange(pb.num_tokens, device=lengths.device) - pb.cu_seqlens[:-1].long()[row]
    ids = pb.input_ids.new_full((S, L), pad_id).index_put((row, col), pb.input_ids)
    mask = torch.zeros(S, L, dtype=torch.long, device=ids.device).index_put((row, col), torch.ones_like(pb.input_ids))
    media = _media_kwargs(inputs, lambda types: types.new_zeros(S, L).index_put((row, col), types))
    return dict(input_ids=ids, attention_mask=mask, **media), (row, col)


class RewardModel(nn.Module):
    def __init__(self, backbone, tokenizer, processor=None, config: RewardModelConfig | None = None,
                 value_head: nn.Sequential | None = None, media_base_dir=None, packed: bool | None = None):
        """packed: None picks by backbone (supports_packed); False forces the generic padded path."""
        super().__init__()
        self.config = config or RewardModelConfig()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.processor = processor
        H = text_hidden_size(backbone)
        self.value_head = value_head if value_head is not None else build_value_head(
            H, self.config.value_head_hidden_dim, self.config.value_head_activation)
        if self.value_head[0].in_features != H:
            raise ValueError(f"value head input size {self.value_head[0].in_features} != backbone hidden size {H}")
        self.head_scale = self.config.value_head_scale or 1.0 / math.sqrt(H)
        base = unwrap(backbone)
        self.packed = supports_packed(base) if packed is None else (packed and supports_packed(base))
        if self.packed:
            use_mrrm_attention(backbone)
        rope = getattr(base, "get_rope_index", None)
        self.encoder = Encoder(tokenizer, processor, rope_index_fn=self._rope_index if rope else None,
                               system_prompt=self.config.system_prompt, max_length=self.config.max_length,
                               media_base_dir=media_base_dir, video_fps=self.config.video_fps,
                               video_max_frames=self.config.video_max_frames, score_at=self.config.resp_repr_mode)

    # -- forward --------------------------------------------------------------------------------
    def _rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts):
        base = unwrap(self.backbone)
        kw = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
        pos, _ = base.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                     video_grid_thw=video_grid_thw, **kw)
        return pos

    @property
    def device(self) -> torch.device:
        return self.value_head[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.value_head[0].weight.dtype

    def hidden_states(self, inputs: ModelInputs) -> torch.Tensor:
        """Last-layer hidden states [T, H] of the packed stream (no logits, no per-layer states)."""
        if not self.packed:
            return self._hidden_states_padded(inputs)
        pb = inputs.packed
        if not hasattr(unwrap(self.backbone), "visual"):  # a text-only LM: 1-D positions
            meta = VarlenMeta(pb.cu_seqlens, pb.max_seqlen, pb.mask,
                              pb.segment_ids if pb.mask == "shared_prefix" else None)
            pos = pb.position_ids if pb.position_ids.dim() == 1 else pb.position_ids[0]
            out = self.backbone(input_ids=pb.input_ids[None], position_ids=pos[None], attention_mask=None,
                                use_cache=False, mrrm_varlen=meta)
            return out.last_hidden_state[0]
        meta = VarlenMeta(pb.cu_seqlens, pb.max_seqlen, pb.mask,
                          pb.segment_ids if pb.mask == "shared_prefix" else None)
        pos = pb.position_ids
        if pos.dim() == 1:
            pos = pos[None].expand(3, -1)
        media = _media_kwargs(inputs, lambda types: types[None])
        out = self.backbone(input_ids=pb.input_ids[None], position_ids=pos[:, None, :], attention_mask=None,
                            use_cache=False, mrrm_varlen=meta, **media)
        return out.last_hidden_state[0]

    def _hidden_states_padded(self, inputs: ModelInputs) -> torch.Tensor:
        """The generic path for backbones mrrm cannot run packed (e.g. remote-code models): the packed
        stream is cut back into a right-padded batch, one row per sequence, and run with an attention
        mask; the model computes its own positions. Still one pass for a sample's N responses in
        joint mode. Returns [T, H] in the packed order, so the head and the loss are shared."""
        if inputs.packed.mask == "shared_prefix":
            raise ValueError(f"mode 'independent' needs the packed path (backbones {PACKED_VL_TYPES} or "
                             "text LMs using transformers' attention interface); this backbone runs padded")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        kwargs, (row, col) = padded_batch(inputs, pad_id)
        out = self.backbone(use_cache=False, **kwargs)
        return out.last_hidden_state[row, col]

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        hidden = self.hidden_states(inputs)
        l1, l2 = self.value_head[0], self.value_head[2]
        return ops.gather_value_head(hidden, inputs.packed.score_positions, l1.weight, l1.bias, l2.weight, l2.bias,
                                     activation=self.config.value_head_activation, scale=self.head_scale)

    # -- scoring --------------------------------------------------------------------------------
    def micro_batches(self, encoded, mode, max_batch_tokens, sample_indices=None):
        """Pack encoded samples into ModelInputs micro-batches under the token budget. A sample larger
        than the budget (but within max_length) gets a micro-batch of its own."""
        budget = max_batch_tokens or self.config.max_batch_tokens
        layouts = [e.layout for e in encoded]
        for pb in pack_micro_batches(layouts, mode, budget, score_at=self.config.resp_repr_mode, oversize="own_batch"):
            yield attach_media(pb, [encoded[i] for i in pb.sample_indices],
                               image_pad_id=self.encoder.image_pad_id, video_pad_id=self.encoder.video_pad_id)

    def _check_scoring_args(self, mode, permutations) -> str:
        mode = mode or self.config.mode
        if mode not in ("joint", "independent", "single"):
            raise ValueError(f"mode must be joint, independent or single, got {mode!r}")
        if not isinstance(permutations, int) or permutations < 1:
            raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
        return mode

    @torch.no_grad()
    def score(self, batch, *, mode: str | None = None, max_batch_tokens: int | None = None, permutations: int = 1,
              errors: str = "raise") -> list:
        """Scores of every response of every sample: list[list[float]] in input order.

        batch: one sample dict or a list (`prompt`, `responses`, optional `image`/`images`/`video`/`id`).
        mode: joint (default from the config) / independent / single.
        permutations=k > 1: each response's score is averaged over k cyclic orders of the responses
          (evenly spaced shifts; k is capped at N), all packed into the same passes.
        errors: 'raise' (default) validates every sample first and raises one BatchError listing each
          bad sample by index (and id) before any compute; 'skip' scores the rest and returns None in
          the bad samples' places.
        """
        samples = [batch] if isinstance(batch, dict) else list(batch)
        if not samples:
            return []
        mode = self._check_scoring_args(mode, permutations)
        encoded, _ = self.encoder.encode_all(samples, errors=errors)
        return self.score_encoded(encoded, mode=mode, max_batch_tokens=max_batch_tokens, permutations=permutations)

    @torch.no_grad()
    def score_encoded(self, encoded, *, mode: str | None = None, max_batch_tokens: int | None = None,
                      permutations: int = 1, on_pass=None) -> list:
        """The scoring core of `score` for samples already encoded by `self.encoder` (None entries stay
        None): packed passes under the token budget, scores back in input order. on_pass(inputs), when
        given, is called once per pass (the reward server counts its passes with it)."""
        mode = self._check_scoring_args(mode, permutations)
        units, owners = [], []  # one unit per (sample, cyclic order)
        for i, e in enumerate(encoded):
            if e is None:
                continue
            for copy, order in (with_cyclic_orders(e, permutations) if permutations > 1 else [(e, None)]):
                units.append(copy)
                owners.append((i, order))
        sums = [[0.0] * len(e.layout.response_ids) if e is not None else None for e in encoded]
        counts = [0] * len(encoded)
        was_training = self.training
        self.eval()
        try:
            for inputs in self.micro_batches(units, mode, max_batch_tokens):
                scores = self(inputs.to(self.device, self.dtype)).float().cpu()
                if on_pass is not None:
                    on_pass(inputs)
                pb = inputs.packed
                for m in range(scores.shape[0]):
                    u = pb.sample_indices[int(pb.score_sample[m])]
                    j = int(pb.score_response[m])
                    i, order = owners[u]
                    sums[i][order[j] if order is not None else j] += float(scores[m])
                for u in set(pb.sample_indices):
                    counts[owners[u][0]] += 1
        finally:
            self.train(was_training)
        return [None if s is None else [x / counts[i] for x in s] for i, s in enumerate(sums)]

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """mrrm_config.json, value_head.safetensors, processor/ (tokenizer + media processors), and
        either adapter/ (a peft LoRA backbone; the base is config.base_model) or backbone/ (full
        weights, safetensors)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        base = unwrap(self.backbone)
        is_peft = base is not self.backbone
        if is_peft and not self.config.base_model:
            raise ValueError("a LoRA backbone needs config.base_model (the base model's path or hub id) to be saved")
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({"format": "mrrm", "version": 1, "backbone_type": base.config.model_type, **asdict(self.config)},
                      f, indent=2)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(path, "value_head.safetensors"))
        if is_peft:
            self.backbone.save_pretrained(os.path.join(path, "adapter"))
        else:
            base.save_pretrained(os.path.join(path, "backbone"), safe_serialization=True)
        (self.processor or self.tokenizer).save_pretrained(os.path.join(path, "processor"))

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, mode=None, base_model=None,
                        media_base_dir=None) -> "RewardModel":
        """Load an mrrm checkpoint, or the paper's published layout (reward_model_config.json,
        value_head.pt and a peft adapter directory; the base model comes from the adapter's
        base_model_name_or_path unless `base_model` is given)."""
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            model = _load_mrrm(cls, path, base_model, media_base_dir)
        elif os.path.exists(os.path.join(path, PUBLISHED_CONFIG_FILE)):
            model = _load_published(cls, path, base_model, media_base_dir)
        else:
            raise FileNotFoundError(f"{path}: neither {CONFIG_FILE} (mrrm) nor {PUBLISHED_CONFIG_FILE} "
                                    "(the paper's layout) found")
        if mode is not None:
            model.config.mode = RewardModelConfig(mode=mode).mode
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()


def _load_processor(path):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path)
    except Exception:  # text-only checkpoints have no processor, only a tokenizer
        proc = None
    if proc is not None and hasattr(proc, "tokenizer") and hasattr(proc, "image_processor"):
        return proc.tokenizer, proc
    return AutoTokenizer.from_pretrained(path), None


def ensure_separator_token(tokenizer, backbone=None) -> bool:
    """Add <|resp_sep|> as a special token when missing (resizing the backbone's embeddings)."""
    sep = tokenizer.convert_tokens_to_ids(RESP_SEP)
    if sep is not None and sep != tokenizer.unk_token_id:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [RESP_SEP]})
    if backbone is not None:
        old = backbone.get_input_embeddings().weight.shape[0]
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = backbone.get_input_embeddings().weight
        with torch.no_grad():  # deterministic: the new rows start at the mean of the old ones
            emb[old:] = emb[:old].mean(0, keepdim=True)
    return True


def _load_mrrm(cls, path, base_model, media_base_dir):
    from safetensors.torch import load_file
    from transformers import AutoModel

    with open(os.path.join(path, CONFIG_FILE)) as f:
        raw = json.load(f)
    config = RewardModelConfig.from_dict(raw)
    tokenizer, processor = _load_processor(os.path.join(path, "processor"))
    if os.path.isdir(os.path.join(path, "adapter")):
        from peft import PeftModel

        base_path = base_model or config.base_model
        if not base_path:
            raise ValueError(f"{path}: a LoRA checkpoint needs its base model (config.base_model or base_model=)")
        backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), os.path.join(path, "adapter"))
    else:
        backbone = AutoModel.from_pretrained(os.path.join(path, "backbone"))
    state = load_file(os.path.join(path, "value_head.safetensors"))
    H, D = state["0.weight"].shape[1], state["0.weight"].shape[0]
    head = build_value_head(H, D, config.value_head_activation)
    head.load_state_dict(state)
    return cls(backbone, tokenizer, processor, config, value_head=head, media_base_dir=media_base_dir)


def _load_published(cls, path, base_model, media_base_dir):
    """The paper's layout: reward_model_config.json, value_head.pt (nn.Sequential state dict),
    and a peft adapter directory trained on a ForConditionalGeneration model."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    with open(os.path.join(path, PUBLISHED_CONFIG_FILE)) as f:
        raw = json.load(f)
    adapter_dir = next((os.path.join(path, d) for d in sorted(os.listdir(path))
                        if os.path.exists(os.path.join(path, d, "adapter_config.json"))),
                       path if os.path.exists(os.path.join(path, "adapter_config.json")) else None)
    if adapter_dir is None:
        raise FileNotFoundError(f"{path}: no peft adapter directory (adapter_config.json) found")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base_path = base_model or json.load(f).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass base_model=")
    tok_dir = next((d for d in (path, adapter_dir) if os.path.exists(os.path.join(d, "tokenizer_config.json"))),
                   base_path)
    tokenizer, processor = _load_processor(tok_dir)
    full = AutoModelForImageTextToText.from_pretrained(base_path)
    ensure_separator_token(tokenizer, full)
    full = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    backbone = full.model  # the VL model without its LM head
    state = torch.load(os.path.join(path, "value_head.pt"), map_location="cpu", weights_only=True)
    H, D = state["0.weight"].shape[1], state["0.weight"].shape[0]
    config = RewardModelConfig(
        value_head_type=raw.get("value_head_type", "mlp"), value_head_hidden_dim=raw.get("value_head_hidden_dim", D),
        value_head_activation=raw.get("value_head_activation", "silu"),
        resp_repr_mode=raw.get("resp_repr_mode", "last"), base_model=base_path,
        description=f"loaded from the published layout at {path}")
    if config.value_head_hidden_dim != D:
        raise ValueError(f"{path}: value_head_hidden_dim={config.value_head_hidden_dim} but value_head.pt has {D}")
    head = build_value_head(H, D, config.value_head_activation)
    head.load_state_dict(state)
    return cls(backbone, tokenizer, processor, config, value_head=head, media_base_dir=media_base_dir)
