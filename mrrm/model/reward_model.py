"""The multi-response reward model: a VL backbone without LM head + a value head at each response's end.

    RewardModel(backbone, tokenizer, processor, config)
      .forward(inputs: ModelInputs) -> scores [M]       one packed pass, no vocabulary logits
      .score(batch, mode=..., ...)  -> list[list[float]]
      .save_pretrained(dir, layout="mrrm" | "reference") / RewardModel.from_pretrained(dir)
        (from_pretrained also reads every checkpoint the authors' code writes)

The backbone's attention runs through mrrm.ops.varlen_attention, registered with transformers'
AttentionInterface: text and vision for the Qwen-VL families, the text model only for Molmo2 (its
vision crops are fixed-size batches that keep their own attention). Packing metadata (cu_seqlens,
mask, segment ids, Molmo2's bidirectional media blocks) travels as an explicit keyword argument to
every attention call; nothing relies on transformers detecting packed sequences from position ids.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mrrm import ops
from mrrm.common import MODES, check_choice, check_int, tensor_version
from mrrm.data.encoding import Encoder, ModelInputs, attach_media, with_cyclic_orders
from mrrm.data.packing import pack_micro_batches
from mrrm.data.pipeline import EncodePool, score_with_workers
from mrrm.integrity import write_manifest
from mrrm.model.checkpoints import load_backbone, load_reference, save_reference
from mrrm.model.hub import push_to_hub, resolve
from mrrm.model.parts import (
    CONFIG_FILE,
    LINEAR_ATTENTION_TYPES,
    PACKED_VL_TYPES,
    PUBLISHED_CONFIG_FILE,
    RESP_REPR_MODES,
    TEXT_ATTENTION,
    TEXT_ONLY_ATTENTION_TYPES,
    VISION_ATTENTION,
    RewardModelConfig,
    build_value_head,
    check_backbone_support,
    ensure_embedding_rows,
    head_input_dim,
    head_linears,
    load_processor,
    quiet_loading,
    text_hidden_size,
    unwrap,
    verify_checkpoint,
)
from mrrm.model.qwen35 import use_mrrm_linear_attention


def response_representations(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mode: str) -> torch.Tensor:
    """The rows [M, H] (or [M, 2H]) the value head reads, for hidden [T, H] and each response's first
    and last token (ends = the score positions), as the authors' reward model builds them."""
    if mode == "last":
        return hidden[ends]
    if mode == "first":
        return hidden[starts]
    if mode == "first_last_concat":
        return torch.cat([hidden[starts], hidden[ends]], -1)
    if mode == "first_last_add":
        return hidden[starts] + hidden[ends]
    if mode == "first_last_sub":
        return hidden[ends] - hidden[starts]
    if mode == "response_mean":  # mean over start..end inclusive; the spans never overlap
        lengths = ends - starts + 1
        owner = torch.repeat_interleave(torch.arange(ends.numel(), device=ends.device), lengths)
        rows = torch.arange(owner.numel(), device=ends.device) - (torch.cumsum(lengths, 0) - lengths)[owner] + starts[owner]
        sums = hidden.new_zeros(ends.numel(), hidden.shape[-1]).index_add(0, owner, hidden[rows])
        return sums / lengths[:, None].to(hidden.dtype)
    raise ValueError(f"resp_repr_mode must be one of {RESP_REPR_MODES}, got {mode!r}")


