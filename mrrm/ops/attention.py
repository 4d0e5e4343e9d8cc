"""varlen_attention: attention over a packed stream of sequences (no padding).

Masks: `causal` (joint scoring), `bidirectional` (vision encoders), `shared_prefix` (independent
scoring: each response sees the shared prefix and itself only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference
from ._dispatch import choose_backend
from ._validate import FLOAT_DTYPES, check_offsets, check_tensor


def _validate(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, softmax_scale):
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
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return int(max_seqlen), bounds


def _sdpa_cpu(q, k, v, bounds, mask, segment_ids, scale):
    """torch's own attention kernels, one call per sequence (autograd through SDPA)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        qs, ks, vs = (x[lo:hi].transpose(0, 1) for x in (q, k, v))
        if Hq != Hkv:
            ks = ks.repeat_interleave(Hq // Hkv, dim=0)
            vs = vs.repeat_interleave(Hq // Hkv, dim=0)
        if mask == "shared_prefix":
            attn_mask = reference.attention_mask_dense(lo, hi, mask, segment_ids)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=(mask == "causal"), scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, *, mask="causal", segment_ids=None,
                     softmax_scale=None, deterministic=False, backend=None, check_inputs=True):
    """Flash-style attention over a packed varlen stream.

    q [T, Hq, D], k and v [T, Hkv, D] (GQA when Hq > Hkv), cu_seqlens int32 [S+1]. With
    mask='shared_prefix', segment_ids int32 [T] (0 = shared prefix, i >= 1 = response i, a
    response's separator belongs to it): key j is visible to query i iff same sequence, j <= i and
    segment_ids[j] in (0, segment_ids[i]). Returns [T, Hq, D]; differentiable in q, k, v.

    `deterministic`: the Triton backward never uses atomics, so it is always deterministic; the
    flag is kept for flash-attn's signature. `check_inputs=False` skips the validation (which
    syncs with the device) for callers that built the metadata themselves, e.g. the model.
    """
    if check_inputs:
        max_seqlen, bounds = _validate(q, k, v, cu_seqlens, max_seqlen, mask, segment_ids, softmax_scale)
    else:
        bounds = None
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    which = choose_backend("varlen_attention", q.device, backend)
    if which == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, mask=mask,
                                          segment_ids=segment_ids, softmax_scale=scale)
    if which == "cpu":
        return _sdpa_cpu(q, k, v, bounds if bounds is not None else cu_seqlens.tolist(), mask, segment_ids, scale)
    if which == "flash":
        if mask == "shared_prefix":
            raise RuntimeError("varlen_attention: backend 'flash' serves causal and bidirectional masks only; "
                               "shared_prefix needs the Triton kernel")
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=scale, causal=(mask == "causal"), deterministic=deterministic)
    from ..kernels.varlen_attention import varlen_attention_triton
    return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, mask=mask, segment_ids=segment_ids,
                                   softmax_scale=scale, deterministic=deterministic)
