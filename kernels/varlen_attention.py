"""Flash-attention-2 style forward and backward over a packed varlen stream, in Triton.

Layout (flash-attn's varlen convention, no padding):
    q [T, Hq, D], k / v [T, Hkv, D] (GQA when Hq > Hkv), cu_seqlens int32 [S+1], max_seqlen int.
    The last dimension must be contiguous; the token and head strides are free.

Masks (constexpr MASK):
    causal         key j visible to query i iff same sequence and j <= i
    bidirectional  key j visible to query i iff same sequence
    shared_prefix  with segment_ids int32 [T] (0 = shared prefix, r >= 1 = response r; within a
                   sequence the segments are contiguous and non-decreasing, prefix first: the public
                   op `mrrm.ops.varlen_attention` validates this): key j visible to query i iff same
                   sequence, j <= i and segment_ids[j] in (0, segment_ids[i]).
Bidirectional blocks (constexpr BLOCKS; `causal` and `shared_prefix`), with block_ids int32 [T]
(-1 = no block): key j is ALSO visible to query i iff same sequence and
block_ids[i] == block_ids[j] >= 0 (transformers' `block_sequence_ids` overlay: Molmo2's image and
video tokens see each other both ways, later tokens of their block included). A block's tokens
need not be contiguous, a sequence may hold several blocks, and with `shared_prefix` every block
token lies in the prefix (validated by the public op).

shared_prefix SKIPS the key blocks of other responses (they are never loaded, not computed and
masked). Because segments are contiguous runs, the rule above is equivalent, for j <= i in one
sequence, to `j < prefix_end or j >= seg_start[i]`, and, seen from the key side, to
`i < key_end[j]` where key_end[j] = sequence end for a prefix key and the end of j's segment
otherwise. The launcher precomputes (vectorised torch ops, no host sync):
    prefix_end[s]  number of prefix tokens of sequence s          (relative to the sequence start)
    seg_start[t]   first token of t's segment                      (relative)
    key_end[t]     sequence length if t is a prefix token, else the end of t's segment (relative)
and the kernels visit
    forward / dQ, query block [m0, m1):   keys [0, min(P, m1))  then  [max(P, seg_start[m0]), m1)
    dK / dV, key block [n0, n1):          queries [n0, max(key_end[n0:n1]))
i.e. prefix blocks and the block's own response only. Inside a visited range, blocks that are
fully visible run without any masking code; only the blocks at range edges and on the diagonal
apply the elementwise mask (bounds, causal, segment rule).

BLOCKS widens the ranges by the spans of the block ids present, from `block_metadata` (vectorised,
no host sync, memoised per forward like the shared_prefix metadata):
    blk_start[t], blk_end[t]   span [first, last + 1) of t's block id within its sequence
                               (relative); (sequence length, 0) for a token outside any block
    forward / dQ:   the causal range [a_body, min(P, m1)) becomes [a_body, c_hi),
                    c_hi = max(min(P, m1), max(blk_end[m0:m1]))   (later keys of the rows' blocks)
    dK / dV:        the diagonal range [n0, diag_hi) becomes [d_lo, diag_hi),
                    d_lo = min(n0, min(blk_start[n0:n1])) rounded down to BLOCK_M
                    (earlier queries of the keys' blocks)
and these two ranges apply `base | (bid_q == bid_k >= 0)` elementwise. No other pair changes: a
block pair with j <= i is visible through the base rule already (blocks lie in the prefix for
`shared_prefix`, whose keys every later query sees), so the fully visible and the segment ranges
keep their code. A query (key) block without block tokens visits exactly the tiles it did without
BLOCKS; with block tokens it visits only the tiles up to (down to) its blocks' span ends (starts).
With BLOCKS off the kernels compile to the code they had before the flag existed.

Kernels (without atomics under the default BACKWARD_VARIANT "split", so the backward is deterministic;
"atomic_dq" adds dQ with atomics, see BACKWARD_VARIANTS; the `deterministic` argument is
accepted for flash-attn's signature and changes nothing):
    _attn_fwd        grid (Hq, S, cdiv(max_seqlen, BLOCK_M)): online softmax with exp2 and fp32
                     accumulation; writes O and the log-sum-exp LSE [Hq, T] in log2 units
                     (lse2 = log2(sum_j 2^(s_ij * scale * log2(e)))), which the backward reuses.
    _attn_bwd_preprocess  delta[h, t] = rowsum(dO * O)
    _attn_bwd_dkdv   grid (Hkv, S, cdiv(max_seqlen, BLOCK_N)): one key block, looping over the
                     query heads of its GQA group inside the program (dK/dV summed in registers)
    _attn_bwd_dq     grid (Hq, S, cdiv(max_seqlen, BLOCK_M))
Programs whose block starts past their sequence's end exit at once. Heaviest first, launch-wide:
the block index is the SLOWEST grid dimension (CUDA issues blocks x fastest), so every head and
sequence of the heaviest causal block is issued before any of the next: the last query blocks for
the forward and dQ, the FIRST key blocks for dK/dV (a key block sees the queries after it). List
scheduling on 132 SMs (`python -m bench_perf.schedule`) puts the launch at 1.005x its ideal time
at 16k causal and 1.003x for 16 x 1k, against 1.15x and 1.15x for the earlier dK/dV order (key
blocks reversed inside each head, lightest first), which the H200 measured 0.82x FlexAttention at.

Dtypes: fp16 / bf16 on the GPU (fp32 works too, with IEEE fp32 dots; float64 is refused, use
the reference); fp32 or fp16 under the Triton interpreter (TRITON_INTERPRET=1), whose bf16 dots are
broken. Pointer offsets from the sequence start are int64, so T * H * D may exceed 2^31.

Block configurations (no triton.autotune: it fails under the interpreter, and a fixed table keeps
the AOT compile check in CI exact). Chosen per padded head dim BLOCK_D (next power of 2 >= D,
loads masked on d), starting from flash-attention-2's and Triton's fused-attention tutorial's
settings and then picked, among the candidates, for no (or the fewest) register spills in the
sm_90 build (ptxas -v on the AOT output; no GPU timing has tuned them yet). Every config is listed
in AOT_SPECS and compiled for sm_90 in CI; the same tiles serve fp16, bf16 and fp32:
    kernel     BLOCK_D <= 64              BLOCK_D = 128                (block_m, block_n, warps, stages)
    fwd        (128, 64, 8, 3)            (128, 64, 8, 3)              query block x key block
    dkdv       (32, 128, 8, 3)            (32, 128, 8, 2)              query block x key block
    dq         (128, 64, 8, 3)            (128, 32, 8, 2)              query block x key block
    BLOCK_D = 256 uses smaller blocks (64/32), see `choose_configs`.
dK/dV holds two [128, BLOCK_D] fp32 accumulators per program, hence 8 warps and short query
blocks there; at BLOCK_D = 128 it sits at 255 registers with a few bytes of spill (16-104 B).
Override them per call (`configs=`) or for the process (`CONFIG_OVERRIDE`); tests use 16 x 16 blocks
to exercise multi-block paths cheaply in the interpreter. Constraints: powers of 2, >= 16; fwd and
dq need block_m % block_n == 0, dkdv needs block_n % block_m == 0 (the diagonal blocks align).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mrrm.common import tensor_version

MASK_CAUSAL = 0
MASK_BIDIRECTIONAL = 1
MASK_SHARED_PREFIX = 2
MASK_IDS = {"causal": MASK_CAUSAL, "bidirectional": MASK_BIDIRECTIONAL, "shared_prefix": MASK_SHARED_PREFIX}

# Masking modes of the inner loops (constexpr).
_NONE = tl.constexpr(0)     # every (query, key) pair of the visited blocks is visible: no masking code
_BOUNDS = tl.constexpr(1)   # only the far end of the range is masked (bidirectional tails)
_CAUSAL = tl.constexpr(2)   # causal + range end (forward / dQ: prefix keys near the diagonal)
_SEGMENT = tl.constexpr(3)  # causal + range end + own segment: key j >= seg_start[i] (forward / dQ)
_KEY_END = tl.constexpr(2)  # dK/dV: query i sees key j iff j <= i < key_end[j]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _hoff(head, stride_h, ALIGN_H: tl.constexpr):
    """head * stride_h, hinted as a multiple of 8 elements when the launcher checked it: with D = 72
    (Qwen3-VL's vision tower) the head stride is not a multiple of 16, so Triton's own argument
    specialisation gives no alignment and the loads would be neither vectorised nor pipelined."""
    if ALIGN_H:
        return tl.multiple_of(head * stride_h, 8)
    else:
        return head * stride_h


@triton.jit
def _load_rows(base, rows, stride_t, offs_d, hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A [len(rows), BLOCK_D] tile of a [T, H, D] tensor; rows masked to < hi when MASK_ROWS."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < hi, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _query_key_ranges(P, g_first, g_last, m_start, m_end, BLOCK_N: tl.constexpr):
    """Key ranges a query block [m_start, m_end) visits (all relative to the sequence start).

    P is the prefix end (the sequence length for `causal`); g_first / g_last the segment starts of
    the block's first / last query. Returns the boundaries of five consecutive-in-role ranges:
        [0, a_body)          prefix keys fully visible to every query of the block   (no mask)
        [a_body, a_hi)       prefix keys near the diagonal                           (causal)
        [b0, u0)             own-response keys not visible to every query            (segment)
        [u0, b_body)         own-response keys fully visible                         (no mask)
        [b_body, m_end)      own-response keys at the diagonal                       (segment)
    For `causal` (P = sequence length) only the first two are non-empty.
    """
    a_hi = tl.minimum(P, m_end)
    a_body = (tl.minimum(P, m_start) // BLOCK_N) * BLOCK_N
    b0 = tl.minimum(tl.maximum(P, g_first), m_end)
    u0 = tl.minimum(tl.maximum(P, g_last), m_end)
    b_body = u0 + (tl.maximum(m_start - u0, 0) // BLOCK_N) * BLOCK_N
    return a_body, a_hi, b0, u0, b_body


@triton.jit
def _row_blocks(blk_base, BLK_END, seq_start, offs_m, L, a_hi, BLOCKS: tl.constexpr):
    """Block ids of a query block's rows and the end of its causal key range (forward / dQ).

    Without BLOCKS: (placeholder, a_hi). With BLOCKS: the rows' block ids, -2 for a row outside any
    block (keys carry ids >= -1, so such a row matches no key), and c_hi = max(a_hi, the largest
    block-span end among the rows): the causal range [a_body, a_hi) grows to [a_body, c_hi) so that
    a block row also reaches the later keys of its block. Block spans lie in the prefix
    (validated), so c_hi <= P and the range never runs into the responses' ranges."""
    if BLOCKS:
        row_ok = offs_m < L
        row_blk = tl.load(blk_base + offs_m, mask=row_ok, other=-1)
        row_blk = tl.where(row_blk >= 0, row_blk, -2)
        span_end = tl.load(BLK_END + seq_start + offs_m, mask=row_ok, other=0)
        c_hi = tl.maximum(a_hi, tl.max(span_end, 0))
    else:
        row_blk = offs_m
        c_hi = a_hi
    return row_blk, c_hi


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m, row_seg_start,
                lo, hi, qk_scale, offs_n, offs_d, blk_base, row_blk,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MODE: tl.constexpr, IEEE: tl.constexpr, BLOCKS: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi). BLOCKS (with a masked MODE): a key is also
    visible when its block id equals the row's `row_blk` (-2 for rows outside any block); the
    block ids of the keys are read from `blk_base` (relative to the sequence start)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        k = _load_rows(k_base, cols, stride_kt, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        v = _load_rows(v_base, cols, stride_vt, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        qk = _dot(q, tl.trans(k), IEEE)
        if MODE == _NONE:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            visible = cols[None, :] < hi
            if MODE >= _CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            if MODE == _SEGMENT:
                visible = visible & (cols[None, :] >= row_seg_start[:, None])
            if BLOCKS:
                col_blk = tl.load(blk_base + cols, mask=cols < hi, other=-1)
                visible = visible | (row_blk[:, None] == col_blk[None, :])
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row may see nothing in this block yet (m_new = -inf): subtract 0 instead, so that
            # p = 0 and alpha = 0 rather than NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
        cnt += 1
    return acc, l_i, m_i, cnt


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_SEQLENS, PREFIX_END, SEG_START, BLOCK_IDS, BLK_END, COUNTS,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              T, qk_scale,
              HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, MASK: tl.constexpr, BLOCKS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              IEEE: tl.constexpr, COUNT: tl.constexpr, ALIGN_H: tl.constexpr):
    num_m = tl.num_programs(2)
    pid_m = num_m - 1 - tl.program_id(2)  # heaviest (last) causal query blocks first, launch-wide
    head = tl.program_id(0)
    seq = tl.program_id(1)
    seq_start = tl.load(CU_SEQLENS + seq)
    L = tl.load(CU_SEQLENS + seq + 1) - seq_start
    m_start = pid_m * BLOCK_M
    if m_start >= L:
        return
    m_end = tl.minimum(m_start + BLOCK_M, L)
    kv_head = head // GROUP
    seq_start64 = seq_start.to(tl.int64)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + seq_start64 * stride_qt + _hoff(head, stride_qh, ALIGN_H)
    k_base = K + seq_start64 * stride_kt + _hoff(kv_head, stride_kh, ALIGN_H)
    v_base = V + seq_start64 * stride_vt + _hoff(kv_head, stride_vh, ALIGN_H)
    blk_base = BLOCK_IDS + seq_start
    q = _load_rows(q_base, offs_m, stride_qt, offs_d, L, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = 0
    if MASK == 1:  # bidirectional: every key of the sequence
        body = (L // BLOCK_N) * BLOCK_N
        acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                         offs_m, 0, body, qk_scale, offs_n, offs_d, blk_base, offs_m,
                                         HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
        acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                         offs_m, body, L, qk_scale, offs_n, offs_d, blk_base, offs_m,
                                         HEAD_DIM, BLOCK_N, BLOCK_D, _BOUNDS, IEEE, False)
    else:
        if MASK == 2:
            P = tl.load(PREFIX_END + seq)
            g_first = tl.load(SEG_START + seq_start + m_start)
            g_last = tl.load(SEG_START + seq_start + m_end - 1)
            row_seg_start = tl.load(SEG_START + seq_start + offs_m, mask=offs_m < L, other=0)
        else:
            P = L
            g_first = L
            g_last = L
            row_seg_start = offs_m
        a_body, a_hi, b0, u0, b_body = _query_key_ranges(P, g_first, g_last, m_start, m_end, BLOCK_N)
        row_blk, c_hi = _row_blocks(blk_base, BLK_END, seq_start, offs_m, L, a_hi, BLOCKS)
        acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                         row_seg_start, 0, a_body, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                         HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
        acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                         row_seg_start, a_body, c_hi, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                         HEAD_DIM, BLOCK_N, BLOCK_D, _CAUSAL, IEEE, BLOCKS)
        if MASK == 2:
            acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                             row_seg_start, b0, u0, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                             HEAD_DIM, BLOCK_N, BLOCK_D, _SEGMENT, IEEE, False)
            acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                             row_seg_start, u0, b_body, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                             HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
            acc, l_i, m_i, cnt = _fwd_blocks(acc, l_i, m_i, cnt, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                             row_seg_start, b_body, m_end, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                             HEAD_DIM, BLOCK_N, BLOCK_D, _SEGMENT, IEEE, False)

    # every real row sees at least itself; padded rows (>= L) are not stored
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (O + seq_start64 * stride_ot + _hoff(head, stride_oh, ALIGN_H) + offs_m[:, None] * stride_ot
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))
    lse = m_i + tl.math.log2(l_safe)
    tl.store(LSE + head.to(tl.int64) * T + seq_start64 + offs_m, lse, mask=offs_m < L)
    if COUNT:
        tl.store(COUNTS + pid_m + num_m * (head + tl.num_programs(0) * seq), cnt)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T,
                         HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + head * stride_oh + rows64[:, None] * stride_ot + offs_d[None, :], mask=m, other=0.0)
    do = tl.load(DO + head * stride_doh + rows64[:, None] * stride_dot + offs_d[None, :], mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * T + rows64, delta, mask=rows < T)


