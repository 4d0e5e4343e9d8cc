"""varlen_attention: attention over a packed stream of sequences (no padding).

Where it lives: reference `mrrm.ops.oracle.varlen_attention`; CPU: torch's flash-attention kernels per
bucket (below); GPU: `kernels/varlen_attention.py` (Triton); flash-attn's function (`backend="flash"`);
backend choice `mrrm.ops._dispatch`; tests `tests/ops/test_varlen_attention.py`, `tests/ops/test_custom_ops.py`.

Masks: `causal` (joint scoring), `bidirectional` (vision encoders), `shared_prefix` (independent
scoring: each response sees the shared prefix and itself only). `causal` and `shared_prefix` take
optional bidirectional blocks (`block_ids`): tokens sharing a block id >= 0 in one sequence see
each other both ways, as Molmo2's image / video tokens do (transformers' `block_sequence_ids`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from mrrm.ops import oracle
from mrrm.ops._dispatch import choose_backend
from mrrm.ops._validate import FLOAT_DTYPES, check_offsets, check_tensor


def _validate(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, softmax_scale, block_ids=None):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device)
    T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k/v must be [T={T}, Hkv, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    bounds = check_offsets("cu_seqlens", cu_seqlens, T, allow_empty_groups=True, what="tokens")
    longest = int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0
    if max_seqlen is None:
        max_seqlen = longest
    elif int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens ({longest})")
    if mask not in oracle.MASKS:
        raise ValueError(f"mask must be one of {oracle.MASKS}, got {mask!r}")
    if mask == "shared_prefix":
        if segment_ids is None:
            raise ValueError("mask='shared_prefix' needs segment_ids (int32 [T]: 0 = shared prefix, i >= 1 = response i)")
        check_tensor("segment_ids", segment_ids, ndim=1, dtypes=(torch.int32,), device=q.device)
        if segment_ids.shape[0] != T:
            raise ValueError(f"segment_ids must have T={T} elements, got {segment_ids.shape[0]}")
        if T and int(segment_ids.min()) < 0:
            raise ValueError("segment_ids must be >= 0 (0 = shared prefix, i >= 1 = response i)")
        # Segments must be contiguous runs in increasing order within each sequence (the prefix
        # first): the GPU kernel skips key blocks from this layout.
        if T > 1:
            step_down = segment_ids[1:] < segment_ids[:-1]
            starts = torch.zeros(T, dtype=torch.bool, device=q.device)
            starts[cu_seqlens[1:-1].long().clamp(max=T - 1)] = True
            bad = step_down & ~starts[1:]
            if bool(bad.any()):
                i = int(bad.nonzero()[0]) + 1
                raise ValueError(f"segment_ids must be non-decreasing within each sequence (prefix 0 first, then "
                                 f"responses in order); token {i} has {int(segment_ids[i])} after {int(segment_ids[i - 1])}")
    elif segment_ids is not None:
        raise ValueError(f"segment_ids is only used with mask='shared_prefix', got mask={mask!r}")
    if block_ids is not None:
        if mask == "bidirectional":
            raise ValueError("block_ids is meaningless with mask='bidirectional' (every key of a sequence is "
                             "already visible); pass block_ids=None or use mask='causal' / 'shared_prefix'")
        check_tensor("block_ids", block_ids, ndim=1, dtypes=(torch.int32,), device=q.device)
        if block_ids.shape[0] != T:
            raise ValueError(f"block_ids must have T={T} elements, got {block_ids.shape[0]}")
        if T and int(block_ids.min()) < -1:
            i = int((block_ids < -1).nonzero()[0])
            raise ValueError(f"block_ids must be >= -1 (-1 = no block, b >= 0 = bidirectional block b); "
                             f"token {i} has {int(block_ids[i])}")
        if mask == "shared_prefix":
            # the responses never see each other, so a block can only live in the shared prefix
            # (the kernels' skipping assumes it: a block never widens a response's key range)
            bad = (block_ids >= 0) & (segment_ids != 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"with mask='shared_prefix', block tokens (block_ids >= 0) must lie in the shared "
                                 f"prefix (segment_ids == 0); token {i} has block_ids={int(block_ids[i])} and "
                                 f"segment_ids={int(segment_ids[i])}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return int(max_seqlen)


# A bucket of sequences padded to its longest one: a new bucket starts where a sequence is shorter
# than this fraction of the bucket's longest, so at most ~1/4 of a bucket's rows are padding.
_BUCKET_FILL = 0.8


def _length_buckets(lengths):
    """Sequence indices grouped into buckets of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets = []
    for i in order:
        if buckets and lengths[i] >= _BUCKET_FILL * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _bucket_layout(bounds, T):
    """The padded buckets of one call: per bucket (G, L, idx [G, L] token gathered per slot (0 for
    padding), valid [G, L], spans). Deterministic in `bounds`, so the backward rebuilds the forward's."""
    seqs = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    out = []
    for bucket in _length_buckets([hi - lo for lo, hi in seqs]):
        spans = [seqs[i] for i in bucket]
        L = spans[0][1] - spans[0][0]
        lens = torch.tensor([hi - lo for lo, hi in spans])
        pos = torch.arange(L)
        valid = pos[None, :] < lens[:, None]                                   # [G, L]
        idx = torch.where(valid, torch.tensor([lo for lo, _ in spans])[:, None] + pos[None, :], 0)
        out.append((len(spans), L, idx, valid, spans))
    return out


