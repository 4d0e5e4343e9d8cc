"""The three ops of mrrm, each dispatching by device and MRRM_OPS (see mrrm.ops._dispatch).

    varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, mask, segment_ids, softmax_scale)
    gather_value_head(hidden, positions, w1, b1, w2, b2, *, activation, scale)
    listwise_ce(scores, group_offsets, targets, *, loss, reduction)
"""
from mrrm.ops._dispatch import BACKENDS, OP_BACKENDS, choose_backend
from mrrm.ops.listwise_ce import listwise_ce
from mrrm.ops.value_head import gather_value_head
from mrrm.ops.varlen_attention import varlen_attention

__all__ = ["varlen_attention", "gather_value_head", "listwise_ce", "choose_backend", "BACKENDS", "OP_BACKENDS"]