@triton.jit
def _dkdv_blocks(dk, dv, cnt, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                 offs_n, key_end, lo, hi, qk_scale, offs_m, offs_d, blk_base, key_blk, dqa_base, stride_dqat,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 MODE: tl.constexpr, IEEE: tl.constexpr, BLOCKS: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) (computed transposed:
    rows = keys, columns = queries, so that no [BLOCK_M, BLOCK_N] tile needs a transpose).
    BLOCKS (with _KEY_END): a query also sees a key whose block id `key_blk` (-2 outside any block)
    equals its own, read from `blk_base` (relative to the sequence start).
    ATOMIC_DQ (flash-attention-2's dQ): also add this tile's dS K to the fp32 dQ accumulator at
    `dqa_base` (unscaled) with atomics: 5 matmuls per tile instead of the 4 here plus 3 in _dq_blocks."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        q = _load_rows(q_base, rows, stride_qt, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        do = _load_rows(do_base, rows, stride_dot, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        if MODE == _NONE:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        else:
            lse = tl.load(lse_base + rows, mask=rows < hi, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < hi, other=0.0)
        qkT = _dot(k, tl.trans(q), IEEE)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MODE == _BOUNDS:
            pT = tl.where(rows[None, :] < hi, pT, 0.0)
        elif MODE == _KEY_END:
            seen = (rows[None, :] >= offs_n[:, None]) & (rows[None, :] < key_end[:, None])
            if BLOCKS:
                row_blk = tl.load(blk_base + rows, mask=rows < hi, other=-1)
                seen = seen | (key_blk[:, None] == row_blk[None, :])
            pT = tl.where(seen, pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += _dot(dsT, q, IEEE)
        if ATOMIC_DQ:
            dq_part = _dot(tl.trans(dsT), k, IEEE)
            tl.atomic_add(dqa_base + rows[:, None] * stride_dqat + offs_d[None, :], dq_part,
                          mask=(rows[:, None] < hi) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
        cnt += 1
    return dk, dv, cnt


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, KEY_END, BLOCK_IDS, BLK_START, COUNTS, DQ_ACC,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqat, stride_dqah,
                   T, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, MASK: tl.constexpr, BLOCKS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, COUNT: tl.constexpr, ALIGN_H: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    num_n = tl.num_programs(2)
    pid_n = tl.program_id(2)  # heaviest (first) causal key blocks first, launch-wide
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    seq_start = tl.load(CU_SEQLENS + seq)
    L = tl.load(CU_SEQLENS + seq + 1) - seq_start
    n_start = pid_n * BLOCK_N
    if n_start >= L:
        return
    seq_start64 = seq_start.to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + seq_start64 * stride_kt + _hoff(kv_head, stride_kh, ALIGN_H)
    v_base = V + seq_start64 * stride_vt + _hoff(kv_head, stride_vh, ALIGN_H)
    k = _load_rows(k_base, offs_n, stride_kt, offs_d, L, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, offs_n, stride_vt, offs_d, L, HEAD_DIM, BLOCK_D, True)
    valid = offs_n < L

    # query ranges: [0, body) + [body, L) for bidirectional; otherwise the diagonal block
    # [n_start, diag_hi), the fully visible body [n_start + BLOCK_N, body) and the masked tail
    # [body, q_hi), where key j is seen by queries j <= i < key_end[j]. With BLOCKS the diagonal
    # range starts earlier, at d_lo: the block-aligned start of the earliest block span among the
    # keys, since a block key is also seen by the earlier queries of its block (those are the only
    # extra pairs: a later query of the block sees the key through the base rule already).
    blk_base = BLOCK_IDS + seq_start
    key_blk = offs_n
    d_lo = n_start
    if MASK == 1:
        key_end = offs_n
        q_hi = L
        diag_hi = 0
        body_lo = 0
        body = (L // BLOCK_M) * BLOCK_M
    else:
        if BLOCKS:
            key_blk = tl.load(blk_base + offs_n, mask=valid, other=-1)
            key_blk = tl.where(key_blk >= 0, key_blk, -2)
            span_lo = tl.min(tl.load(BLK_START + seq_start + offs_n, mask=valid, other=L), 0)
            d_lo = (tl.minimum(span_lo, n_start) // BLOCK_M) * BLOCK_M
        if MASK == 2:
            key_end = tl.load(KEY_END + seq_start + offs_n, mask=valid, other=0)
            q_hi = tl.max(key_end, 0)
            e_min = tl.min(tl.where(valid, key_end, L), 0)
        else:
            key_end = tl.where(valid, L, 0)
            q_hi = L
            e_min = L
        diag_hi = tl.minimum(n_start + BLOCK_N, q_hi)
        body_lo = n_start + BLOCK_N
        body = body_lo + (tl.maximum(e_min - body_lo, 0) // BLOCK_M) * BLOCK_M
    tail_lo = tl.maximum(body, body_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cnt = 0
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + seq_start64 * stride_qt + _hoff(head, stride_qh, ALIGN_H)
        do_base = DO + seq_start64 * stride_dot + _hoff(head, stride_doh, ALIGN_H)
        lse_base = LSE + head.to(tl.int64) * T + seq_start64
        delta_base = DELTA + head.to(tl.int64) * T + seq_start64
        dqa_base = DQ_ACC + seq_start64 * stride_dqat + head.to(tl.int64) * stride_dqah
        if MASK != 1:
            dk, dv, cnt = _dkdv_blocks(dk, dv, cnt, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                       stride_dot, offs_n, key_end, d_lo, diag_hi, qk_scale, offs_m, offs_d,
                                       blk_base, key_blk, dqa_base, stride_dqat, HEAD_DIM, BLOCK_M, BLOCK_D, _KEY_END, IEEE, BLOCKS,
                                       ATOMIC_DQ)
        dk, dv, cnt = _dkdv_blocks(dk, dv, cnt, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                   stride_dot, offs_n, key_end, body_lo, body, qk_scale, offs_m, offs_d,
                                   blk_base, key_blk, dqa_base, stride_dqat, HEAD_DIM, BLOCK_M, BLOCK_D, _NONE, IEEE, False,
                                   ATOMIC_DQ)
        if MASK == 1:
            dk, dv, cnt = _dkdv_blocks(dk, dv, cnt, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                       stride_dot, offs_n, key_end, tail_lo, q_hi, qk_scale, offs_m, offs_d,
                                       blk_base, key_blk, dqa_base, stride_dqat, HEAD_DIM, BLOCK_M, BLOCK_D, _BOUNDS, IEEE, False,
                                       ATOMIC_DQ)
        else:
            dk, dv, cnt = _dkdv_blocks(dk, dv, cnt, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                       stride_dot, offs_n, key_end, tail_lo, q_hi, qk_scale, offs_m, offs_d,
                                       blk_base, key_blk, dqa_base, stride_dqat, HEAD_DIM, BLOCK_M, BLOCK_D, _KEY_END, IEEE, False,
                                       ATOMIC_DQ)

    st_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (DK + seq_start64 * stride_dkt + _hoff(kv_head, stride_dkh, ALIGN_H) + offs_n[:, None] * stride_dkt
               + offs_d[None, :])
    dv_ptrs = (DV + seq_start64 * stride_dvt + _hoff(kv_head, stride_dvh, ALIGN_H) + offs_n[:, None] * stride_dvt
               + offs_d[None, :])
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)
    if COUNT:
        tl.store(COUNTS + pid_n + num_n * (kv_head + tl.num_programs(0) * seq), cnt)


@triton.jit
def _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, row_seg_start,
               lo, hi, qk_scale, offs_n, offs_d, blk_base, row_blk,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MODE: tl.constexpr, IEEE: tl.constexpr, BLOCKS: tl.constexpr):
    """dQ over key blocks [lo, hi); BLOCKS as in `_fwd_blocks`."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        k = _load_rows(k_base, cols, stride_kt, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        v = _load_rows(v_base, cols, stride_vt, offs_d, hi, HEAD_DIM, BLOCK_D, MODE != _NONE)
        qk = _dot(q, tl.trans(k), IEEE)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MODE != _NONE:
            visible = cols[None, :] < hi
            if MODE >= _CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            if MODE == _SEGMENT:
                visible = visible & (cols[None, :] >= row_seg_start[:, None])
            if BLOCKS:
                col_blk = tl.load(blk_base + cols, mask=cols < hi, other=-1)
                visible = visible | (row_blk[:, None] == col_blk[None, :])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
        cnt += 1
    return dq, cnt


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, PREFIX_END, SEG_START, BLOCK_IDS, BLK_END, COUNTS,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_dot, stride_doh, stride_dqt, stride_dqh,
                 T, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, MASK: tl.constexpr, BLOCKS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, COUNT: tl.constexpr, ALIGN_H: tl.constexpr):
    num_m = tl.num_programs(2)
    pid_m = num_m - 1 - tl.program_id(2)  # heaviest (last) causal query blocks first, launch-wide
    head = tl.program_id(0)
    seq = tl.program_id(1)
    seq_start = tl.load(CU_SEQLENS + seq)
    L = tl.load(CU_SEQLENS + seq + 1) - seq_start
    m_start = pid_m * BLOCK_M
    if m_start >= L:
        return
    m_end = tl.minimum(m_start + BLOCK_M, L)
    kv_head = head // GROUP
    seq_start64 = seq_start.to(tl.int64)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + seq_start64 * stride_kt + _hoff(kv_head, stride_kh, ALIGN_H)
    v_base = V + seq_start64 * stride_vt + _hoff(kv_head, stride_vh, ALIGN_H)
    q_base = Q + seq_start64 * stride_qt + _hoff(head, stride_qh, ALIGN_H)
    do_base = DO + seq_start64 * stride_dot + _hoff(head, stride_doh, ALIGN_H)
    q = _load_rows(q_base, offs_m, stride_qt, offs_d, L, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, offs_m, stride_dot, offs_d, L, HEAD_DIM, BLOCK_D, True)
    row_ok = offs_m < L
    lse = tl.load(LSE + head.to(tl.int64) * T + seq_start64 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head.to(tl.int64) * T + seq_start64 + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = 0
    blk_base = BLOCK_IDS + seq_start
    if MASK == 1:
        body = (L // BLOCK_N) * BLOCK_N
        dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_m,
                             0, body, qk_scale, offs_n, offs_d, blk_base, offs_m,
                             HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
        dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_m,
                             body, L, qk_scale, offs_n, offs_d, blk_base, offs_m,
                             HEAD_DIM, BLOCK_N, BLOCK_D, _BOUNDS, IEEE, False)
    else:
        if MASK == 2:
            P = tl.load(PREFIX_END + seq)
            g_first = tl.load(SEG_START + seq_start + m_start)
            g_last = tl.load(SEG_START + seq_start + m_end - 1)
            row_seg_start = tl.load(SEG_START + seq_start + offs_m, mask=row_ok, other=0)
        else:
            P = L
            g_first = L
            g_last = L
            row_seg_start = offs_m
        a_body, a_hi, b0, u0, b_body = _query_key_ranges(P, g_first, g_last, m_start, m_end, BLOCK_N)
        row_blk, c_hi = _row_blocks(blk_base, BLK_END, seq_start, offs_m, L, a_hi, BLOCKS)
        dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                             row_seg_start, 0, a_body, qk_scale, offs_n, offs_d, blk_base, row_blk,
                             HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
        dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                             row_seg_start, a_body, c_hi, qk_scale, offs_n, offs_d, blk_base, row_blk,
                             HEAD_DIM, BLOCK_N, BLOCK_D, _CAUSAL, IEEE, BLOCKS)
        if MASK == 2:
            dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                                 row_seg_start, b0, u0, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, _SEGMENT, IEEE, False)
            dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                                 row_seg_start, u0, b_body, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, _NONE, IEEE, False)
            dq, cnt = _dq_blocks(dq, cnt, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                                 row_seg_start, b_body, m_end, qk_scale, offs_n, offs_d, blk_base, row_blk,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, _SEGMENT, IEEE, False)

    dq_ptrs = (DQ + seq_start64 * stride_dqt + _hoff(head, stride_dqh, ALIGN_H) + offs_m[:, None] * stride_dqt
               + offs_d[None, :])
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if COUNT:
        tl.store(COUNTS + pid_m + num_m * (head + tl.num_programs(0) * seq), cnt)


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel: block_m queries x block_n keys, plus launch options."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# (fwd, dkdv, dq) per padded head dim; see the module docstring for the reasoning.
_CONFIG_TABLE = {
    64: (KernelConfig(128, 64, 8, 3), KernelConfig(32, 128, 8, 3), KernelConfig(128, 64, 8, 3)),
    128: (KernelConfig(128, 64, 8, 3), KernelConfig(32, 128, 8, 2), KernelConfig(128, 32, 8, 2)),
    256: (KernelConfig(64, 32, 8, 2), KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2)),
}
PREPROCESS_BLOCK_T = 64

# Process-wide override: a dict {"fwd": KernelConfig, "dkdv": KernelConfig, "dq": KernelConfig}
# (missing keys fall back to the table). Tests set small blocks through `configs=` instead.
CONFIG_OVERRIDE: dict | None = None

# How the backward computes dQ:
#   "split"      its own launch (_attn_bwd_dq) after dK/dV: no atomics, bit-reproducible; 7 matmuls
#                per (query tile, key tile) pair, 4 in dK/dV and 3 in dQ (q k^T and dO v^T again).
#   "atomic_dq"  flash-attention-2's way: the dK/dV programs also add dS K into an fp32 [T, Hq, D]
#                accumulator with atomics: 5 matmuls per pair and one launch less, but the order of
#                the fp32 additions varies run to run (not bit-reproducible), as flash-attn with
#                deterministic=False. The GPU check times both (bench_perf/test_kernels_gpu.py);
#                "split" stays the default until a GPU run shows "atomic_dq" faster.
BACKWARD_VARIANTS = ("split", "atomic_dq")
BACKWARD_VARIANT = "split"


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def choose_configs(head_dim: int, dtype: torch.dtype | None = None) -> dict:
    """The (fwd, dkdv, dq) KernelConfigs used for a head dim (dtype kept for future per-dtype rows:
    fp16 and bf16 share a row; fp32 runs the same tiles with IEEE dots)."""
    bd = block_d_for(head_dim)
    if bd > 256:
        raise ValueError(f"varlen_attention (triton): head_dim {head_dim} > 256 is not supported")
    fwd, dkdv, dq = _CONFIG_TABLE[max(64, bd)]
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def uniform_configs(block_m: int, block_n: int | None = None, num_warps: int = 4, num_stages: int = 2) -> dict:
    """The same square-ish tiles for every kernel (dkdv takes block_n queries x block_m keys so
    that its alignment constraint holds); meant for tests."""
    block_n = block_m if block_n is None else block_n
    return {"fwd": KernelConfig(block_m, block_n, num_warps, num_stages),
            "dkdv": KernelConfig(block_n, block_m, num_warps, num_stages),
            "dq": KernelConfig(block_m, block_n, num_warps, num_stages)}


_KERNELS = ("fwd", "dkdv", "dq")


def flatten_configs(configs: dict | None) -> list[int] | None:
    """A `configs` dict as the flat int list the custom op carries (4 ints per kernel, zeros for a
    kernel left to the table); None stays None."""
    if not configs:
        return None
    unknown = set(configs) - set(_KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel {sorted(unknown)[0]!r} in configs; expected fwd, dkdv, dq")
    flat = []
    for key in _KERNELS:
        cfg = configs.get(key)
        cfg = cfg if cfg is None or isinstance(cfg, KernelConfig) else KernelConfig(*cfg)
        flat += [0, 0, 0, 0] if cfg is None else [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages]
    return flat


def unflatten_configs(flat: list[int] | None) -> dict | None:
    if not flat:
        return None
    return {key: KernelConfig(*flat[4 * i: 4 * i + 4]) for i, key in enumerate(_KERNELS) if flat[4 * i]}


def _resolve_configs(head_dim, dtype, configs):
    out = dict(choose_configs(head_dim, dtype))
    for override in (CONFIG_OVERRIDE, configs):
        if override:
            for key, cfg in override.items():
                if key not in out:
                    raise ValueError(f"unknown kernel {key!r} in configs; expected fwd, dkdv, dq")
                out[key] = cfg if isinstance(cfg, KernelConfig) else KernelConfig(*cfg)
    for key, cfg in out.items():
        for b in (cfg.block_m, cfg.block_n):
            if b < 16 or (b & (b - 1)):
                raise ValueError(f"configs[{key!r}]: block sizes must be powers of 2 >= 16, got {cfg}")
    if out["fwd"].block_m % out["fwd"].block_n or out["dq"].block_m % out["dq"].block_n:
        raise ValueError("fwd and dq configs need block_m % block_n == 0")
    if out["dkdv"].block_n % out["dkdv"].block_m:
        raise ValueError("the dkdv config needs block_n % block_m == 0")
    return out


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def shared_prefix_metadata(cu_seqlens: torch.Tensor, segment_ids: torch.Tensor):
    """(prefix_end [S], seg_start [T], key_end [T]), int32, relative to each sequence's start.

    Vectorised (no host sync); assumes the validated layout (segments contiguous and
    non-decreasing within a sequence, prefix 0 first)."""
    T = segment_ids.shape[0]
    S = cu_seqlens.shape[0] - 1
    dev = segment_ids.device
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(S, device=dev), lengths, output_size=T)
    pos = torch.arange(T, device=dev)
    seq_lo = cu[:-1][seq_id]
    seq_len = lengths[seq_id]
    seg = segment_ids.long()
    first = pos == seq_lo
    last = pos == seq_lo + seq_len - 1
    new_seg = first.clone()
    new_seg[1:] |= seg[1:] != seg[:-1]
    end_seg = last.clone()
    end_seg[:-1] |= seg[:-1] != seg[1:]
    seg_start = torch.cummax(torch.where(new_seg, pos, 0), 0).values
    seg_end = torch.cummin(torch.where(end_seg, pos + 1, T).flip(0), 0).values.flip(0)
    is_prefix = seg == 0
    prefix_end = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, seq_id, is_prefix.long())
    key_end = torch.where(is_prefix, seq_len, seg_end - seq_lo)
    return (prefix_end.to(torch.int32), (seg_start - seq_lo).to(torch.int32), key_end.to(torch.int32))


_LAST_METADATA = None  # (weakref cu, weakref segment_ids, their versions, metadata)


def cached_shared_prefix_metadata(cu_seqlens: torch.Tensor, segment_ids: torch.Tensor):
    """shared_prefix_metadata, remembered for the last (cu_seqlens, segment_ids) pair. A model calls
    the op once per layer with the same two tensors: the ~15 small kernels then run once per
    forward instead of once per layer (measured on an H200: 36 layers of Qwen3-VL-4B spent ~25 ms
    more in independent than in joint scoring before this). A hit needs the very same tensor
    objects, unmodified since (their version counters), so new or edited inputs recompute."""
    global _LAST_METADATA
    last = _LAST_METADATA
    versions = (tensor_version(cu_seqlens), tensor_version(segment_ids))
    if last is not None:
        cu_ref, seg_ref, seen, meta = last
        if cu_ref() is cu_seqlens and seg_ref() is segment_ids and seen == versions:
            return meta
    meta = shared_prefix_metadata(cu_seqlens, segment_ids)
    _LAST_METADATA = (weakref.ref(cu_seqlens), weakref.ref(segment_ids), versions, meta)
    return meta



def block_metadata(cu_seqlens: torch.Tensor, block_ids: torch.Tensor):
    """(blk_start [T], blk_end [T]), int32, relative to each token's sequence start: the span
    [first, last + 1) of the token's block id within its sequence (the block's tokens need not be
    contiguous: the span covers the gaps). A token outside any block (-1) gets the empty span
    (sequence length, 0), which never widens a range in the kernels.

    Vectorised (no host sync): tokens are grouped by (sequence, block id) with one stable sort;
    each group's first and last positions are the ends of its runs in sorted order."""
    T = block_ids.shape[0]
    S = cu_seqlens.shape[0] - 1
    dev = block_ids.device
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(S, device=dev), lengths, output_size=T)
    seq_lo = cu[:-1][seq_id]
    blk = block_ids.long()
    # block ids are int32 (< 2^31), so (sequence, block + 1) packs into one int64 key
    key = seq_id * (1 << 32) + (blk + 1)
    sorted_key, perm = torch.sort(key, stable=True)  # stable: positions ascend within a group
    idx = torch.arange(T, device=dev)
    new_run = torch.ones(T, dtype=torch.bool, device=dev)
    new_run[1:] = sorted_key[1:] != sorted_key[:-1]
    end_run = torch.ones(T, dtype=torch.bool, device=dev)
    end_run[:-1] = sorted_key[:-1] != sorted_key[1:]
    first = torch.cummax(torch.where(new_run, idx, 0), 0).values
    last = torch.cummin(torch.where(end_run, idx, T).flip(0), 0).values.flip(0)
    span_lo = torch.empty(T, dtype=torch.long, device=dev)
    span_hi = torch.empty(T, dtype=torch.long, device=dev)
    span_lo[perm] = perm[first]
    span_hi[perm] = perm[last] + 1
    in_block = blk >= 0
    blk_start = torch.where(in_block, span_lo - seq_lo, lengths[seq_id])
    blk_end = torch.where(in_block, span_hi - seq_lo, 0)
    return blk_start.to(torch.int32), blk_end.to(torch.int32)


_LAST_BLOCK_METADATA = None  # (weakref cu, weakref block_ids, their versions, metadata)


def cached_block_metadata(cu_seqlens: torch.Tensor, block_ids: torch.Tensor):
    """block_metadata, remembered for the last (cu_seqlens, block_ids) pair, like
    `cached_shared_prefix_metadata`: a model calls the op once per layer with the same tensors, so
    the sort and scans run once per forward. A hit needs the very same, unmodified tensor objects."""
    global _LAST_BLOCK_METADATA
    last = _LAST_BLOCK_METADATA
    versions = (tensor_version(cu_seqlens), tensor_version(block_ids))
    if last is not None:
        cu_ref, blk_ref, seen, meta = last
        if cu_ref() is cu_seqlens and blk_ref() is block_ids and seen == versions:
            return meta
    meta = block_metadata(cu_seqlens, block_ids)
    _LAST_BLOCK_METADATA = (weakref.ref(cu_seqlens), weakref.ref(block_ids), versions, meta)
    return meta


def _check_blocks(mask, block_ids):
    """True when the call has bidirectional blocks (the kernels' BLOCKS flag)."""
    if block_ids is None:
        return False
    if mask == "bidirectional":
        raise ValueError("block_ids is meaningless with mask='bidirectional' (every key is already visible)")
    return True


def _heads_aligned(*tensors):
    """True when every head stride is a multiple of 8 elements (the ALIGN_H hint of the kernels)."""
    return all(t.stride(1) % 8 == 0 for t in tensors)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"varlen_attention (triton) supports float16, bfloat16 and float32, got {q.dtype}; "
                         "use backend='torch' for float64")


def attention_forward(q, k, v, cu_seqlens, max_seqlen, *, mask="causal", segment_ids=None, block_ids=None,
                      softmax_scale=None, configs=None, meta=None, block_meta=None, count_blocks=False):
    """Forward launcher. Returns (out [T, Hq, D], lse2 [Hq, T] fp32 in log2 units, counts or None).

    `block_ids` (int32 [T] or None): bidirectional blocks over `causal` / `shared_prefix`; `meta`
    and `block_meta` pass precomputed `shared_prefix_metadata` / `block_metadata`.
    `count_blocks=True` also returns the number of key blocks each program visited (int32, one
    entry per program of the grid, 0 for programs that exited early): a debugging aid that shows
    the shared_prefix skipping."""
    _check_dtype(q)
    blocks = _check_blocks(mask, block_ids)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    mask_id = MASK_IDS[mask]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cfg = _resolve_configs(D, q.dtype, configs)["fwd"]
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    S = cu_seqlens.shape[0] - 1
    num_m = triton.cdiv(int(max_seqlen), cfg.block_m)
    counts = torch.zeros(num_m * Hq * S, dtype=torch.int32, device=q.device) if count_blocks else None
    if T == 0 or S == 0 or num_m == 0:
        return out, lse, counts
    if mask_id == MASK_SHARED_PREFIX:
        prefix_end, seg_start, _ = meta if meta is not None else shared_prefix_metadata(cu_seqlens, segment_ids)
    else:
        prefix_end = seg_start = cu_seqlens  # unused placeholders
    if blocks:
        _, blk_end = block_meta if block_meta is not None else block_metadata(cu_seqlens, block_ids)
    else:
        block_ids = blk_end = cu_seqlens  # unused placeholders
    _attn_fwd[(Hq, S, num_m)](
        q, k, v, out, lse, cu_seqlens, prefix_end, seg_start, block_ids, blk_end,
        counts if counts is not None else cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, scale * LOG2E,
        HEAD_DIM=D, GROUP=Hq // Hkv, MASK=mask_id, BLOCKS=blocks, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d_for(D), IEEE=q.dtype == torch.float32, COUNT=count_blocks,
        ALIGN_H=_heads_aligned(q, k, v, out), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, counts


def attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, *, mask="causal", segment_ids=None,
                       block_ids=None, softmax_scale=None, configs=None, meta=None, block_meta=None,
                       count_blocks=False, variant=None, only=None):
    """Backward launcher. Returns (dq, dk, dv, counts) where counts is None or
    {"dkdv": query blocks visited per dK/dV program (summed over its GQA heads), "dq": key blocks
    visited per dQ program (zeros under "atomic_dq")}. `block_ids`, `meta`, `block_meta` as in
    `attention_forward`; `variant`: one of BACKWARD_VARIANTS (None: BACKWARD_VARIANT).
    `only` ("dkdv" or "dq", split variant): launch the preprocess and that kernel alone, for timing
    the phases apart (the other gradients are left unwritten)."""
    variant = BACKWARD_VARIANT if variant is None else variant
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"variant must be one of {BACKWARD_VARIANTS}, got {variant!r}")
    atomic = variant == "atomic_dq"
    if only not in (None, "dkdv", "dq") or (only and atomic):
        raise ValueError(f"only must be None, 'dkdv' or 'dq' (split variant), got {only!r}")
    _check_dtype(q)
    blocks = _check_blocks(mask, block_ids)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    mask_id = MASK_IDS[mask]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cfgs = _resolve_configs(D, q.dtype, configs)
    q, k, v, out, do = (_last_dim_contiguous(x) for x in (q, k, v, out, do))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    S = cu_seqlens.shape[0] - 1
    BLOCK_D = block_d_for(D)
    num_n = triton.cdiv(int(max_seqlen), cfgs["dkdv"].block_n)
    num_m = triton.cdiv(int(max_seqlen), cfgs["dq"].block_m)
    counts = None
    if count_blocks:
        counts = {"dkdv": torch.zeros(num_n * Hkv * S, dtype=torch.int32, device=q.device),
                  "dq": torch.zeros(num_m * Hq * S, dtype=torch.int32, device=q.device)}
    if T == 0 or S == 0 or num_m == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), counts
    if mask_id == MASK_SHARED_PREFIX:
        prefix_end, seg_start, key_end = meta if meta is not None else shared_prefix_metadata(cu_seqlens, segment_ids)
    else:
        prefix_end = seg_start = key_end = cu_seqlens  # unused placeholders
    if blocks:
        blk_start, blk_end = block_meta if block_meta is not None else block_metadata(cu_seqlens, block_ids)
    else:
        block_ids = blk_start = blk_end = cu_seqlens  # unused placeholders
    delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    align_h = _heads_aligned(q, k, v, out, do, dq, dk, dv)
    _attn_bwd_preprocess[(triton.cdiv(T, PREPROCESS_BLOCK_T), Hq)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, BLOCK_T=PREPROCESS_BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4)
    c = cfgs["dkdv"]
    dq_acc = torch.zeros((T, Hq, D), dtype=torch.float32, device=q.device) if atomic else None
    (_attn_bwd_dkdv[(Hkv, S, num_n)] if only != "dq" else _skip_launch)(
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, key_end, block_ids, blk_start,
        counts["dkdv"] if counts is not None else cu_seqlens, dq_acc if atomic else delta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        dq_acc.stride(0) if atomic else 0, dq_acc.stride(1) if atomic else 0,
        T, scale * LOG2E, scale,
        HEAD_DIM=D, GROUP=Hq // Hkv, MASK=mask_id, BLOCKS=blocks, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_D=BLOCK_D,
        IEEE=q.dtype == torch.float32, COUNT=count_blocks, ALIGN_H=align_h, ATOMIC_DQ=atomic,
        num_warps=c.num_warps, num_stages=c.num_stages)
    if atomic:
        torch.mul(dq_acc, scale, out=dq_acc)
        return dq.copy_(dq_acc), dk, dv, counts
    c = cfgs["dq"]
    (_attn_bwd_dq[(Hq, S, num_m)] if only != "dkdv" else _skip_launch)(
        q, k, v, do, lse, delta, dq, cu_seqlens, prefix_end, seg_start, block_ids, blk_end,
        counts["dq"] if counts is not None else cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        T, scale * LOG2E, scale,
        HEAD_DIM=D, GROUP=Hq // Hkv, MASK=mask_id, BLOCKS=blocks, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_D=BLOCK_D,
        IEEE=q.dtype == torch.float32, COUNT=count_blocks, ALIGN_H=align_h, num_warps=c.num_warps,
        num_stages=c.num_stages)
    return dq, dk, dv, counts