def _bucket_mask(spans, L, valid, mask, segment_ids, block_ids, dtype, device):
    """(additive float mask [G, 1, L, L] or None, is_causal) of one bucket. Right padding needs no mask
    under `causal` (a real query never sees a later key); `bidirectional` masks the padded keys;
    `shared_prefix` and sequences holding bidirectional blocks get a dense mask, where a padded
    query row attends its sequence's first key only, so no row is fully masked."""
    dense = mask == "shared_prefix" or (block_ids is not None and any(
        bool((block_ids[lo:hi] >= 0).any()) for lo, hi in spans))
    if dense:
        m = torch.zeros(len(spans), L, L, dtype=torch.bool)
        for g, (lo, hi) in enumerate(spans):
            m[g, :hi - lo, :hi - lo] = oracle.attention_mask_dense(lo, hi, mask, segment_ids, block_ids).cpu()
            m[g, hi - lo:, 0] = True
        keep = m[:, None]
    elif mask == "bidirectional" and not bool(valid.all()):
        keep = valid[:, None, None, :].expand(-1, 1, L, -1)
    else:
        return None, mask == "causal"
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")).to(device), False


def _gather(x, idx, G, L):
    """Packed [T, H, D] -> padded [G, H, L, D] (index_select: its backward would be an index_add)."""
    return x.index_select(0, idx.reshape(-1).to(x.device)).view(G, L, x.shape[1], x.shape[2]).transpose(1, 2)


def _cpu_forward(q, k, v, bounds, mask, segment_ids, block_ids, scale):
    """torch's CPU flash-attention kernel, one call per bucket of similar-length sequences padded at
    the end (one call per sequence cost ~100 us of overhead each, forward and backward, for the
    hundreds of short image and text sequences of a training step). Returns (out [T, Hq, D],
    lse [Hq, T]: the natural-log softmax normaliser of each query row, which the backward reuses)."""
    T, Hq, D = q.shape
    out = q.new_zeros(q.shape)
    lse = q.new_zeros((Hq, T), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    for G, L, idx, valid, spans in _bucket_layout(bounds, T):
        attn_mask, causal = _bucket_mask(spans, L, valid, mask, segment_ids, block_ids, q.dtype, q.device)
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _gather(q, idx, G, L), _gather(k, idx, G, L), _gather(v, idx, G, L), 0.0, causal,
            attn_mask=attn_mask, scale=scale)
        rows = idx[valid].to(q.device)
        keep = valid.reshape(-1).nonzero()[:, 0].to(q.device)
        out.index_copy_(0, rows, o.transpose(1, 2).reshape(G * L, Hq, D).index_select(0, keep))
        lse.index_copy_(1, rows, l.permute(1, 0, 2).reshape(Hq, G * L).index_select(1, keep).to(lse.dtype))
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, bounds, mask, segment_ids, block_ids, scale):
    """The buckets of `_cpu_forward` again, through torch's CPU flash-attention backward. Padded query
    rows get a zero output gradient and an infinite lse (probabilities exp(s - lse) = 0), so they add
    nothing to the key and value gradients; padded key slots hold token 0's gradients and are dropped."""
    T, Hq, D = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for G, L, idx, valid, spans in _bucket_layout(bounds, T):
        attn_mask, causal = _bucket_mask(spans, L, valid, mask, segment_ids, block_ids, q.dtype, q.device)
        pad = (~valid).to(q.device)
        do_b = _gather(dout, idx, G, L).masked_fill(pad[:, None, :, None], 0)
        lse_b = lse.index_select(1, idx.reshape(-1).to(q.device)).view(Hq, G, L).transpose(0, 1)
        lse_b = lse_b.masked_fill(pad[:, None, :], float("inf"))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do_b.contiguous(), _gather(q, idx, G, L), _gather(k, idx, G, L), _gather(v, idx, G, L),
            _gather(out, idx, G, L), lse_b.contiguous(), 0.0, causal, attn_mask=attn_mask, scale=scale)
        rows = idx[valid].to(q.device)
        keep = valid.reshape(-1).nonzero()[:, 0].to(q.device)
        for dst, g in zip((dq, dk, dv), grads):
            dst.index_copy_(0, rows, g.transpose(1, 2).reshape(G * L, g.shape[1], D).index_select(0, keep))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# The compiled backends as torch.library custom ops: opaque to torch.compile (no graph break), with
