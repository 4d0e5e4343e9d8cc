"""gather_value_head in Triton: the gather of the M score rows fused into the value head's GEMMs.

    y[m] = scale * (act(hidden[positions[m]] @ w1.T + b1) @ w2.T + b2)          -> [M]

hidden [T, H] (the backbone's last hidden state over a packed stream), positions int64 [M],
w1 [D, H], b1 [D], w2 [1, D], b2 [1] (nn.Linear layouts).

Forward, two launches and no [M, H] copy:
  1. `_vh_fwd_kernel`, grid (M blocks, D blocks), K loop over H: loads the rows of hidden by index
     straight into the GEMM tiles, z = rows @ w1.T + b1 (kept in fp32 for the backward), and in the
     epilogue the activation and the dot with w2, giving one partial sum per (row, D block).
     With `fwd_split_k` = s > 1 the grid is (M blocks, D blocks, s): each program sums 1/s of the
     K loop into an fp32 [s, M, D] buffer and `_vh_fwd_split_epilogue_kernel` (one launch more)
     adds the splits in a fixed order before the epilogue: at M = 64 the plain grid is 1 x 32
     programs for 132 SMs streaming w1; s = 4 gives 128.
  2. `_vh_fwd_reduce_kernel`, one program: sums the partials in a fixed order (deterministic, no
     atomics), adds b2, scales, casts. When the hidden-state gradient will be needed it also detects
     repeated positions on the device (no host sync) and leaves the count for the backward.
Backward, two launches: a zero-fill of the [T, H] gradient (the only touch of the other T - M
rows), then `_vh_bwd_kernel`, whose programs are of two kinds:
  * (D block, H block): dW1 = dz.T @ hidden[positions] (K dimension = M, rows loaded by index);
    the programs with H block 0 also reduce db1, dw2 and db2 over M, in a fixed order.
  * (M block, H block): grad rows = dz @ W1, written into the gathered rows of the gradient with
    plain stores, or with atomic adds when the forward found repeated positions.
dz = scale * grad_out * w2 * act'(z) is recomputed from the stored z in both (elementwise, cheap).

Dtypes: hidden and the weights may each be fp32, fp16 or bf16 (a bf16 backbone with an fp32 head is
common). Equal 16-bit dtypes go to the tensor cores as they are; otherwise both operands are taken in
fp32 and multiplied with 3xTF32 (about fp32 accuracy; plain TF32 when
torch.backends.cuda.matmul.allow_tf32 is set). Accumulation is fp32; the output has
torch.promote_types(hidden.dtype, w1.dtype); each gradient has its input's dtype. fp64 inputs go to
the pure-torch reference (the kernels accumulate in fp32).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out). tanh goes through the sigmoid: libdevice.tanh fails in the
# Triton interpreter, and 2 * sigmoid(2z) - 1 is exact to fp32 rounding.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        a = z * tl.sigmoid(z)
    elif ACTIVATION == "gelu":  # exact (erf) GELU
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == "relu":
        a = tl.maximum(z, 0.0)
    elif ACTIVATION == "selu":
        a = tl.where(z > 0.0, 1.0507009873554805 * z, 1.7580993408473766 * (tl.exp(z) - 1.0))
    else:  # tanh
        a = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return a


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz, with torch's conventions at the kinks (relu'(0) = 0, selu'(0) = lambda*alpha)."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        g = cdf + z * pdf
    elif ACTIVATION == "relu":
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == "selu":
        g = tl.where(z > 0.0, 1.0507009873554805, 1.7580993408473766 * tl.exp(z))
    else:  # tanh
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        g = 1.0 - t * t
    return g


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += a @ b. DOT_FP32: both operands in fp32 (the inputs' dtypes differ, or are fp32); else
    b holds the inputs' common 16-bit dtype and a (the input tile, or dz in fp32) is cast to it."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _vh_fwd_epilogue(acc, offs_m, offs_d, mask_m, mask_d, pid_d, b1_ptr, w2_ptr, z_ptr, partial_ptr, M, D,
                     ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr):
    """z = acc + b1 (stored for the backward when STORE_Z); one partial of act(z) . w2 per row."""
    b1 = tl.load(b1_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    z = acc + b1[None, :]
    if STORE_Z:
        tl.store(z_ptr + offs_m[:, None] * D + offs_d[None, :], z, mask=mask_m[:, None] & mask_d[None, :])
    # Columns past D have w2 = 0 and add nothing.
    part = tl.sum(_activation(z, ACTIVATION) * w2[None, :], axis=1)
    tl.store(partial_ptr + pid_d * M + offs_m, part, mask=mask_m)


@triton.jit
def _vh_fwd_kernel(hidden_ptr, pos_ptr, w1_ptr, b1_ptr, w2_ptr, z_ptr, partial_ptr, zsplit_ptr,
                   M, H, D, stride_hidden, K_PER_SPLIT,
                   ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   STORE_Z: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (M blocks, D blocks, SPLIT_K). SPLIT_K == 1: the whole K loop and the epilogue. SPLIT_K > 1
    (more programs than M x D blocks alone give: w1 streamed by more SMs): program s sums the K range
    [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT) into zsplit[s] (fp32 [SPLIT_K, M, D]); the epilogue
    runs in _vh_fwd_split_epilogue_kernel, which adds the splits in a fixed order (deterministic)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_d = offs_d < D
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(H, k_lo + K_PER_SPLIT)
    # Rows past M read row 0 of hidden instead of being masked (simpler K-loop masks); every load
    # stays in bounds and those rows' results are never stored.
    rows = tl.load(pos_ptr + offs_m, mask=mask_m, other=0)  # int64: row offsets cannot overflow
    a_ptrs = hidden_ptr + rows[:, None] * stride_hidden + k_lo + offs_k[None, :]
    b_ptrs = w1_ptr + offs_d[None, :] * H + k_lo + offs_k[:, None]  # w1.T tile [BLOCK_K, BLOCK_D]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_FP32, DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SPLIT_K == 1:
        _vh_fwd_epilogue(acc, offs_m, offs_d, mask_m, mask_d, pid_d, b1_ptr, w2_ptr, z_ptr, partial_ptr, M, D,
                         ACTIVATION, STORE_Z)
    else:
        tl.store(zsplit_ptr + (pid_k * M + offs_m[:, None]) * D + offs_d[None, :], acc,
                 mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _vh_fwd_split_epilogue_kernel(zsplit_ptr, b1_ptr, w2_ptr, z_ptr, partial_ptr, M, D,
                                  ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, SPLIT_K: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (M blocks, D blocks): the SPLIT_K partial sums of z added in split order, then the epilogue."""
    pid_d = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(zsplit_ptr + (s * M + offs_m[:, None]) * D + offs_d[None, :],
                       mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    _vh_fwd_epilogue(acc, offs_m, offs_d, mask_m, mask_d, pid_d, b1_ptr, w2_ptr, z_ptr, partial_ptr, M, D,
                     ACTIVATION, STORE_Z)


@triton.jit
def _vh_fwd_reduce_kernel(partial_ptr, b2_ptr, out_ptr, pos_ptr, owner_ptr, repeats_ptr,
                          M, N_PARTIAL, scale,
                          DETECT_REPEATS: tl.constexpr, BLOCK: tl.constexpr):
    """One program. out = scale * (sum of the N_PARTIAL partials + b2), summed in a fixed order.

    DETECT_REPEATS: every m writes its index into owner[positions[m]] (owner is scratch of T int32,
    uninitialised: each slot read is written first), then, after a CTA barrier, reads it back. With
    unique positions every m reads its own index; a position held by k > 1 entries is read back as
    another entry's index by k - 1 of them. repeats[0] = number of such entries (0 = unique)."""
    b2 = tl.load(b2_ptr).to(tl.float32)
    for m0 in range(0, M, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        mask = offs < M
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, N_PARTIAL):
            acc += tl.load(partial_ptr + j * M + offs, mask=mask, other=0.0)
        y = scale * (acc + b2)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if DETECT_REPEATS:
        for m0 in range(0, M, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            mask = offs < M
            pos = tl.load(pos_ptr + offs, mask=mask, other=0)
            tl.store(owner_ptr + pos, offs, mask=mask)
        tl.debug_barrier()  # every store of the CTA is visible to every thread after this
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        for m0 in range(0, M, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            mask = offs < M
            pos = tl.load(pos_ptr + offs, mask=mask, other=0)
            owner = tl.load(owner_ptr + pos, mask=mask, other=0, volatile=True)
            count += (mask & (owner != offs)).to(tl.int32)
        tl.store(repeats_ptr, tl.sum(count, axis=0))


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _vh_bwd_weights_tile(pid, hidden_ptr, pos_ptr, w2_ptr, z_ptr, gout_ptr,
                         gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,
                         M, H, D, stride_hidden, scale,
                         ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr):
    """dW1[d, h] = sum_m dz[m, d] * hidden[positions[m], h] for one (D block, H block) tile; the
    tiles of H block 0 also write db1 = sum_m dz, dw2 = sum_m dy * act(z), and tile (0, 0) db2."""
    n_h = tl.cdiv(H, BLOCK_H)
    pid_d = pid // n_h
    pid_h = pid % n_h
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_d = offs_d < D
    mask_h = offs_h < H
    w2 = tl.load(w2_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = tl.load(pos_ptr + offs_m, mask=mask_m, other=0)
        dy = scale * tl.load(gout_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        # z.T tile [BLOCK_D, BLOCK_M]; masked entries give z = 0, dy = 0 or w2 = 0, so dz = 0.
        zt = tl.load(z_ptr + offs_m[None, :] * D + offs_d[:, None],
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)
        dzt = dy[None, :] * w2[:, None] * _activation_grad(zt, ACTIVATION)
        x = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_h[None, :],
                    mask=mask_m[:, None] & mask_h[None, :], other=0.0)
        acc = _mma(dzt, x, acc, DOT_FP32, DOT_PRECISION)
        db1 += tl.sum(dzt, axis=1)
        dw2 += tl.sum(dy[None, :] * _activation(zt, ACTIVATION), axis=1)
        db2 += dy
    tl.store(gw1_ptr + offs_d[:, None] * H + offs_h[None, :], acc.to(gw1_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_h[None, :])
    if pid_h == 0:
        tl.store(gb1_ptr + offs_d, db1.to(gb1_ptr.dtype.element_ty), mask=mask_d)
        tl.store(gw2_ptr + offs_d, dw2.to(gw2_ptr.dtype.element_ty), mask=mask_d)
        if pid_d == 0:
            tl.store(gb2_ptr, tl.sum(db2, axis=0).to(gb2_ptr.dtype.element_ty))


@triton.jit
def _vh_bwd_hidden_tile(pid, pos_ptr, w1_ptr, w2_ptr, z_ptr, gout_ptr, repeats_ptr, ghidden_ptr,
                        M, H, D, scale,
                        ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_hidden[positions[m], h] (+)= sum_d dz[m, d] * w1[d, h] for one (M block, H block) tile.
    The gradient is contiguous [T, H] and zero-filled by the launcher."""
    n_h = tl.cdiv(H, BLOCK_H)
    pid_m = pid // n_h
    pid_h = pid % n_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    mask_h = offs_h < H
    rows = tl.load(pos_ptr + offs_m, mask=mask_m, other=0)
    dy = scale * tl.load(gout_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        z = tl.load(z_ptr + offs_m[:, None] * D + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w2 = tl.load(w2_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dz = dy[:, None] * w2[None, :] * _activation_grad(z, ACTIVATION)
        w1 = tl.load(w1_ptr + offs_d[:, None] * H + offs_h[None, :],
                     mask=mask_d[:, None] & mask_h[None, :], other=0.0)
        acc = _mma(dz, w1, acc, DOT_FP32, DOT_PRECISION)
    g = acc.to(ghidden_ptr.dtype.element_ty)
    ptrs = ghidden_ptr + rows[:, None] * H + offs_h[None, :]
    mask = mask_m[:, None] & mask_h[None, :]
    n_repeats = tl.load(repeats_ptr)
    if n_repeats != 0:
        tl.atomic_add(ptrs, g, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, g, mask=mask)


@triton.jit
def _vh_bwd_kernel(hidden_ptr, pos_ptr, w1_ptr, w2_ptr, z_ptr, gout_ptr, repeats_ptr,
                   ghidden_ptr, gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,
                   M, H, D, stride_hidden, scale, n_weight_programs,
                   ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   COMPUTE_WEIGHTS: tl.constexpr, COMPUTE_HIDDEN: tl.constexpr,
                   DW_BLOCK_D: tl.constexpr, DW_BLOCK_H: tl.constexpr, DW_BLOCK_M: tl.constexpr,
                   DH_BLOCK_M: tl.constexpr, DH_BLOCK_H: tl.constexpr, DH_BLOCK_D: tl.constexpr):
    """Programs [0, n_weight_programs) compute the weight gradients, the rest the hidden-state
    gradient: one launch for both GEMMs, which run side by side."""
    pid = tl.program_id(0)
    if pid < n_weight_programs:
        if COMPUTE_WEIGHTS:
            _vh_bwd_weights_tile(pid, hidden_ptr, pos_ptr, w2_ptr, z_ptr, gout_ptr,
                                 gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, M, H, D, stride_hidden, scale,
                                 ACTIVATION, DOT_FP32, DOT_PRECISION, DW_BLOCK_D, DW_BLOCK_H, DW_BLOCK_M)
    else:
        if COMPUTE_HIDDEN:
            _vh_bwd_hidden_tile(pid - n_weight_programs, pos_ptr, w1_ptr, w2_ptr, z_ptr, gout_ptr,
                                repeats_ptr, ghidden_ptr, M, H, D, scale,
                                ACTIVATION, DOT_FP32, DOT_PRECISION, DH_BLOCK_M, DH_BLOCK_H, DH_BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Block configurations (no triton.autotune: it fails in the interpreter, and two shapes of M cover
# the use: a micro-batch scores tens to a few thousand responses)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ValueHeadConfig:
    fwd_block_m: int
    fwd_block_d: int
    fwd_block_k: int
    fwd_warps: int
    fwd_stages: int
    dw_block_d: int  # weight-gradient tiles: [dw_block_d, dw_block_h], K loop over M
    dw_block_h: int
    dw_block_m: int
    dh_block_m: int  # hidden-gradient tiles: [dh_block_m, dh_block_h], K loop over D
    dh_block_h: int
    dh_block_d: int
    bwd_warps: int
    bwd_stages: int
    reduce_block: int = 1024
    fwd_split_k: int = 1  # K (= H) splits of the forward GEMM: > 1 adds programs (and one launch)


# Chosen from sm_90 compiles (ptxas -v: no register spills, shared memory well under 227 KB) of
# the bf16-backbone specs below with fp32 and bf16 heads.
# M <= 64: one M block; narrow D and H tiles so that there are enough programs to stream w1
# (D x H, ~10 MB in fp32 for the paper's head, D = 1024, H = 2560) with many SMs.
CONFIG_SMALL_M = ValueHeadConfig(fwd_block_m=64, fwd_block_d=32, fwd_block_k=64, fwd_warps=4, fwd_stages=4,
                                 dw_block_d=64, dw_block_h=64, dw_block_m=64,
                                 dh_block_m=64, dh_block_h=32, dh_block_d=64, bwd_warps=4, bwd_stages=3)
CONFIG_LARGE_M = ValueHeadConfig(fwd_block_m=128, fwd_block_d=64, fwd_block_k=64, fwd_warps=8, fwd_stages=3,
                                 dw_block_d=128, dw_block_h=64, dw_block_m=64,
                                 dh_block_m=128, dh_block_h=64, dh_block_d=64, bwd_warps=8, bwd_stages=2)
GPU_CONFIGS = {"small_m": CONFIG_SMALL_M, "large_m": CONFIG_LARGE_M}


def choose_config(M: int) -> ValueHeadConfig:
    return CONFIG_SMALL_M if M <= 64 else CONFIG_LARGE_M


def _dot_fp32(hidden_dtype, weight_dtype) -> bool:
    return hidden_dtype != weight_dtype or hidden_dtype == torch.float32


def _dot_precision() -> str:
    """fp32 operands: 3xTF32 (fp32-accurate) unless the user allowed TF32 for torch matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def flatten_config(config: ValueHeadConfig | None) -> list[int] | None:
    """A ValueHeadConfig as the flat int list the custom op carries; None stays None (the table)."""
    return None if config is None else list(dataclasses.astuple(config))


def unflatten_config(flat: list[int] | None, M: int) -> ValueHeadConfig:
    return choose_config(M) if not flat else ValueHeadConfig(*flat)


def forward(hidden, positions, w1, b1, w2, b2, activation, scale, cfg, *, store_z, detect_repeats):
    """Forward launcher -> (out [M], z [M, D] fp32 ([0, D] unless store_z), repeats int32 [1])."""
    M, D = positions.shape[0], w1.shape[0]
    if M == 0:
        return (hidden.new_empty(0, dtype=torch.promote_types(hidden.dtype, w1.dtype)),
                hidden.new_empty((0, D), dtype=torch.float32), hidden.new_zeros(1, dtype=torch.int32))
    out, z, repeats = _forward(hidden, positions, w1, b1, w2, b2, activation, scale, cfg, store_z, detect_repeats)
    if not detect_repeats:
        repeats.fill_(1)  # unknown: a backward must assume repeated positions (atomic adds)
    return out, (z if store_z else hidden.new_empty((0, D), dtype=torch.float32)), repeats


def backward(grad_out, hidden, positions, w1, b1, w2, b2, z, repeats, activation, scale, cfg, need_hidden):
    """Backward launcher -> (g_hidden or None, g_w1, g_b1, g_w2, g_b2), each in its input's dtype."""
    if positions.shape[0] == 0:  # nothing gathered: every gradient is zero
        T, H = hidden.shape
        D = w1.shape[0]
        return (hidden.new_zeros(T, H) if need_hidden else None, w1.new_zeros(D, H), b1.new_zeros(D),
                w2.new_zeros(1, D), b2.new_zeros(1))
    return _backward(grad_out, hidden, positions, w1, w2, z, repeats, activation, scale, cfg, need_hidden, True,
                     b1.dtype, b2.dtype)


def _forward(hidden, positions, w1, b1, w2, b2, activation, scale, cfg, store_z, detect_repeats):
    T, H = hidden.shape
    M = positions.shape[0]
    D = w1.shape[0]
    dev = hidden.device
    out = torch.empty(M, device=dev, dtype=torch.promote_types(hidden.dtype, w1.dtype))
    n_m, n_d = triton.cdiv(M, cfg.fwd_block_m), triton.cdiv(D, cfg.fwd_block_d)
    partial = torch.empty((n_d, M), device=dev, dtype=torch.float32)
    z = torch.empty((M, D), device=dev, dtype=torch.float32) if store_z else partial
    # K splits: whole BLOCK_K steps each, no more splits than steps (every split has work)
    steps = triton.cdiv(H, cfg.fwd_block_k)
    split = max(1, min(cfg.fwd_split_k, steps))
    k_per_split = triton.cdiv(steps, split) * cfg.fwd_block_k
    split = triton.cdiv(H, k_per_split)
    zsplit = torch.empty((split, M, D), device=dev, dtype=torch.float32) if split > 1 else partial
    _vh_fwd_kernel[(n_m, n_d, split)](
        hidden, positions, w1, b1, w2, z, partial, zsplit, M, H, D, hidden.stride(0), k_per_split,
        ACTIVATION=activation, DOT_FP32=_dot_fp32(hidden.dtype, w1.dtype), DOT_PRECISION=_dot_precision(),
        STORE_Z=store_z, SPLIT_K=split, BLOCK_M=cfg.fwd_block_m, BLOCK_D=cfg.fwd_block_d,
        BLOCK_K=cfg.fwd_block_k, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    if split > 1:
        _vh_fwd_split_epilogue_kernel[(n_m, n_d)](
            zsplit, b1, w2, z, partial, M, D, ACTIVATION=activation, STORE_Z=store_z, SPLIT_K=split,
            BLOCK_M=cfg.fwd_block_m, BLOCK_D=cfg.fwd_block_d, num_warps=cfg.fwd_warps)
    repeats = torch.empty(1, device=dev, dtype=torch.int32)
    owner = torch.empty(T if detect_repeats else 1, device=dev, dtype=torch.int32)
    _vh_fwd_reduce_kernel[(1,)](
        partial, b2, out, positions, owner, repeats, M, n_d, float(scale),
        DETECT_REPEATS=detect_repeats, BLOCK=cfg.reduce_block, num_warps=4)
    return out, (z if store_z else None), repeats


def _backward(grad_out, hidden, positions, w1, w2, z, repeats, activation, scale, cfg,
              need_hidden, need_weights, b1_dtype, b2_dtype):
    T, H = hidden.shape
    M = positions.shape[0]
    D = w1.shape[0]
    dev = hidden.device
    g_hidden = torch.zeros((T, H), device=dev, dtype=hidden.dtype) if need_hidden else None
    if need_weights:
        g_w1 = torch.empty((D, H), device=dev, dtype=w1.dtype)
        g_b1 = torch.empty(D, device=dev, dtype=b1_dtype)
        g_w2 = torch.empty((1, D), device=dev, dtype=w2.dtype)
        g_b2 = torch.empty(1, device=dev, dtype=b2_dtype)
    else:
        g_w1 = g_b1 = g_w2 = g_b2 = None
    n_w = triton.cdiv(D, cfg.dw_block_d) * triton.cdiv(H, cfg.dw_block_h) if need_weights else 0
    n_h = triton.cdiv(M, cfg.dh_block_m) * triton.cdiv(H, cfg.dh_block_h) if need_hidden else 0
    dummy = z  # stands in for the outputs a launch does not compute (never written)
    _vh_bwd_kernel[(n_w + n_h,)](
        hidden, positions, w1, w2, z, grad_out, repeats,
        g_hidden if need_hidden else dummy, g_w1 if need_weights else dummy,
        g_b1 if need_weights else dummy, g_w2 if need_weights else dummy, g_b2 if need_weights else dummy,
        M, H, D, hidden.stride(0), float(scale), n_w,
        ACTIVATION=activation, DOT_FP32=_dot_fp32(hidden.dtype, w1.dtype), DOT_PRECISION=_dot_precision(),
        COMPUTE_WEIGHTS=need_weights, COMPUTE_HIDDEN=need_hidden,
        DW_BLOCK_D=cfg.dw_block_d, DW_BLOCK_H=cfg.dw_block_h, DW_BLOCK_M=cfg.dw_block_m,
        DH_BLOCK_M=cfg.dh_block_m, DH_BLOCK_H=cfg.dh_block_h, DH_BLOCK_D=cfg.dh_block_d,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    return g_hidden, g_w1, g_b1, g_w2, g_b2


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m mrrm.kernels.aot): a bf16 backbone with fp32 and with bf16
# heads, every activation, both GPU block configurations; not the full cross product.
# ----------------------------------------------------------------------------------------------
def _jit_attrs(kernel, signature):
    """The specialisation the JIT gives these arguments at the paper's shapes (H = 2560, D = 1024,
    torch allocations): pointers 16-byte aligned, H, D and the row stride divisible by 16. Without it
    no global load is 16-byte vectorised, nor pipelined with cp.async. `attrs` is ASTSource's
    argument of that name (a harness that ignores it compiles the unspecialised variant)."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
            if ty.startswith("*") or name in ("H", "D", "stride_hidden")}


def _fwd_spec(weight, activation, cfg_name, split_k=1):
    cfg = GPU_CONFIGS[cfg_name]
    w = {"fp32": "*fp32", "bf16": "*bf16"}[weight]
    spec = {
        "name": f"fwd[hidden=bf16,w={weight},{activation},{cfg_name}" + (f",split_k={split_k}]" if split_k > 1 else "]"),
        "kernel": _vh_fwd_kernel,
        "signature": {"hidden_ptr": "*bf16", "pos_ptr": "*i64", "w1_ptr": w, "b1_ptr": w, "w2_ptr": w,
                      "z_ptr": "*fp32", "partial_ptr": "*fp32", "zsplit_ptr": "*fp32", "M": "i32", "H": "i32",
                      "D": "i32", "stride_hidden": "i32", "K_PER_SPLIT": "i32", "ACTIVATION": "constexpr",
                      "DOT_FP32": "constexpr", "DOT_PRECISION": "constexpr", "STORE_Z": "constexpr",
                      "SPLIT_K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr"},
        "constexprs": {"ACTIVATION": activation, "DOT_FP32": weight == "fp32", "DOT_PRECISION": "tf32x3",
                       "STORE_Z": True, "SPLIT_K": split_k, "BLOCK_M": cfg.fwd_block_m, "BLOCK_D": cfg.fwd_block_d,
                       "BLOCK_K": cfg.fwd_block_k},
        "num_warps": cfg.fwd_warps, "num_stages": cfg.fwd_stages,
    }
    spec["attrs"] = _jit_attrs(spec["kernel"], spec["signature"])
    return spec


def _split_epilogue_spec(weight, activation, cfg_name, split_k):
    cfg = GPU_CONFIGS[cfg_name]
    w = {"fp32": "*fp32", "bf16": "*bf16"}[weight]
    spec = {
        "name": f"fwd_split_epilogue[w={weight},{activation},{cfg_name},split_k={split_k}]",
        "kernel": _vh_fwd_split_epilogue_kernel,
        "signature": {"zsplit_ptr": "*fp32", "b1_ptr": w, "w2_ptr": w, "z_ptr": "*fp32", "partial_ptr": "*fp32",
                      "M": "i32", "D": "i32", "ACTIVATION": "constexpr", "STORE_Z": "constexpr",
                      "SPLIT_K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        "constexprs": {"ACTIVATION": activation, "STORE_Z": True, "SPLIT_K": split_k, "BLOCK_M": cfg.fwd_block_m,
                       "BLOCK_D": cfg.fwd_block_d},
        "num_warps": cfg.fwd_warps, "num_stages": 1,
    }
    spec["attrs"] = _jit_attrs(spec["kernel"], spec["signature"])
    return spec


def _bwd_spec(weight, activation, cfg_name):
    cfg = GPU_CONFIGS[cfg_name]
    w = {"fp32": "*fp32", "bf16": "*bf16"}[weight]
    spec = {
        "name": f"bwd[hidden=bf16,w={weight},{activation},{cfg_name}]",
        "kernel": _vh_bwd_kernel,
        "signature": {"hidden_ptr": "*bf16", "pos_ptr": "*i64", "w1_ptr": w, "w2_ptr": w, "z_ptr": "*fp32",
                      "gout_ptr": "*fp32" if weight == "fp32" else "*bf16", "repeats_ptr": "*i32",
                      "ghidden_ptr": "*bf16", "gw1_ptr": w, "gb1_ptr": w, "gw2_ptr": w, "gb2_ptr": w,
                      "M": "i32", "H": "i32", "D": "i32", "stride_hidden": "i32", "scale": "fp32",
                      "n_weight_programs": "i32",
                      "ACTIVATION": "constexpr", "DOT_FP32": "constexpr", "DOT_PRECISION": "constexpr",
                      "COMPUTE_WEIGHTS": "constexpr", "COMPUTE_HIDDEN": "constexpr",
                      "DW_BLOCK_D": "constexpr", "DW_BLOCK_H": "constexpr", "DW_BLOCK_M": "constexpr",
                      "DH_BLOCK_M": "constexpr", "DH_BLOCK_H": "constexpr", "DH_BLOCK_D": "constexpr"},
        "constexprs": {"ACTIVATION": activation, "DOT_FP32": weight == "fp32", "DOT_PRECISION": "tf32x3",
                       "COMPUTE_WEIGHTS": True, "COMPUTE_HIDDEN": True,
                       "DW_BLOCK_D": cfg.dw_block_d, "DW_BLOCK_H": cfg.dw_block_h, "DW_BLOCK_M": cfg.dw_block_m,
                       "DH_BLOCK_M": cfg.dh_block_m, "DH_BLOCK_H": cfg.dh_block_h, "DH_BLOCK_D": cfg.dh_block_d},
        "num_warps": cfg.bwd_warps, "num_stages": cfg.bwd_stages,
    }
    spec["attrs"] = _jit_attrs(spec["kernel"], spec["signature"])
    return spec


def _reduce_spec(out):
    spec = {
        "name": f"fwd_reduce[out={out}]",
        "kernel": _vh_fwd_reduce_kernel,
        "signature": {"partial_ptr": "*fp32", "b2_ptr": f"*{out}", "out_ptr": f"*{out}", "pos_ptr": "*i64",
                      "owner_ptr": "*i32", "repeats_ptr": "*i32", "M": "i32", "N_PARTIAL": "i32",
                      "scale": "fp32", "DETECT_REPEATS": "constexpr", "BLOCK": "constexpr"},
        "constexprs": {"DETECT_REPEATS": True, "BLOCK": CONFIG_SMALL_M.reduce_block},
        "num_warps": 4, "num_stages": 1,
    }
    spec["attrs"] = _jit_attrs(spec["kernel"], spec["signature"])
    return spec


# (weights dtype, activation, config): silu with both dtypes and both configs, each other
# activation once, alternating dtype and config.
_AOT_CASES = (("fp32", "silu", "small_m"), ("bf16", "silu", "small_m"), ("fp32", "silu", "large_m"),
              ("bf16", "silu", "large_m"), ("fp32", "gelu", "small_m"), ("bf16", "relu", "small_m"),
              ("fp32", "selu", "large_m"), ("bf16", "tanh", "large_m"))
# the split-K forward (more programs for small M; the GPU check sweeps fwd_split_k) and its epilogue
_SPLIT_CASES = (("fp32", "silu", "small_m", 4), ("bf16", "silu", "small_m", 8))
AOT_SPECS = ([_fwd_spec(*c) for c in _AOT_CASES] + [_bwd_spec(*c) for c in _AOT_CASES]
             + [_fwd_spec(*c) for c in _SPLIT_CASES] + [_split_epilogue_spec(*c) for c in _SPLIT_CASES]
             + [_reduce_spec("fp32"), _reduce_spec("bf16")])