@dataclass
class VarlenMeta:
    """Packing metadata handed to every text attention call of one forward."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: str
    segment_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None  # Molmo2: media tokens of a sequence see each other both ways


_LAST_VISION_META = None  # (weakref cu_seqlens, version, VarlenMeta)


def _vision_meta(cu: torch.Tensor, max_len) -> VarlenMeta:
    """The vision tower's packing metadata, built once per forward: every block passes the same
    cu_seqlens tensor, and reading its longest sequence is a host sync that would otherwise stall
    the GPU queue once per block. Under torch.compile the graph holds it once anyway: no cache, and
    the longest sequence is left to the op (its CPU kernel does not need it)."""
    global _LAST_VISION_META
    if torch.compiler.is_compiling():
        return VarlenMeta(cu.to(torch.int32), max_len if isinstance(max_len, int) else None, "bidirectional")
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
                               segment_ids=meta.segment_ids, block_ids=meta.block_ids, softmax_scale=scaling,
                               check_inputs=False)
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
    """Route the backbone's attention through mrrm.ops.varlen_attention: text and vision for the
    Qwen-VL families, only the text model for Molmo2 (its vision crops and its pooling adapter
    keep their own attention and masks)."""
    register_attention()
    base = unwrap(backbone)
    if base.config.model_type in TEXT_ONLY_ATTENTION_TYPES:
        base.language_model.set_attn_implementation(TEXT_ATTENTION)
        return
    base.set_attn_implementation(TEXT_ATTENTION)
    if base.config.model_type in LINEAR_ATTENTION_TYPES:

        use_mrrm_linear_attention(base)
    visual = getattr(base, "visual", None)
    if visual is not None:
        visual.config._attn_implementation_internal = VISION_ATTENTION


def supports_packed(base) -> bool:
    """Whether mrrm can run this backbone packed: the Qwen-VL families and Molmo2, or a text-only
    transformers model whose attention goes through the AttentionInterface."""
    if base.config.model_type in PACKED_VL_TYPES:
        return True
    return not hasattr(base, "visual") and bool(getattr(base, "_supports_attention_backend", False)) \
        and not hasattr(base.config, "vision_config")


def _skip_final_norm(base) -> None:
    """Make the text model's final norm pass its input through (a forward hook: the norm's weights
    stay in the model and in every checkpoint saved from it)."""
    norm = getattr(getattr(base, "language_model", base), "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"final_norm=False: the {base.config.model_type} backbone has no language_model.norm to skip")
    if not getattr(norm, "_mrrm_skipped", False):
        norm.register_forward_hook(lambda module, args, output: args[0])
        norm._mrrm_skipped = True


def _media_kwargs(inputs: ModelInputs, shape_types) -> dict:
    """The backbone's media keyword arguments; `shape_types` lays out mm_token_type_ids [T] like
    the input ids (one packed row, or the padded rows)."""
    media = dict(inputs.media)
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


def _forward_takes(module, name: str) -> bool:
    """Whether `module`'s forward has a parameter `name` (feature detection across transformers versions)."""
    try:
        return name in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _media_features_from(base, precomputed: dict | None):
    """While the backbone runs, its get_image_features / get_video_features return the vision
    tower's outputs computed before (`precomputed`: {"image"|"video": output}) instead of calling
    the tower: one_vision_call on a forward without `mm_encoder_outputs`. Each is returned once;
    a second call, or a call for a kind not computed, is an error rather than a second tower call."""
    if not precomputed:
        yield
        return
    pending = dict(precomputed)

    def returning(kind):
        def get_features(*args, **kwargs):
            if kind not in pending:
                raise RuntimeError(f"one_vision_call: the backbone asked for {kind} features that were not "
                                   "computed for this pass (or asked twice)")
            return pending.pop(kind)
        return get_features

    base.get_image_features = returning("image")
    base.get_video_features = returning("video")
    try:
        yield
        if pending:
            raise RuntimeError(f"one_vision_call: the backbone did not use the {sorted(pending)} features "
                               "computed for this pass")
    finally:
        del base.get_image_features, base.get_video_features


