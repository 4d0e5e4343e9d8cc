"""varlen_attention: attention over a packed stream of sequences (no padding).

Masks: `causal` (joint scoring), `bidirectional` (vision encoders), `shared_prefix` (independent
scoring: each response sees the shared prefix and itself only). `causal` and `shared_prefix` take
optional bidirectional blocks (`block_ids`): tokens sharing a block id >= 0 in one sequence see
each other both ways, as Molmo2's image / video tokens do (transformers' `block_sequence_ids`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference
from ._dispatch import choose_backend
from ._validate import FLOAT_DTYPES, check_offsets, check_tensor


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
    bounds = bounds.tolist()
    if max_seqlen is None:
        max_seqlen = longest
    elif int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens ({longest})")
    if mask not in reference.MASKS:
        raise ValueError(f"mask must be one of {reference.MASKS}, got {mask!r}")
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
    return int(max_seqlen), bounds


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


def _sdpa_cpu(q, k, v, bounds, mask, segment_ids, scale, block_ids=None):
    """torch's own attention kernels (autograd through SDPA), one call per bucket of similar-length
    sequences padded at the end (one call per sequence cost ~100 us of overhead each, forward and
    backward, for the hundreds of short image and text sequences of a training step). Right padding
    needs no mask under `causal` (a real query never sees a later key); `bidirectional` masks the
    padded keys; `shared_prefix` and sequences holding bidirectional blocks get a dense boolean
    mask. Padding rows gather token 0 and are dropped; no real query sees a padded key (causal:
    they come after it; otherwise masked), and a padded query row of a dense mask attends its
    sequence's first key only, so no row is fully masked."""
    T, Hq, D = q.shape
    seqs = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    if not seqs:
        return q.new_zeros(q.shape)
    gqa = Hq != k.shape[1]
    outs, rows = [], []
    for bucket in _length_buckets([hi - lo for lo, hi in seqs]):
        spans = [seqs[i] for i in bucket]
        L = spans[0][1] - spans[0][0]
        lens = torch.tensor([hi - lo for lo, hi in spans])
        pos = torch.arange(L)
        valid = pos[None, :] < lens[:, None]                                   # [G, L]
        idx = torch.where(valid, torch.tensor([lo for lo, _ in spans])[:, None] + pos[None, :], 0)
        # index_select, not x[idx]: its backward is an index_add, where advanced indexing's is a
        # much slower accumulating index_put
        flat = idx.reshape(-1).to(q.device)
        qs, ks, vs = (x.index_select(0, flat).view(len(spans), L, x.shape[1], D).transpose(1, 2) for x in (q, k, v))
        padded = bool((lens < L).any())
        dense = mask == "shared_prefix" or (block_ids is not None and any(
            bool((block_ids[lo:hi] >= 0).any()) for lo, hi in spans))
        attn_mask, causal = None, False
        if dense:
            m = torch.zeros(len(spans), L, L, dtype=torch.bool)
            for g, (lo, hi) in enumerate(spans):
                m[g, :hi - lo, :hi - lo] = reference.attention_mask_dense(lo, hi, mask, segment_ids, block_ids)
                m[g, hi - lo:, 0] = True
            attn_mask = m[:, None].to(q.device)
        elif mask == "bidirectional" and padded:
            attn_mask = valid[:, None, None, :].to(q.device)
        else:
            causal = mask == "causal"
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                           enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(-1, Hq, D)                               # [G * L, Hq, D]
        outs.append(o.index_select(0, valid.reshape(-1).nonzero()[:, 0].to(q.device)) if padded else o)
        rows.append(idx[valid])
    # cu_seqlens cover every token (validated: cu_seqlens[-1] == T), so `rows` is a permutation of
    # 0..T-1: the identity when the buckets come out in stream order
    rows = torch.cat(rows)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if bool((rows == torch.arange(T)).all()):
        return out
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(T)
    return out.index_select(0, inverse.to(q.device))


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
    """
    if check_inputs:
        max_seqlen, bounds = _validate(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, softmax_scale,
                                       block_ids)
    else:
        bounds = None
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    which = choose_backend("varlen_attention", q.device, backend)
    if which == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, mask=mask, segment_ids=segment_ids,
                                          block_ids=block_ids, softmax_scale=scale)
    if which == "cpu":
        return _sdpa_cpu(q, k, v, bounds if bounds is not None else cu_seqlens.tolist(), mask, segment_ids, scale,
                         block_ids)
    if which == "flash":
        if block_ids is not None:
            raise RuntimeError("varlen_attention: backend 'flash' cannot express bidirectional blocks (block_ids); "
                               "use the Triton kernel (backend='triton' or the default 'auto')")
        if mask == "shared_prefix":
            raise RuntimeError("varlen_attention: backend 'flash' serves causal and bidirectional masks only; "
                               "shared_prefix needs the Triton kernel")
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=scale, causal=(mask == "causal"), deterministic=deterministic)
    from ..kernels.varlen_attention import varlen_attention_triton
    return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, mask=mask, segment_ids=segment_ids,
                                   block_ids=block_ids, softmax_scale=scale, deterministic=deterministic)