# fake (meta) implementations for tracing and autograd through a backward op. `backend` is what
# the dispatch resolved ("cpu": the kernels above; "triton": mrrm.kernels.varlen_attention);
# `configs` is the Triton block table flattened (kernels.varlen_attention.flatten_configs), or None.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mrrm::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, mask: str,
                         segment_ids: Optional[Tensor], block_ids: Optional[Tensor], scale: float, backend: str,
                         configs: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        return _cpu_forward(q, k, v, cu_seqlens.tolist(), mask, segment_ids, block_ids, scale)
    from mrrm.kernels import varlen_attention as va  # triton is optional: its kernels load when a triton backend runs
    out, lse, _ = va.attention_forward(q, k, v, cu_seqlens, max_seqlen, mask=mask, block_ids=block_ids,
                                       softmax_scale=scale, configs=va.unflatten_configs(configs),
                                       meta=va.cached_shared_prefix_metadata(cu_seqlens, segment_ids)
                                       if mask == "shared_prefix" else None,
                                       block_meta=va.cached_block_metadata(cu_seqlens, block_ids)
                                       if block_ids is not None else None)
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, block_ids, scale, backend, configs=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("mrrm::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                         max_seqlen: int, mask: str, segment_ids: Optional[Tensor], block_ids: Optional[Tensor],
                         scale: float, backend: str, configs: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cpu":
        return _cpu_backward(dout, q, k, v, out, lse, cu_seqlens.tolist(), mask, segment_ids, block_ids, scale)
    from mrrm.kernels import varlen_attention as va  # triton is optional: its kernels load when a triton backend runs
    dq, dk, dv, _ = va.attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, mask=mask,
                                          block_ids=block_ids, softmax_scale=scale,
                                          configs=va.unflatten_configs(configs),
                                          meta=va.cached_shared_prefix_metadata(cu_seqlens, segment_ids)
                                          if mask == "shared_prefix" else None,
                                          block_meta=va.cached_block_metadata(cu_seqlens, block_ids)
                                          if block_ids is not None else None)
    return dq, dk, dv


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, mask, segment_ids, block_ids, scale, backend, configs=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, block_ids, scale, backend, configs = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, segment_ids, block_ids)
    ctx.args = (max_seqlen, mask, scale, backend, configs)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, segment_ids, block_ids = ctx.saved_tensors
    max_seqlen, mask, scale, backend, configs = ctx.args
    dq, dk, dv = varlen_attention_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen, mask,
                                      segment_ids, block_ids, scale, backend, configs)
    return dq, dk, dv, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# FLOPs of the custom ops for torch.utils.flop_counter.FlopCounterMode, which cannot see inside them: every
# packed sequence's full L x L square (the "dense" convention of mrrm.eval.flops, what the counter reports
# for the pure-torch reference and for SDPA), QK^T and PV (2 * 2 * Hq * D per pair); the backward as
# torch counts SDPA's (scores recomputed, then dV, dP, dQ, dK: 5 such products).
def _dense_pairs(cu_seqlens, max_seqlen) -> int:
    if cu_seqlens.device.type == "meta":  # lengths unknown: every sequence at the longest, as torch does
        return (cu_seqlens.shape[0] - 1) * max_seqlen ** 2
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).long().pow(2).sum())


@register_flop_formula(torch.ops.mrrm.varlen_attention_fwd, get_raw=True)
def _fwd_flops(q, k, v, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs) -> int:
    return 4 * q.shape[1] * q.shape[2] * _dense_pairs(cu_seqlens, max_seqlen)


