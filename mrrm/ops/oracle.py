"""Pure-torch reference ops: the oracle every backend is tested against.

Written for clarity, not speed: explicit masks, fp32 (or fp64) math, plain autograd. Inputs are
assumed valid here; the public ops in `mrrm.ops` validate before they dispatch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mrrm.common import ACTIVATIONS  # noqa: F401  (re-exported: mrrm.ops.oracle.ACTIVATIONS)

MASKS = ("causal", "bidirectional", "shared_prefix")
CE_LOSSES = ("best", "plackett_luce", "soft")  # listwise_ce's `loss` (the training losses are mrrm.train.LOSSES)
REDUCTIONS = ("mean", "sum", "none")


def activation_fn(name: str):
    return {
        "silu": F.silu,
        "gelu": F.gelu,  # exact (erf) GELU, nn.GELU()'s default
        "relu": F.relu,
        "selu": F.selu,
        "tanh": torch.tanh,
    }[name]


def attention_mask_dense(lo: int, hi: int, mask: str, segment_ids: torch.Tensor | None,
                         block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [L, L] visibility (True = query row may attend key column) for tokens lo..hi-1.

    With `block_ids` (int32 [T], -1 = no block), query i also sees key j when both carry the same
    block id b >= 0, in either direction: the base mask OR (block_ids[i] >= 0 and
    block_ids[i] == block_ids[j]). Not defined for mask='bidirectional'."""
    L = hi - lo
    ref = segment_ids if segment_ids is not None else block_ids
    idx = torch.arange(L, device=ref.device if ref is not None else "cpu")
    if mask == "bidirectional":
        if block_ids is not None:
            raise ValueError("block_ids is meaningless with mask='bidirectional' (every key is already visible)")
        return torch.ones(L, L, dtype=torch.bool, device=idx.device)
    visible = idx[None, :] <= idx[:, None]
    if mask == "shared_prefix":
        seg = segment_ids[lo:hi].long()
        seg_q, seg_k = seg[:, None], seg[None, :]
        visible = visible & ((seg_k == 0) | (seg_k == seg_q))
    if block_ids is not None:
        blk = block_ids[lo:hi].to(idx.device).long()
        visible = visible | ((blk[:, None] >= 0) & (blk[:, None] == blk[None, :]))
    return visible


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, *, mask="causal", segment_ids=None,
                     block_ids=None, softmax_scale=None):
    """Attention over a packed stream. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [S+1].

    `shared_prefix`: key j is visible to query i iff same sequence, j <= i and
    segment_ids[j] in (0, segment_ids[i]). `block_ids` (int32 [T] or None; -1 = no block; with
    `causal` or `shared_prefix`): key j is also visible to query i iff same sequence and
    block_ids[i] == block_ids[j] >= 0 (bidirectional blocks, e.g. a sequence's image tokens).
    Returns [T, Hq, D] in q's dtype (math in fp32 or fp64).
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bounds = cu_seqlens.tolist()
    outs = []
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        if hi == lo:
            continue
        qs = q[lo:hi].to(acc).transpose(0, 1)  # [Hq, L, D]
        ks = k[lo:hi].to(acc).transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        vs = v[lo:hi].to(acc).transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        visible = attention_mask_dense(lo, hi, mask, segment_ids, block_ids).to(q.device)
        logits = (qs @ ks.transpose(1, 2)) * scale
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        outs.append((probs @ vs).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0).to(q.dtype)


def gather_value_head(hidden, positions, w1, b1, w2, b2, *, activation="silu", scale=1.0):
    """scale * (act(hidden[positions] @ w1.T + b1) @ w2.T + b2) -> [M], in the promoted dtype of
    hidden and w1 (a bf16 backbone with an fp32 head gives fp32 scores)."""
    out_dtype = torch.promote_types(hidden.dtype, w1.dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    rows = hidden.index_select(0, positions).to(acc)
    z = rows @ w1.to(acc).t() + b1.to(acc)
    y = activation_fn(activation)(z) @ w2.to(acc).t() + b2.to(acc)
    return (scale * y.squeeze(-1)).to(out_dtype)


def _group_ids(group_offsets: torch.Tensor, M: int) -> torch.Tensor:
    sizes = (group_offsets[1:] - group_offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(sizes), device=group_offsets.device), sizes, output_size=M)


def _group_logsumexp(scores, group_ids, B):
    """Per-group logsumexp of `scores`, gathered back to [M]."""
    gmax = torch.full((B,), float("-inf"), dtype=scores.dtype, device=scores.device)
    gmax = gmax.scatter_reduce(0, group_ids, scores.detach(), reduce="amax", include_self=True)
    ex = torch.exp(scores - gmax[group_ids])
    gsum = torch.zeros(B, dtype=scores.dtype, device=scores.device).index_add(0, group_ids, ex)
    return (torch.log(gsum) + gmax)


def listwise_ce(scores, group_offsets, targets, *, loss="best", reduction="mean"):
    """Segmented listwise losses over ragged groups (see mrrm.ops.listwise_ce for the contract).

    best:           -log softmax(scores_g)[targets[b]]
    plackett_luce:  sum over responses i of -s_i + logsumexp{s_j : rank_j >= rank_i}; a response
                    competes with every response not ranked strictly better, so tied responses are
                    each other's competitors (Breslow's handling of ties). A group whose responses
                    are all tied contributes sum_i -s_i + LSE(all) = N * (-mean-free CE).
    soft:           -sum_i p_i log softmax(scores_g)_i
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(acc)
    M = s.shape[0]
    B = group_offsets.shape[0] - 1
    gid = _group_ids(group_offsets, M)
    if loss == "best":
        lse = _group_logsumexp(s, gid, B)
        picked = s[group_offsets[:-1].long() + targets.long()]
        per_group = lse - picked
    elif loss == "soft":
        lse = _group_logsumexp(s, gid, B)
        p = targets.to(acc)
        logp = s - lse[gid]
        per_group = torch.zeros(B, dtype=acc, device=s.device).index_add(0, gid, -p * logp)
    elif loss == "plackett_luce":
        per_group_list = []
        offs = group_offsets.tolist()
        for b in range(B):
            sg = s[offs[b]:offs[b + 1]]
            rg = targets[offs[b]:offs[b + 1]].to(acc)
            comp = rg[None, :] >= rg[:, None]  # row i: the set {j : rank_j >= rank_i}
            lse_i = torch.logsumexp(sg[None, :].masked_fill(~comp, float("-inf")), dim=1)
            per_group_list.append((lse_i - sg).sum())
        per_group = torch.stack(per_group_list) if per_group_list else s.new_zeros(0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if reduction == "none":
        return per_group.to(scores.dtype)
    if reduction == "sum":
        return per_group.sum().to(scores.dtype)
    return per_group.mean().to(scores.dtype)
