"""The three ops of mrrm, each dispatching by device and MRRM_OPS (see mrrm.ops._dispatch).

    varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, mask, segment_ids, softmax_scale)
    gather_value_head(hidden, positions, w1, b1, w2, b2, *, activation, scale)
    listwise_ce(scores, group_offsets, targets, *, loss, reduction)
"""
from ._dispatch import BACKENDS, OP_BACKENDS, choose_backend
from .listwise_ce import listwise_ce
from .value_head import gather_value_head
from .varlen_attention import varlen_attention

__all__ = ["varlen_attention", "gather_value_head", "listwise_ce", "choose_backend", "BACKENDS", "OP_BACKENDS"]