@register_flop_formula(torch.ops.mrrm.varlen_attention_bwd, get_raw=True)
def _bwd_flops(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs) -> int:
    return 10 * q.shape[1] * q.shape[2] * _dense_pairs(cu_seqlens, max_seqlen)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, *, mask="causal", segment_ids=None, block_ids=None,
                     softmax_scale=None, deterministic=False, backend=None, check_inputs=True):
    """Flash-style attention over a packed varlen stream.

    q [T, Hq, D], k and v [T, Hkv, D] (GQA when Hq > Hkv), cu_seqlens int32 [S+1]. With
    mask='shared_prefix', segment_ids int32 [T] (0 = shared prefix, i >= 1 = response i, a
    response's separator belongs to it): key j is visible to query i iff same sequence, j <= i and
    segment_ids[j] in (0, segment_ids[i]). Returns [T, Hq, D]; differentiable in q, k, v.

    `block_ids` (int32 [T] or None; -1 = no block), with mask='causal' or 'shared_prefix':
    bidirectional blocks. Key j is visible to query i iff same sequence and (the mask above allows
    it or block_ids[i] == block_ids[j] >= 0), so a block token also sees the LATER tokens of its
    block. A block's tokens need not be contiguous and a sequence may hold several blocks; with
    'shared_prefix' every block token must be in the prefix. This is transformers'
    `block_sequence_ids` overlay (Molmo2: image / video tokens). The 'flash' backend cannot express
    it and raises; `auto` never picks flash.

    `deterministic`: the Triton backward never uses atomics, so it is always deterministic; the
    flag is kept for flash-attn's signature. `check_inputs=False` skips the validation (which
    syncs with the device) for callers that built the metadata themselves, e.g. the model.
    Backends (mrrm.ops._dispatch): reference (mrrm.ops.oracle), cpu and triton (the custom ops
    mrrm::varlen_attention_fwd / _bwd above), flash (flash-attn's own op).
    """
    if check_inputs:
        max_seqlen = _validate(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, softmax_scale, block_ids)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    which = choose_backend("varlen_attention", q.device, backend, q.dtype)
    if which == "torch":
        return oracle.varlen_attention(q, k, v, cu_seqlens, max_seqlen, mask=mask, segment_ids=segment_ids,
                                          block_ids=block_ids, softmax_scale=scale)
    if which == "flash":
        if block_ids is not None:
            raise RuntimeError("varlen_attention: backend 'flash' cannot express bidirectional blocks (block_ids); "
                               "use the Triton kernel (backend='triton' or the default 'auto')")
        if mask == "shared_prefix":
            raise RuntimeError("varlen_attention: backend 'flash' serves causal and bidirectional masks only; "
                               "shared_prefix needs the Triton kernel")
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, _max_seqlen(cu_seqlens, max_seqlen),
                                      _max_seqlen(cu_seqlens, max_seqlen), softmax_scale=scale,
                                      causal=(mask == "causal"), deterministic=deterministic)
    if which == "triton" and mask == "shared_prefix" and segment_ids is None:
        raise ValueError("mask='shared_prefix' needs segment_ids")
    # the CPU kernel reads the lengths from cu_seqlens itself; only Triton's grid needs max_seqlen
    max_seqlen = _max_seqlen(cu_seqlens, max_seqlen) if which == "triton" else 0
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, block_ids, scale, which)[0]


def _max_seqlen(cu_seqlens, max_seqlen):
    """max_seqlen as given, or read from cu_seqlens (a device sync) when the caller left it None."""
    if max_seqlen is not None:
        return int(max_seqlen)
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, *, mask="causal", segment_ids=None, block_ids=None,
                            softmax_scale=None, deterministic=False, configs=None):
    """Triton flash attention over a packed stream; see the module docstring. Inputs are assumed
    valid (the public op `mrrm.ops.varlen_attention` validates them). `block_ids` (int32 [T] or
    None, -1 = no block; `causal` / `shared_prefix` only, blocks inside the prefix for the latter):
    tokens of one sequence sharing a block id >= 0 also see each other in both directions.
    Returns [T, Hq, D] in q's dtype, differentiable in q, k, v. Under the default BACKWARD_VARIANT
    ("split") the backward uses no atomics, so it is deterministic whatever `deterministic` says. `configs` overrides the block table
    (see `uniform_configs`)."""
    from mrrm.kernels import varlen_attention as va  # triton: optional, imported on use

    del deterministic  # always deterministic
    if mask not in va.MASK_IDS:
        raise ValueError(f"mask must be one of {tuple(va.MASK_IDS)}, got {mask!r}")
    if mask == "shared_prefix" and segment_ids is None:
        raise ValueError("mask='shared_prefix' needs segment_ids")
    va._check_blocks(mask, block_ids)
    va._check_dtype(q)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return varlen_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), mask, segment_ids, block_ids,
                                float(softmax_scale), "triton", va.flatten_configs(configs))[0]