class RewardModel(nn.Module):
    def __init__(self, backbone, tokenizer, processor=None, config: RewardModelConfig | None = None,
                 value_head: nn.Module | None = None, media_base_dir=None, packed: bool | None = None):
        """packed: None picks by backbone (supports_packed); False forces the generic padded path."""
        super().__init__()
        self.config = config or RewardModelConfig()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.processor = processor
        H = text_hidden_size(backbone)
        in_dim = head_input_dim(H, self.config.resp_repr_mode)
        self.value_head = value_head if value_head is not None else build_value_head(
            in_dim, self.config.value_head_type, self.config.value_head_hidden_dim, self.config.value_head_activation)
        first = head_linears(self.value_head)[0]
        if first.in_features != in_dim:
            raise ValueError(f"value head input size {first.in_features} != {in_dim} (backbone hidden size {H}, "
                             f"resp_repr_mode {self.config.resp_repr_mode!r})")
        self.head_scale = self.config.value_head_scale or 1.0 / math.sqrt(H)
        base = unwrap(backbone)
        self.packed = supports_packed(base) if packed is None else (packed and supports_packed(base))
        if self.packed:
            use_mrrm_attention(backbone)
        if not self.config.final_norm:
            _skip_final_norm(base)
        rope = getattr(base, "get_rope_index", None)
        self.encoder = Encoder(tokenizer, processor, rope_index_fn=self._rope_index if rope else None,
                               chat_template=self.config.chat_template, max_length=self.config.max_length,
                               media_base_dir=media_base_dir, video_fps=self.config.video_fps,
                               video_max_frames=self.config.video_max_frames,
                               video_sampling=self.config.video_sampling,
                               one_media_kind=base.config.model_type == "molmo2")

    # -- forward --------------------------------------------------------------------------------
    def _rope_index(self, input_ids, mm_token_type_ids, media):
        base = unwrap(self.backbone)
        kw = {k: media[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in media}
        pos, _ = base.get_rope_index(input_ids, mm_token_type_ids, **kw)
        return pos

    @property
    def device(self) -> torch.device:
        return head_linears(self.value_head)[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return head_linears(self.value_head)[0].weight.dtype

    def hidden_states(self, inputs: ModelInputs) -> torch.Tensor:
        """Last-layer hidden states [T, H] of the packed stream (no logits, no per-layer states)."""
        if not self.packed:
            return self._hidden_states_padded(inputs)
        pb = inputs.packed
        base = unwrap(self.backbone)
        meta = VarlenMeta(pb.cu_seqlens, pb.max_seqlen, pb.mask, pb.segment_ids if pb.mask == "shared_prefix" else None)
        model_type = base.config.model_type
        if model_type == "molmo2":
            # a sequence's media tokens see each other both ways (Molmo2's block_sequence_ids)
            if inputs.media:
                meta.block_ids = torch.where(inputs.mm_token_type_ids == 1, 0, -1).to(torch.int32)
            pos = pb.position_ids if pb.position_ids.dim() == 1 else pb.position_ids[0]
            media = _media_kwargs(inputs, lambda types: types[None])
            out = self.backbone(input_ids=pb.input_ids[None], position_ids=pos[None], attention_mask=None,
                                use_cache=False, mrrm_varlen=meta, **media)
            return out.last_hidden_state[0]
        if model_type not in PACKED_VL_TYPES:  # a text-only LM: 1-D positions
            pos = pb.position_ids if pb.position_ids.dim() == 1 else pb.position_ids[0]
            out = self.backbone(input_ids=pb.input_ids[None], position_ids=pos[None], attention_mask=None,
                                use_cache=False, mrrm_varlen=meta)
            return out.last_hidden_state[0]
        pos = pb.position_ids
        if pos.dim() == 1:
            pos = pos[None].expand(3, -1)
        media = _media_kwargs(inputs, lambda types: types[None])
        ids = dict(input_ids=pb.input_ids[None])
        precomputed = None
        if self.one_vision_call:
            media, anchor, precomputed = self._one_vision_call(media)
            if anchor is not None:  # no media in this pass: the dummy's output joins at the embeddings
                ids = dict(inputs_embeds=self.backbone.get_input_embeddings()(pb.input_ids[None]) + anchor)
        with _media_features_from(base, precomputed):
            out = self.backbone(**ids, position_ids=pos[:, None, :], attention_mask=None, use_cache=False,
                                mrrm_varlen=meta, **media)
        return out.last_hidden_state[0]

    # ZeRO-3 gathers a module's parameters when the module is called, so every rank must call the
    # vision tower equally often per pass, and in the same place of the graph. With one_vision_call
    # (mrrm.train.sharding sets it for ZeRO-3; Qwen2/2.5/3-VL) a pass makes exactly ONE vision-tower call
    # before the embeddings: its images and videos together (the tower treats each image / video
    # grid on its own, so this equals two calls), or a dummy 1-token image in a pass without media,
    # whose output joins the embeddings times zero (so the backward runs the same hooks too).
    one_vision_call = False

    def _one_vision_call(self, media: dict) -> tuple[dict, torch.Tensor | None, dict | None]:
        """(the backbone's media kwargs, None, precomputed) for a pass with media, or (media, a zero
        scalar holding the dummy image's output, None) for a pass without. The tower's output goes
        to the backbone as `mm_encoder_outputs` in place of the pixels where its forward takes that
        (transformers 5.20 has it, 5.15 not); older forwards call their own get_image_features /
        get_video_features on the pixels, so the pixels stay and `precomputed` ({kind: output})
        is what those calls return instead (`_media_features_from`)."""
        base = unwrap(self.backbone)
        takes_outputs = _forward_takes(base, "mm_encoder_outputs")
        parts = [(kind, media.pop(pk) if takes_outputs else media[pk], media[gk]) for kind, pk, gk in
                 (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
                 if pk in media]
        if parts:
            pixels, grids = torch.cat([p for _, p, _ in parts]), torch.cat([g for _, _, g in parts])
        else:
            vc = base.config.vision_config
            m = vc.spatial_merge_size
            pixels = torch.zeros(m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                                 device=self.device, dtype=self.dtype)
            grids = torch.tensor([[1, m, m]], device=self.device)
        out = base.get_image_features(pixels, grids, return_dict=True)
        # Qwen3-VL's deepstack features: per layer, one tensor per grid (transformers 5.20 on) or one
        # tensor of all the grids' tokens (before)
        deep = getattr(out, "deepstack_features", None)
        if not parts:
            flat = [x for d in deep or () for x in ([d] if isinstance(d, torch.Tensor) else d)]
            anchor = sum(t.sum() for t in list(out.pooler_output) + flat)
            return media, anchor * 0.0, None
        outputs, start, row = {}, 0, 0
        for kind, _, grid in parts:
            end = start + grid.shape[0]
            rows = sum(int(t.shape[0]) for t in out.pooler_output[start:end])
            kw = {"pooler_output": out.pooler_output[start:end]}
            if deep is not None:
                kw["deepstack_features"] = [d[row:row + rows] if isinstance(d, torch.Tensor) else d[start:end]
                                            for d in deep]
            outputs[kind] = type(out)(**kw)
            start, row = end, row + rows
        if takes_outputs:
            media["mm_encoder_outputs"] = outputs
            return media, None, None
        return media, None, outputs

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
        pb = inputs.packed
        cfg = self.config
        if cfg.resp_repr_mode == "last" and isinstance(self.value_head, nn.Sequential):
            l1, l2 = head_linears(self.value_head)
            return ops.gather_value_head(hidden, pb.score_positions, l1.weight, l1.bias, l2.weight, l2.bias,
                                         activation=cfg.value_head_activation, scale=self.head_scale)
        # the other representations, and the linear head, run in plain torch on the M rows
        rows = response_representations(hidden, pb.start_positions, pb.score_positions, cfg.resp_repr_mode)
        return self.value_head(rows.to(self.dtype)).squeeze(-1) * self.head_scale

    # -- scoring --------------------------------------------------------------------------------
    def micro_batches(self, encoded, mode, max_batch_tokens, sample_indices=None):
        """Pack encoded samples into ModelInputs micro-batches under the token budget. A sample larger
        than the budget (but within max_length) gets a micro-batch of its own."""
        budget = max_batch_tokens or self.config.max_batch_tokens
        for group in self._media_groups(encoded):
            layouts = [encoded[i].layout for i in group]
            for pb in pack_micro_batches(layouts, mode, budget, oversize="own_batch"):
                pb.sample_indices = [group[j] for j in pb.sample_indices]
                yield attach_media(pb, [encoded[i] for i in pb.sample_indices], self.encoder)

    def _media_groups(self, encoded) -> list[list[int]]:
        """Indices of the samples that may share a pass, in order. Molmo2 takes images or videos in
        one forward, not both: its video samples get passes of their own (as the authors' code
        batches by modality)."""
        everything = list(range(len(encoded)))
        if unwrap(self.backbone).config.model_type != "molmo2":
            return [everything]
        video = [i for i in everything if "pixel_values_videos" in encoded[i].media]
        rest = [i for i in everything if "pixel_values_videos" not in encoded[i].media]
        return [g for g in (rest, video) if g]

    def _check_scoring_args(self, mode, permutations) -> str:
        mode = mode or self.config.mode
        check_choice("mode", mode, MODES)
        check_int("permutations", permutations)
        return mode

    @torch.no_grad()
    def score(self, batch, *, mode: str | None = None, max_batch_tokens: int | None = None, permutations: int = 1,
              errors: str = "raise", media_dir=None, workers=0) -> list:
        """Scores of every response of every sample: list[list[float]] in input order.

        batch: one sample dict or a list (`prompt`, `responses`, optional `image`/`images`/`video`/`id`).
        mode: joint (default from the config) / independent / single.
        permutations=k > 1: each response's score is averaged over k cyclic orders of the responses
          (evenly spaced shifts; k is capped at N), all packed into the same passes.
        errors: 'raise' (default) validates every sample first and raises one BatchError listing each
          bad sample by index (and id) before any compute; 'skip' scores the rest and returns None in
          the bad samples' places.
        media_dir: base directory of relative image/video paths for this call (default: the encoder's
          media_base_dir, set at load time; None there: the working directory).
        workers: N > 0 encodes (tokenizing, media decoding) in N worker processes (mrrm.data.pipeline), ahead
          of the model under errors='skip'; or a running mrrm.data.pipeline.EncodePool to reuse across calls.
          Same scores; pays where the model does not use the cores the workers take (a GPU host).
        """
        samples = [batch] if isinstance(batch, dict) else list(batch)
        if not samples:
            return []
        mode = self._check_scoring_args(mode, permutations)

        if not isinstance(workers, EncodePool):
            check_int("workers", workers, minimum=0)
        if isinstance(workers, EncodePool) or workers > 0:

            return score_with_workers(self, samples, workers, mode=mode, max_batch_tokens=max_batch_tokens,
                                      permutations=permutations, errors=errors, media_dir=media_dir)
        encoded, _ = self.encoder.encode_all(samples, errors=errors, media_dir=media_dir)
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
            for copy, order in (with_cyclic_orders(self.encoder, e, permutations) if permutations > 1 else [(e, None)]):
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
    def push_to_hub(self, repo_id: str, *, layout: str = "mrrm", token=None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, evaluation=None) -> str:
        """Upload the model to the Hugging Face Hub as `save_pretrained(layout=...)` writes it, with a
        generated model card (README.md); `evaluation`: mrrm.eval metrics (dicts or metrics.json paths)
        for its evaluation table. Returns the commit URL. See mrrm.model.hub."""

        return push_to_hub(self, repo_id, layout=layout, token=token, private=private, revision=revision,
                           commit_message=commit_message, evaluation=evaluation)

    def save_pretrained(self, path, *, layout: str = "mrrm") -> None:
        """layout="mrrm": mrrm_config.json, value_head.safetensors, processor/ (tokenizer + media
        processors), and either adapter/ (a peft LoRA backbone; the base is config.base_model) or
        backbone/ (full weights, safetensors).

        layout="reference": what the authors' code loads (see `checkpoints.save_reference`):
        reward_model_config.json, value_head.pt, the processor files, and the peft adapter at the
        root (a LoRA backbone, as their save_checkpoint writes it) or a merged full model (as their
        merge_lora.py writes it).

        Both layouts end with `checksums.sha256` (mrrm.integrity): the SHA-256 of every file in `path`, which
        `from_pretrained(path, verify=True)` checks (and `sha256sum -c checksums.sha256` inside `path`)."""
        if layout == "reference":
            save_reference(self, path)
            write_manifest(path)
            return
        if layout != "mrrm":
            raise ValueError(f"layout must be 'mrrm' or 'reference', got {layout!r}")
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        base = unwrap(self.backbone)
        is_peft = base is not self.backbone
        if is_peft and not self.config.base_model:
            raise ValueError("a LoRA backbone needs config.base_model (the base model's path or hub id) to be saved")
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({"format": "mrrm", "version": 2, "backbone_type": base.config.model_type, **asdict(self.config)},
                      f, indent=2)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(path, "value_head.safetensors"))
        if is_peft:
            self.backbone.save_pretrained(os.path.join(path, "adapter"))
        else:
            base.save_pretrained(os.path.join(path, "backbone"), safe_serialization=True)
        (self.processor or self.tokenizer).save_pretrained(os.path.join(path, "processor"))
        write_manifest(path)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, mode=None, base_model=None,
                        media_base_dir=None, final_norm=None, verify: bool = False) -> "RewardModel":
        """Load an mrrm checkpoint, or any checkpoint the authors' code writes (reward_model_config.json +
        value_head.pt with the peft adapter at the root, or a merged full model; see mrrm.model.checkpoints).
        `base_model` overrides the base model named by a LoRA checkpoint; `final_norm` (the authors'
        layout only; an mrrm checkpoint records its own) as in `checkpoints.load_reference`.
        verify=True: before anything is read, every file in `path` is checked against the
        checksums.sha256 that save_pretrained wrote (`verify_checkpoint`); a damaged, missing or added
        file, or a checkpoint without the manifest, raises mrrm.integrity.ChecksumError naming it."""

        if not isinstance(verify, bool):
            raise ValueError(f"verify must be True or False, got {verify!r}")
        if verify:
            verify_checkpoint(path)
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            if final_norm is not None:
                raise ValueError(f"{path}: final_norm= applies to checkpoints in the authors' layout; an mrrm "
                                 "checkpoint records its own (mrrm_config.json)")
            with quiet_loading():
                model = _load_mrrm(cls, path, base_model, media_base_dir)
        elif os.path.exists(os.path.join(path, PUBLISHED_CONFIG_FILE)):
            with quiet_loading():
                model = load_reference(cls, path, base_model=base_model, media_base_dir=media_base_dir,
                                       final_norm=final_norm)
        else:
            raise FileNotFoundError(f"{path}: neither {CONFIG_FILE} (mrrm) nor {PUBLISHED_CONFIG_FILE} "
                                    "(the authors' layout) found")
        if mode is not None:
            model.config.mode = RewardModelConfig(mode=mode).mode
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()


def _named_load(path, load):
    """load(path), with a damaged or truncated file reported by name (safetensors says only
    'incomplete metadata')."""
    try:
        return load(path)
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        if path in str(e):
            raise
        raise ValueError(f"{path}: cannot load it: a missing, damaged or truncated checkpoint file "
                         f"({type(e).__name__}: {str(e)[:300]})") from e
    except Exception as e:  # safetensors' own SafetensorError and friends
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: cannot load it: a damaged or truncated safetensors file ({e})") from e


def _load_mrrm(cls, path, base_model, media_base_dir):
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)}: not valid JSON ({e})") from None
    if raw.get("resp_repr_mode") == "separator":
        raise ValueError(f"{path}: resp_repr_mode 'separator' (mrrm before the authors' layout) is no longer "
                         "supported; retrain the checkpoint")
    config = RewardModelConfig.from_dict(raw)
    tokenizer, processor = load_processor(os.path.join(path, "processor"))
    if os.path.isdir(os.path.join(path, "adapter")):
        from peft import PeftModel

        base_path = base_model or config.base_model
        if not base_path:
            raise ValueError(f"{path}: a LoRA checkpoint needs its base model (config.base_model or base_model=)")

        base_dir = resolve(base_path)
        check_backbone_support(base_dir)
        base = load_backbone(base_dir)
        ensure_embedding_rows(base, tokenizer)  # a base model without the <|resp_sep|> row
        backbone = _named_load(os.path.join(path, "adapter"), lambda p: PeftModel.from_pretrained(base, p))
    else:
        backbone = _named_load(os.path.join(path, "backbone"), load_backbone)
    state = _named_load(os.path.join(path, "value_head.safetensors"), load_file)
    H = text_hidden_size(backbone)
    head = build_value_head(head_input_dim(H, config.resp_repr_mode), config.value_head_type,
                            config.value_head_hidden_dim, config.value_head_activation)
    head.load_state_dict(state)
    return cls(backbone, tokenizer, processor, config, value_head=head, media_base_dir=media_base_dir)