def _skip_launch(*args, **kwargs):
    """Stands in for a kernel launch that `only=` leaves out."""


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (kernels/aot.py)
# --------------------------------------------------------------------------------------------
def _aot_divisibility(kernel, signature, head_dim):
    """The `tt.divisibility = 16` hints a runtime launch gets on contiguous [T, H, D] tensors
    (Triton specialises pointers and integer arguments that are multiples of 16): every pointer,
    the token strides (H * D), and the head strides (D) when D % 16 == 0 (D = 72 and 80 rely on
    the kernels' own ALIGN_H hint instead). Without them the AOT build would not vectorise the
    loads nor pipeline them with cp.async, unlike the real launch.
    Keys are argument-index tuples, the form triton.compiler.ASTSource takes."""
    attrs = {}
    for name, ty in signature.items():
        hinted = ty.startswith("*") or name.endswith("t") and name.startswith("stride_")
        hinted = hinted or (name.startswith("stride_") and name.endswith("h") and head_dim % 16 == 0)
        if hinted:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def _aot_specs():
    dt = "*bf16"
    specs = []
    fwd_sig = {"Q": dt, "K": dt, "V": dt, "O": dt, "LSE": "*fp32", "CU_SEQLENS": "*i32", "PREFIX_END": "*i32",
               "SEG_START": "*i32", "BLOCK_IDS": "*i32", "BLK_END": "*i32", "COUNTS": "*i32"}
    fwd_sig.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                       "stride_ot", "stride_oh", "T")})
    fwd_sig["qk_scale"] = "fp32"
    fwd_sig.update({n: "constexpr" for n in ("HEAD_DIM", "GROUP", "MASK", "BLOCKS", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                             "IEEE", "COUNT", "ALIGN_H")})
    pre_sig = {"O": dt, "DO": dt, "DELTA": "*fp32", "stride_ot": "i32", "stride_oh": "i32", "stride_dot": "i32",
               "stride_doh": "i32", "T": "i32", "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr",
               "BLOCK_D": "constexpr"}
    dkdv_sig = {"Q": dt, "K": dt, "V": dt, "DO": dt, "LSE": "*fp32", "DELTA": "*fp32", "DK": dt, "DV": dt,
                "CU_SEQLENS": "*i32", "KEY_END": "*i32", "BLOCK_IDS": "*i32", "BLK_START": "*i32", "COUNTS": "*i32",
                "DQ_ACC": "*fp32"}
    dkdv_sig.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                        "stride_vh", "stride_dot", "stride_doh", "stride_dkt", "stride_dkh",
                                        "stride_dvt", "stride_dvh", "stride_dqat", "stride_dqah", "T")})
    dkdv_sig.update({"qk_scale": "fp32", "sm_scale": "fp32"})
    dkdv_sig.update({n: "constexpr" for n in ("HEAD_DIM", "GROUP", "MASK", "BLOCKS", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                              "IEEE", "COUNT", "ALIGN_H", "ATOMIC_DQ")})
    dq_sig = {"Q": dt, "K": dt, "V": dt, "DO": dt, "LSE": "*fp32", "DELTA": "*fp32", "DQ": dt,
              "CU_SEQLENS": "*i32", "PREFIX_END": "*i32", "SEG_START": "*i32", "BLOCK_IDS": "*i32", "BLK_END": "*i32",
              "COUNTS": "*i32"}
    dq_sig.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                      "stride_vh", "stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "T")})
    dq_sig.update({"qk_scale": "fp32", "sm_scale": "fp32"})
    dq_sig.update({n: "constexpr" for n in ("HEAD_DIM", "GROUP", "MASK", "BLOCKS", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                            "IEEE", "COUNT", "ALIGN_H")})
    # head dim 128 (Qwen-VL text towers, GQA 4) and 64 (small models): every kernel, every mask.
    # 80 and 72 (Qwen2/2.5-VL and Qwen3-VL vision towers: bidirectional, no GQA, frozen under LoRA
    # so forward only) exercise the masked-d path with BLOCK_D = 128.
    # Bidirectional blocks (BLOCKS, Molmo2's image / video tokens) over causal and shared_prefix:
    # every kernel at head dim 128 and 64 (Molmo2's text towers are Qwen3's: D = 128, GQA 4).
    cases = [(128, 4, m, False, ("fwd", "dkdv", "dq")) for m in MASK_IDS]
    cases += [(64, 4, m, False, ("fwd", "dkdv", "dq")) for m in MASK_IDS]
    cases += [(80, 1, "bidirectional", False, ("fwd",)), (72, 1, "bidirectional", False, ("fwd",))]
    cases += [(d, 4, m, True, ("fwd", "dkdv", "dq")) for d in (128, 64) for m in ("causal", "shared_prefix")]
    # the "atomic_dq" backward variant (dK/dV with flash-attention-2's dQ atomics) at head dim 128
    cases += [(128, 4, m, False, ("dkdv_atomic_dq",)) for m in MASK_IDS]
    for head_dim, group, mask, blocks, which in cases:
        cfgs = choose_configs(head_dim, torch.bfloat16)
        bd = block_d_for(head_dim)
        common = {"HEAD_DIM": head_dim, "GROUP": group, "MASK": MASK_IDS[mask], "BLOCKS": blocks, "BLOCK_D": bd,
                  "IEEE": False, "COUNT": False, "ALIGN_H": head_dim % 8 == 0}
        variant = f"{mask}_blocks" if blocks else mask
        for name, kernel, sig in (("fwd", _attn_fwd, fwd_sig), ("dkdv", _attn_bwd_dkdv, dkdv_sig),
                                  ("dkdv_atomic_dq", _attn_bwd_dkdv, dkdv_sig), ("dq", _attn_bwd_dq, dq_sig)):
            if name not in which:
                continue
            c = cfgs[name.split("_")[0]]
            extra = {"ATOMIC_DQ": name == "dkdv_atomic_dq"} if kernel is _attn_bwd_dkdv else {}
            specs.append({"name": f"{name}_{variant}_d{head_dim}_g{group}_bf16", "kernel": kernel, "signature": sig,
                          "constexprs": dict(common, BLOCK_M=c.block_m, BLOCK_N=c.block_n, **extra),
                          "attrs": _aot_divisibility(kernel, sig, head_dim),
                          "num_warps": c.num_warps, "num_stages": c.num_stages})
    for head_dim in (64, 128, 80):
        specs.append({"name": f"bwd_preprocess_d{head_dim}_bf16", "kernel": _attn_bwd_preprocess,
                      "signature": pre_sig,
                      "constexprs": {"HEAD_DIM": head_dim, "BLOCK_T": PREPROCESS_BLOCK_T,
                                     "BLOCK_D": block_d_for(head_dim)},
                      "attrs": _aot_divisibility(_attn_bwd_preprocess, pre_sig, head_dim),
                      "num_warps": 4, "num_stages": 1})
    return specs


AOT_SPECS = _aot_specs()
