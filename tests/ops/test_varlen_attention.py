"""varlen_attention: every backend against the pure-torch reference, values and gradients.

CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) in fp32 with 16 x 16
blocks, so that small ragged problems still cross many block boundaries; with a GPU the same tests
run the compiled kernels on CUDA tensors (fp32 with IEEE dots), and the `gpu` tests add bf16 runs
with the production block table.

Tolerances: fp32 backends vs the fp32 reference: atol = rtol = 5e-5 (observed ~2e-6; a masking
or indexing bug shows up as O(0.1)). bf16 on the GPU vs the fp32 reference: max |err| <= 2e-2 for
the output and <= 2e-2 * max|ref| for each gradient (bf16 carries ~8 bits; errors seen in
flash-attention's own tests are of that order).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import mrrm.kernels.varlen_attention as va
from mrrm.ops import oracle, varlen_attention
from mrrm.ops.varlen_attention import varlen_attention_triton

# the op module (the package attribute of the same name is the function, as for listwise_ce)
attention_ops = importlib.import_module("mrrm.ops.varlen_attention")

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL = va.uniform_configs(16)
ATOL = RTOL = 5e-5


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def make_layout(samples, device="cpu"):
    """samples: list of (prefix_len, [response lengths]). Returns (cu_seqlens, segment_ids, lengths)
    for the packed `independent` (shared_prefix) layout: one sequence per sample, the prefix
    (segment 0) followed by responses 1..N."""
    lengths, seg = [], []
    for prefix, responses in samples:
        seg += [0] * prefix
        for r, n in enumerate(responses, start=1):
            seg += [r] * n
        lengths.append(prefix + sum(responses))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return cu, torch.tensor(seg, dtype=torch.int32, device=device), lengths


# Ragged on purpose (block = 16): prefixes shorter and longer than a block (5, 40), a response of
# one token, blocks holding several responses, a 1-token sequence, an empty sequence, a sequence
# without prefix, one without responses, lengths that are no multiple of 16.
RAGGED = [(5, [7, 1, 20]), (40, [3, 18]), (1, []), (0, []), (0, [9, 12]), (17, [33]), (21, [])]


def rand_qkv(T, Hq, Hkv, D, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(1234 + T + 7 * Hq + 13 * D)
    q, k, v = (torch.randn(T, H, D, generator=g) * scale for H in (Hq, Hkv, Hkv))
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (q, k, v))


def fwd_bwd(fn, q, k, v, do):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), grads


def assert_close(got, want, atol=ATOL, rtol=RTOL, what=""):
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3g}"


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 tiles for calls that go through the public op (which passes no configs)."""
    monkeypatch.setattr(va, "CONFIG_OVERRIDE", SMALL)


# --------------------------------------------------------------------------------------------
# every backend vs the reference, forward and backward
# --------------------------------------------------------------------------------------------
# (Hq, Hkv, D): GQA 1, 4 (one kv head), 4 (two kv heads), 1; D 72 and 40 pad to 128 and 64
SHAPES = [(2, 2, 72), (4, 1, 40), (8, 2, 16), (4, 4, 32)]


# the last shape runs shared_prefix only on triton: the interpreter costs per program instance
BACKEND_CASES = [(b, m, s) for b in ("torch", "cpu", "triton") for m in ("causal", "bidirectional", "shared_prefix")
                 for s in SHAPES if not (b == "triton" and s == SHAPES[-1] and m != "shared_prefix")]


@pytest.mark.parametrize("backend, mask, shape", BACKEND_CASES,
                         ids=[f"{b}-{m}-hq{s[0]}-hkv{s[1]}-d{s[2]}" for b, m, s in BACKEND_CASES])
def test_backend_matches_reference(backend, mask, shape, small_blocks):
    Hq, Hkv, D = shape
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cu, seg, lengths = make_layout(RAGGED, device)
    T = int(cu[-1])
    q, k, v = rand_qkv(T, Hq, Hkv, D, device=device)
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(5)).to(device)
    seg_arg = seg if mask == "shared_prefix" else None
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg_arg,
                                                          backend=backend), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg_arg), q, k, v, do)
    assert out.shape == (T, Hq, D) and out.dtype == q.dtype
    assert_close(out, ref_out, what=f"{backend} out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g, rg, what=f"{backend} d{name}")


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_cpu_buckets_of_equal_and_padded_lengths(mask):
    """The CPU backend batches similar-length sequences into one padded SDPA call: a vision-like
    stream (many equal-length images, a few longer videos, lengths just inside and outside a
    bucket) matches the reference in values and gradients, and no bucket is over 1/4 padding."""
    lengths = [16] * 9 + [64, 64, 52, 51, 3, 1]
    buckets = attention_ops._length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        longest = max(lengths[i] for i in b)
        assert sum(lengths[i] for i in b) >= 0.75 * longest * len(b)
    # 52 >= 0.8 * 64 joins the 64s, 51 does not; 16 x 9 share a bucket without padding
    assert sorted(sorted(lengths[i] for i in b) for b in buckets) == [[1], [3], [16] * 9, [51], [52, 64, 64]]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = rand_qkv(T, 4, 2, 24)
    do = torch.randn(T, 4, 24, generator=torch.Generator().manual_seed(9))
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, 64, mask=mask, backend="cpu"), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, 64, mask=mask), q, k, v, do)
    assert_close(out, ref_out, what="cpu out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, what=f"cpu d{name}")


def test_reference_mask_rule():
    """The oracle itself: shared_prefix visibility is `same sequence, j <= i, seg[j] in (0, seg[i])`."""
    cu, seg, _ = make_layout([(3, [2, 2])])
    vis = oracle.attention_mask_dense(0, 7, "shared_prefix", seg)
    for i in range(7):
        for j in range(7):
            assert bool(vis[i, j]) == (j <= i and (int(seg[j]) == 0 or int(seg[j]) == int(seg[i])))


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
def test_triton_multi_block_tiles(mask):
    """Rectangular tiles (fwd / dq 32 x 16, dkdv 16 x 32) and a softmax scale: the diagonal and the
    unaligned response starts fall inside blocks in other places than with square tiles."""
    cfg = {"fwd": va.KernelConfig(32, 16), "dkdv": va.KernelConfig(16, 32), "dq": va.KernelConfig(32, 16)}
    cu, seg, lengths = make_layout([(19, [14, 1, 37]), (33, [2, 29]), (2, [1])], TRITON_DEVICE)
    T = int(cu[-1])
    q, k, v = rand_qkv(T, 4, 2, 32, device=TRITON_DEVICE)
    do = torch.randn(T, 4, 32).to(TRITON_DEVICE)
    seg_arg = seg if mask == "shared_prefix" else None
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention_triton(a, b, c, cu, max(lengths), mask=mask,
                                                                    segment_ids=seg_arg, softmax_scale=0.3,
                                                                    configs=cfg), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg_arg, softmax_scale=0.3),
                                 q, k, v, do)
    assert_close(out, ref_out, what="out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, what=f"d{name}")


@pytest.mark.slow
def test_triton_strided_inputs_and_fp16():
    """q, k, v as views into one fused qkv projection (token stride != H * D), and fp16 inputs
    (fp32 accumulation; compared with the fp32 reference at fp16 tolerances)."""
    cu, seg, lengths = make_layout([(11, [6, 23]), (30, [1, 4])], TRITON_DEVICE)
    T, Hq, Hkv, D = int(cu[-1]), 4, 2, 32
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE)
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(4)).to(TRITON_DEVICE)
    for dtype, tol in ((torch.float32, ATOL), (torch.float16, 5e-3)):
        fused = qkv.to(dtype).requires_grad_(True)
        q, k, v = fused[:, :Hq], fused[:, Hq:Hq + Hkv], fused[:, Hq + Hkv:]
        assert q.stride(0) == (Hq + 2 * Hkv) * D
        out = varlen_attention_triton(q, k, v, cu, max(lengths), mask="shared_prefix", segment_ids=seg,
                                         configs=SMALL)
        (g,) = torch.autograd.grad(out, fused, do.to(dtype))
        f32 = qkv.clone().requires_grad_(True)
        ref = oracle.varlen_attention(f32[:, :Hq], f32[:, Hq:Hq + Hkv], f32[:, Hq + Hkv:], cu, max(lengths),
                                         mask="shared_prefix", segment_ids=seg)
        (rg,) = torch.autograd.grad(ref, f32, do)
        assert out.dtype == dtype
        assert_close(out, ref, atol=tol, rtol=tol, what=f"{dtype} out")
        assert_close(g, rg, atol=4 * tol, rtol=4 * tol, what=f"{dtype} dqkv")


# --------------------------------------------------------------------------------------------
# the key equivalence: shared_prefix over `independent` == causal over each [prefix, r_i]
# --------------------------------------------------------------------------------------------
def single_pass_layout(samples, device):
    """Index map from the `single` layout (one sequence [prefix, r_i] per response) into the
    packed independent stream, its cu_seqlens, and a weight that keeps each prefix token's output
    once (the copy in the sample's first single sequence)."""
    index, weight, lengths, base = [], [], [], 0
    for prefix, responses in samples:
        starts = [base + prefix + sum(responses[:i]) for i in range(len(responses))]
        for i, (start, n) in enumerate(zip(starts, responses)):
            index += list(range(base, base + prefix)) + list(range(start, start + n))
            weight += [1.0 if i == 0 else 0.0] * prefix + [1.0] * n
            lengths.append(prefix + n)
        base += prefix + sum(responses)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return (torch.tensor(index, device=device), torch.tensor(weight, device=device), cu, max(lengths))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_shared_prefix_equals_separate_single_passes(backend, small_blocks):
    """Token for token: a response's output under shared_prefix equals its output in a causal pass
    over [prefix, response] alone, and so do the gradients (prefix k/v collect the sum over
    responses, which autograd forms through the index map)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    samples = [(21, [9, 1, 30, 16]), (40, [5, 17]), (3, [2])]
    cu, seg, lengths = make_layout(samples, device)
    T, Hq, Hkv, D = int(cu[-1]), 4, 2, 24
    q, k, v = rand_qkv(T, Hq, Hkv, D, device=device)
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(9)).to(device)
    idx, w, cu_single, max_single = single_pass_layout(samples, device)

    shared, g_shared = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask="shared_prefix",
                                                                segment_ids=seg, backend=backend), q, k, v, do)

    def singles(a, b, c):
        return varlen_attention(a[idx], b[idx], c[idx], cu_single, max_single, mask="causal", backend=backend)

    out_single = singles(q, k, v)
    g_single = torch.autograd.grad(out_single, (q, k, v), do[idx] * w[:, None, None])
    # every copy of every token (prefix copies included) matches the shared pass
    assert_close(out_single, shared[idx], what="outputs")
    for name, a, b in zip("qkv", g_shared, g_single):
        assert_close(a, b, what=f"d{name}")


# --------------------------------------------------------------------------------------------
# block skipping is real
# --------------------------------------------------------------------------------------------
def _cdiv(a, b):
    return -(-a // b) if a > 0 else 0


def _meta_lists(cu, seg):
    prefix_end, seg_start, key_end = va.shared_prefix_metadata(cu, seg)
    return prefix_end.tolist(), seg_start.tolist(), key_end.tolist()


def expected_query_side_counts(lengths, cu, seg, mask, BM, BN, blk=None):
    """Key blocks each (sequence, query block) program visits, from the ranges the module
    docstring specifies (mirror of `_query_key_ranges`; with block ids `blk`, the causal range
    runs to c_hi = max(min(P, m1), the rows' largest block-span end)), as a list per sequence."""
    P_all, ss_all, _ = _meta_lists(cu, seg) if mask == "shared_prefix" else (None, None, None)
    blk_end = va.block_metadata(cu, blk)[1].tolist() if blk is not None else None
    num_m = _cdiv(max(lengths), BM)
    out = []
    for s, L in enumerate(lengths):
        lo_tok = int(cu[s])
        row = []
        for pid in range(num_m):
            m0 = pid * BM
            if m0 >= L:
                row.append(0)
                continue
            m1 = min(m0 + BM, L)
            if mask == "bidirectional":
                body = L // BN * BN
                ranges = [(0, body), (body, L)]
            else:
                P = P_all[s] if mask == "shared_prefix" else L
                c_hi = min(P, m1)
                if blk_end is not None:
                    c_hi = max([c_hi] + blk_end[lo_tok + m0:lo_tok + m1])
                ranges = [(0, min(P, m0) // BN * BN), (min(P, m0) // BN * BN, c_hi)]
                if mask == "shared_prefix":
                    b0 = min(max(P, ss_all[lo_tok + m0]), m1)
                    u0 = min(max(P, ss_all[lo_tok + m1 - 1]), m1)
                    b_body = u0 + max(m0 - u0, 0) // BN * BN
                    ranges += [(b0, u0), (u0, b_body), (b_body, m1)]
            row.append(sum(_cdiv(hi - lo, BN) for lo, hi in ranges))
        out.append(row)
    return out


def expected_dkdv_counts(lengths, cu, seg, mask, BM, BN, group, blk=None):
    """Query blocks each dK/dV program visits (mirror of the kernel's ranges; with block ids `blk`
    the diagonal range starts at the keys' earliest block-span start, rounded down to BM)."""
    _, _, ke_all = _meta_lists(cu, seg) if mask == "shared_prefix" else (None, None, None)
    blk_start = va.block_metadata(cu, blk)[0].tolist() if blk is not None else None
    num_n = _cdiv(max(lengths), BN)
    out = []
    for s, L in enumerate(lengths):
        lo_tok = int(cu[s])
        row = []
        for pid in range(num_n):
            n0 = pid * BN
            if n0 >= L:
                row.append(0)
                continue
            n1 = min(n0 + BN, L)
            if mask == "bidirectional":
                body = L // BM * BM
                c = _cdiv(body, BM) + _cdiv(L - body, BM)
            else:
                ke = ke_all[lo_tok + n0:lo_tok + n1] if mask == "shared_prefix" else [L] * (n1 - n0)
                q_hi, e_min = max(ke), min(ke)
                body_lo = n0 + BN
                body = body_lo + max(e_min - body_lo, 0) // BM * BM
                d_lo = n0
                if blk_start is not None:
                    d_lo = min([n0] + blk_start[lo_tok + n0:lo_tok + n1]) // BM * BM
                c = (_cdiv(min(n0 + BN, q_hi) - d_lo, BM) + _cdiv(body - body_lo, BM)
                     + _cdiv(q_hi - max(body, body_lo), BM))
            row.append(c * group)
        out.append(row)
    return out


def kernel_counts(T, Hq, Hkv, cu, seg, lengths, mask, cfg, blk=None):
    """Visited-block counters from the kernels, reshaped to [S, heads, blocks] in block order."""
    q, k, v = (x.detach() for x in rand_qkv(T, Hq, Hkv, 16, device=TRITON_DEVICE))
    S = len(lengths)
    out, lse, c_fwd = va.attention_forward(q, k, v, cu, max(lengths), mask=mask, segment_ids=seg, block_ids=blk,
                                           configs=cfg, count_blocks=True)
    _, _, _, c_bwd = va.attention_backward(torch.ones_like(out), q, k, v, out, lse, cu, max(lengths), mask=mask,
                                           segment_ids=seg, block_ids=blk, configs=cfg, count_blocks=True)
    # the counters are stored in block order whatever order the grid issues the blocks in
    return (c_fwd.view(S, Hq, -1).cpu(), c_bwd["dq"].view(S, Hq, -1).cpu(), c_bwd["dkdv"].view(S, Hkv, -1).cpu())


@pytest.mark.slow
def test_shared_prefix_skips_key_blocks():
    """The kernels count the blocks their loops visit. shared_prefix visits far fewer than causal
    on the same stream; every count equals the documented ranges; and no query block visits more
    key blocks than the keys it can see (prefix + own response, as in the brief's formula) need,
    plus one for a possibly unaligned response start."""
    samples = [(16, [32] * 6), (10, [1, 40, 3]), (33, [17])]
    cu, seg, lengths = make_layout(samples, TRITON_DEVICE)
    T, Hq, Hkv, BM, BN = int(cu[-1]), 2, 1, 16, 16
    cfg = va.uniform_configs(BM, BN)
    totals = {}
    for mask in ("causal", "shared_prefix", "bidirectional"):
        fwd, dq, dkdv = kernel_counts(T, Hq, Hkv, cu, seg, lengths, mask, cfg)
        seg_arg = seg.cpu() if mask == "shared_prefix" else None
        want_q = torch.tensor(expected_query_side_counts(lengths, cu.cpu(), seg_arg, mask, BM, BN), dtype=torch.int32)
        want_kv = torch.tensor(expected_dkdv_counts(lengths, cu.cpu(), seg_arg, mask, BN, BM, Hq // Hkv),
                               dtype=torch.int32)
        assert torch.equal(fwd, want_q[:, None, :].expand_as(fwd)), mask
        assert torch.equal(dq, want_q[:, None, :].expand_as(dq)), mask
        assert torch.equal(dkdv, want_kv[:, None, :].expand_as(dkdv)), mask
        totals[mask] = (int(fwd.sum()), int(dkdv.sum()))
        if mask == "shared_prefix":
            shared_fwd = fwd
    # 1st sample: 208 tokens = 13 blocks; causal visits 91 key blocks per head, the prefix + own
    # response ranges about 3 per query block
    print("visited blocks (fwd, dkdv):", totals)
    assert totals["shared_prefix"][0] < 0.6 * totals["causal"][0], totals
    assert totals["shared_prefix"][1] < 0.6 * totals["causal"][1], totals
    assert totals["causal"][0] < 0.6 * totals["bidirectional"][0], totals

    # independent bound from the visibility rule: keys [0, min(P, m1)) and [max(P, g), m1)
    prefix_end, seg_start, _ = _meta_lists(cu.cpu(), seg.cpu())
    for s, L in enumerate(lengths):
        P = prefix_end[s]
        for b in range(_cdiv(L, BM)):
            m0, m1 = b * BM, min(b * BM + BM, L)
            g = seg_start[int(cu[s]) + m0]
            need = _cdiv(min(P, m1), BN) + _cdiv(m1 - max(P, g), BN)
            assert int(shared_fwd[s, 0, b]) <= need + 1, (s, b, int(shared_fwd[s, 0, b]), need)


# --------------------------------------------------------------------------------------------
# validation (the public op) and the launcher's own checks
# --------------------------------------------------------------------------------------------
def _inputs(T=10, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    q = torch.randn(T, Hq, D, dtype=dtype)
    k = torch.randn(T, Hkv, D, dtype=dtype)
    return q, k, k.clone(), torch.tensor([0, 4, T], dtype=torch.int32)


@pytest.mark.parametrize("case", ["k_dtype", "cu_dtype", "int_q", "gqa", "no_segments", "non_monotone",
                                  "max_seqlen", "segments_with_causal", "bad_mask", "cu_end"])
def test_bad_inputs_raise_value_error(case):
    q, k, v, cu = _inputs()
    kwargs = {"mask": "causal"}
    max_seqlen = 6
    if case == "k_dtype":
        k = k.double()
    elif case == "cu_dtype":
        cu = cu.long()
    elif case == "int_q":
        q = q.to(torch.int32)
    elif case == "gqa":
        q = torch.randn(10, 3, 16)
    elif case == "no_segments":
        kwargs = {"mask": "shared_prefix"}
    elif case == "non_monotone":
        # second sequence (tokens 4..9) steps down from response 2 to response 1
        seg = torch.tensor([0, 0, 1, 2, 0, 1, 1, 2, 1, 2], dtype=torch.int32)
        kwargs = {"mask": "shared_prefix", "segment_ids": seg}
    elif case == "max_seqlen":
        max_seqlen = 5
    elif case == "segments_with_causal":
        kwargs = {"mask": "causal", "segment_ids": torch.zeros(10, dtype=torch.int32)}
    elif case == "bad_mask":
        kwargs = {"mask": "sliding"}
    elif case == "cu_end":
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu, max_seqlen, **kwargs)


def test_segments_restarting_per_sequence_are_valid(small_blocks):
    """Segment ids may drop back at a sequence boundary (each sample restarts at 0)."""
    q, k, v, cu = _inputs()
    seg = torch.tensor([0, 0, 1, 2, 0, 0, 1, 1, 2, 2], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, 6, mask="shared_prefix", segment_ids=seg, backend="cpu")
    ref = oracle.varlen_attention(q, k, v, cu, 6, mask="shared_prefix", segment_ids=seg)
    assert_close(out, ref)


def test_launcher_rejects_float64_and_bad_configs():
    q, k, v, cu = _inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        varlen_attention_triton(q, k, v, cu, 6)
    with pytest.raises(ValueError):
        varlen_attention_triton(q.float(), k.float(), v.float(), cu, 6, configs={"fwd": va.KernelConfig(16, 32)})
    with pytest.raises(ValueError):
        varlen_attention_triton(q.float(), k.float(), v.float(), cu, 6, configs={"dkdv": va.KernelConfig(24, 24)})


def test_empty_stream():
    q, k, v = (torch.zeros(0, 2, 16, device=TRITON_DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    out = varlen_attention_triton(q, k, v, cu, 0)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_config_table_is_consistent():
    """Every head dim maps to valid tiles, and the AOT specs list each GPU config and mask."""
    for d in (16, 32, 40, 64, 72, 80, 96, 128, 256):
        cfgs = va._resolve_configs(d, torch.bfloat16, None)
        assert set(cfgs) == {"fwd", "dkdv", "dq"}
    names = {s["name"] for s in va.AOT_SPECS}
    for mask in va.MASK_IDS:
        for kernel in ("fwd", "dkdv", "dq"):
            for d in (64, 128):
                assert f"{kernel}_{mask}_d{d}_g4_bf16" in names
                if mask != "bidirectional":  # bidirectional blocks over causal and shared_prefix
                    spec = next(s for s in va.AOT_SPECS if s["name"] == f"{kernel}_{mask}_blocks_d{d}_g4_bf16")
                    assert spec["constexprs"]["BLOCKS"] is True
    assert all(s["constexprs"]["BLOCKS"] == ("_blocks_" in s["name"]) for s in va.AOT_SPECS
               if "BLOCKS" in s["constexprs"])
    for spec in va.AOT_SPECS:
        if "BLOCK_M" in spec["constexprs"]:
            kernel = spec["name"].split("_")[0]
            cfg = va.choose_configs(spec["constexprs"]["HEAD_DIM"])[kernel]
            assert (spec["constexprs"]["BLOCK_M"], spec["constexprs"]["BLOCK_N"], spec["num_warps"],
                    spec["num_stages"]) == (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert len(va.AOT_SPECS) < 40


# --------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_90 (no GPU needed)
# --------------------------------------------------------------------------------------------
def _has_cuda_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_backend(), reason="triton has no CUDA backend")
def test_aot_compiles_every_attention_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mrrm.kernels.aot", "--only", "varlen_attention"], env=env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for spec in va.AOT_SPECS:
        line = f"OK   varlen_attention.{spec['name']}:"
        assert line in log, f"{spec['name']} missing from the AOT log:\n{log[-4000:]}"
    mma_kernels = [s["name"] for s in va.AOT_SPECS if "preprocess" not in s["name"]]
    for name in mma_kernels:  # tensor-core code for every attention kernel on sm_90
        (line,) = [ln for ln in log.splitlines() if f"varlen_attention.{name}:" in ln]
        assert "wgmma" in line, line


# --------------------------------------------------------------------------------------------
# GPU: bf16 with the production block table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["causal", "bidirectional", "shared_prefix"])
@pytest.mark.parametrize("shape", [(8, 2, 128), (4, 1, 64), (4, 4, 80)], ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_low_precision_vs_fp32_reference(mask, shape, dtype):
    Hq, Hkv, D = shape
    samples = [(300, [120, 1, 257, 64]), (1000, [500]), (7, [3, 2]), (129, [])]
    cu, seg, lengths = make_layout(samples, "cuda")
    T = int(cu[-1])
    q, k, v = rand_qkv(T, Hq, Hkv, D, dtype=dtype, device="cuda")
    do = torch.randn(T, Hq, D, device="cuda", dtype=dtype)
    seg_arg = seg if mask == "shared_prefix" else None
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg_arg),
                         q, k, v, do)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                        segment_ids=seg_arg), q32, k32, v32, do.float())
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() <= 2e-2
    for name, g, rg in zip("qkv", grads, ref_grads):
        err = (g.float() - rg).abs().max().item()
        assert err <= 2e-2 * max(1.0, rg.abs().max().item()), f"d{name}: {err}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_backward_is_deterministic():
    cu, seg, lengths = make_layout([(200, [100, 150, 90]), (64, [700])], "cuda")
    T = int(cu[-1])
    q, k, v = rand_qkv(T, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    do = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16)
    runs = [fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask="shared_prefix",
                                                     segment_ids=seg, deterministic=True), q, k, v, do)
            for _ in range(2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_shared_prefix_metadata_is_cached_per_input_tensors():
    """The per-forward memo: the same (cu_seqlens, segment_ids) objects hit; an in-place edit or new
    tensors recompute, and the cached value always equals a fresh computation."""
    from mrrm.kernels.varlen_attention import cached_shared_prefix_metadata, shared_prefix_metadata

    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0, 0, 1, 2, 2], dtype=torch.int32)
    first = cached_shared_prefix_metadata(cu, seg)
    assert cached_shared_prefix_metadata(cu, seg) is first
    for got, want in zip(first, shared_prefix_metadata(cu, seg)):
        assert torch.equal(got, want)
    seg[4] = 2  # an in-place edit bumps the version: recomputed, and right
    edited = cached_shared_prefix_metadata(cu, seg)
    assert edited is not first
    for got, want in zip(edited, shared_prefix_metadata(cu, seg)):
        assert torch.equal(got, want)
    other = seg.clone()
    other[4] = 1
    for got, want in zip(cached_shared_prefix_metadata(cu, other), shared_prefix_metadata(cu, other)):
        assert torch.equal(got, want)


def test_shared_prefix_metadata_cache_takes_inference_tensors():
    from mrrm.kernels.varlen_attention import cached_shared_prefix_metadata, shared_prefix_metadata

    with torch.inference_mode():
        cu = torch.tensor([0, 5], dtype=torch.int32)
        seg = torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32)
        got = cached_shared_prefix_metadata(cu, seg)
        assert cached_shared_prefix_metadata(cu, seg) is got
        for g, w in zip(got, shared_prefix_metadata(cu, seg)):
            assert torch.equal(g, w)


# --------------------------------------------------------------------------------------------
# bidirectional blocks (block_ids): Molmo2's image / video tokens over causal and shared_prefix
# --------------------------------------------------------------------------------------------
def make_block_ids(seqs, device="cpu"):
    """seqs: list of (length, [(start, end, block id), ...]) with runs relative to the sequence
    start. Returns (cu_seqlens, block_ids, lengths); tokens outside every run get -1."""
    ids, lengths = [], []
    for L, runs in seqs:
        row = [-1] * L
        for a, b, bid in runs:
            row[a:b] = [bid] * (b - a)
        ids += row
        lengths.append(L)
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    return cu, torch.tensor(ids, dtype=torch.int32, device=device), lengths


# Causal streams (block = 16): one id in three runs separated by text with another id between
# (video frames and timestamps), a 1-token sequence, an empty one, a sequence without blocks, a
# block from the first token and one reaching the last token with a 1-token block in between, and
# block id 0 again in another sequence (ids only connect tokens of one sequence).
BLOCK_SEQS = [(45, [(2, 9, 0), (14, 20, 0), (24, 27, 3), (30, 33, 0)]), (1, []), (0, []), (29, []),
              (38, [(0, 17, 1), (20, 21, 2), (33, 38, 1)]), (23, [(5, 12, 0)])]
# shared_prefix samples (prefix, responses, runs inside the prefix): two ids with non-contiguous
# runs, a block filling the whole prefix (it ends where the response starts), samples without
# blocks or without prefix, blocks at the prefix end, a 1-token sample that is one block.
BLOCK_SAMPLES = [(40, [3, 18], [(5, 12, 0), (20, 30, 0), (33, 36, 1)]), (21, [9], [(0, 21, 0)]),
                 (5, [7, 1, 20], []), (0, [9, 12], []), (17, [33], [(3, 5, 4), (14, 16, 4), (16, 17, 2)]),
                 (1, [], [(0, 1, 0)])]


def block_layout(mask, device):
    """(cu_seqlens, segment_ids or None, block_ids, lengths) for the mask's block test stream."""
    if mask == "causal":
        cu, blk, lengths = make_block_ids(BLOCK_SEQS, device)
        return cu, None, blk, lengths
    cu, seg, lengths = make_layout([(p, r) for p, r, _ in BLOCK_SAMPLES], device)
    _, blk, _ = make_block_ids([(L, runs) for L, (_, _, runs) in zip(lengths, BLOCK_SAMPLES)], device)
    return cu, seg, blk, lengths


BLOCK_SHAPES = SHAPES[:2]  # (2, 2, 72): D not a power of 2; (4, 1, 40): GQA 4
BLOCK_CASES = [(b, m, s) for b in ("torch", "cpu", "triton") for m in ("causal", "shared_prefix")
               for s in (SHAPES if b != "triton" else BLOCK_SHAPES)]


@pytest.mark.parametrize("backend, mask, shape", BLOCK_CASES,
                         ids=[f"{b}-{m}-hq{s[0]}-hkv{s[1]}-d{s[2]}" for b, m, s in BLOCK_CASES])
def test_blocks_backend_matches_reference(backend, mask, shape, small_blocks):
    Hq, Hkv, D = shape
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cu, seg, blk, lengths = block_layout(mask, device)
    T = int(cu[-1])
    q, k, v = rand_qkv(T, Hq, Hkv, D, device=device)
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(6)).to(device)
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg,
                                                          block_ids=blk, backend=backend), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg, block_ids=blk),
                                 q, k, v, do)
    assert out.shape == (T, Hq, D) and out.dtype == q.dtype
    assert_close(out, ref_out, what=f"{backend} out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, what=f"{backend} d{name}")


ATOMIC_CASES = [("causal", False), ("bidirectional", False), ("shared_prefix", False), ("causal", True),
                ("shared_prefix", True)]


@pytest.mark.parametrize("mask, blocks", ATOMIC_CASES, ids=[f"{m}{'-blocks' if b else ''}" for m, b in ATOMIC_CASES])
def test_atomic_dq_backward_matches_reference(mask, blocks, monkeypatch):
    """The "atomic_dq" backward (dQ added by the dK/dV programs with atomics, flash-attention-2's
    way) through the public op, on the ragged layouts, rectangular tiles and GQA 4: values and all
    three gradients against the reference; the split launch is skipped (its counters stay zero)."""
    monkeypatch.setattr(va, "CONFIG_OVERRIDE", {"fwd": va.KernelConfig(32, 16), "dkdv": va.KernelConfig(16, 32),
                                                "dq": va.KernelConfig(32, 16)})
    monkeypatch.setattr(va, "BACKWARD_VARIANT", "atomic_dq")
    if blocks:
        cu, seg, blk, lengths = block_layout(mask, TRITON_DEVICE)
    else:
        cu, seg, lengths = make_layout(RAGGED, TRITON_DEVICE)
        seg, blk = (seg if mask == "shared_prefix" else None), None
    T = int(cu[-1])
    q, k, v = rand_qkv(T, 4, 1, 40, device=TRITON_DEVICE)
    do = torch.randn(T, 4, 40, generator=torch.Generator().manual_seed(8)).to(TRITON_DEVICE)
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg,
                                                          block_ids=blk, backend="triton"), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg, block_ids=blk), q, k, v, do)
    assert_close(out, ref_out, what="out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, what=f"atomic_dq d{name}")
    o, lse, _ = va.attention_forward(*(x.detach() for x in (q, k, v)), cu, max(lengths), mask=mask, segment_ids=seg,
                                     block_ids=blk)
    *_, counts = va.attention_backward(do, *(x.detach() for x in (q, k, v)), o, lse, cu, max(lengths), mask=mask,
                                       segment_ids=seg, block_ids=blk, count_blocks=True)
    assert int(counts["dq"].sum()) == 0 and int(counts["dkdv"].sum()) > 0
    split = va.attention_backward(do, *(x.detach() for x in (q, k, v)), o, lse, cu, max(lengths), mask=mask,
                                  segment_ids=seg, block_ids=blk, variant="split")
    for only, kept in (("dkdv", (1, 2)), ("dq", (0,))):  # the phases alone (timed apart on the GPU)
        part = va.attention_backward(do, *(x.detach() for x in (q, k, v)), o, lse, cu, max(lengths), mask=mask,
                                     segment_ids=seg, block_ids=blk, variant="split", only=only)
        assert all(torch.equal(part[i], split[i]) for i in kept)
    with pytest.raises(ValueError, match="variant must be one of"):
        va.attention_backward(do, q, k, v, o, lse, cu, max(lengths), mask=mask, segment_ids=seg, block_ids=blk,
                              variant="fused")


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
def test_triton_blocks_rect_tiles_and_fp16(mask):
    """Rectangular tiles (fwd / dq 32 x 16, dkdv 16 x 32: block spans and their rounded-down
    starts fall elsewhere in the tiles) with a softmax scale in fp32, and fp16 inputs with 16 x 16
    tiles against the fp32 reference at fp16 tolerances."""
    cfg = {"fwd": va.KernelConfig(32, 16), "dkdv": va.KernelConfig(16, 32), "dq": va.KernelConfig(32, 16)}
    cu, seg, blk, lengths = block_layout(mask, TRITON_DEVICE)
    T, Hq, Hkv, D = int(cu[-1]), 4, 2, 32
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(8)).to(TRITON_DEVICE)
    for dtype, tol, configs, scale in ((torch.float32, ATOL, cfg, 0.3), (torch.float16, 5e-3, SMALL, None)):
        q32, k32, v32 = rand_qkv(T, Hq, Hkv, D, device=TRITON_DEVICE)
        q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q32, k32, v32))
        out, grads = fwd_bwd(lambda a, b, c: varlen_attention_triton(a, b, c, cu, max(lengths), mask=mask,
                                                                        segment_ids=seg, block_ids=blk,
                                                                        softmax_scale=scale, configs=configs),
                             q, k, v, do.to(dtype))
        ref, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg, block_ids=blk,
                                                                            softmax_scale=scale),
                                 q32, k32, v32, do)
        assert out.dtype == dtype
        assert_close(out, ref, atol=tol, rtol=tol, what=f"{dtype} out")
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert_close(g, rg, atol=4 * tol, rtol=4 * tol, what=f"{dtype} d{name}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
def test_blocks_change_exactly_the_rows_they_widen(backend, mask, small_blocks):
    """The mask matters: a block token with a later token of its block in its sequence sees more
    keys, and its output differs from block_ids=None; every other row (text tokens, responses, a
    block's last token) sees the same keys as before and keeps its output."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cu, seg, blk, lengths = block_layout(mask, device)
    T, Hq, Hkv, D = int(cu[-1]), 2, 1, 16
    q, k, v = (x.detach() for x in rand_qkv(T, Hq, Hkv, D, device=device))
    with_blocks = varlen_attention(q, k, v, cu, max(lengths), mask=mask, segment_ids=seg, block_ids=blk,
                                   backend=backend).cpu()
    without = varlen_attention(q, k, v, cu, max(lengths), mask=mask, segment_ids=seg, backend=backend).cpu()
    _, blk_end = va.block_metadata(cu.cpu(), blk.cpu())
    seq_lo = torch.repeat_interleave(cu[:-1].cpu().long(), torch.tensor(lengths))
    rel = torch.arange(T) - seq_lo
    widened = (blk.cpu() >= 0) & (blk_end.long() - 1 > rel)  # a later token of the same block exists
    assert 10 < int(widened.sum()) < T - 10
    diff = (with_blocks - without).abs().amax(dim=(1, 2))
    assert bool((diff[widened] > 1e-3).all()), diff[widened]
    assert_close(with_blocks[~widened], without[~widened], what="rows the blocks do not widen")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
def test_no_blocks_is_bit_identical(backend, mask, small_blocks):
    """block_ids=None keeps the existing path, and a block_ids tensor without any block (all -1)
    gives bit for bit the same outputs and gradients through the block path: the BLOCKS kernels
    visit the same tiles and the block rule adds no pair."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cu, seg, _, lengths = block_layout(mask, device)
    T, Hq, Hkv, D = int(cu[-1]), 2, 1, 16
    q, k, v = rand_qkv(T, Hq, Hkv, D, device=device)
    do = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(7)).to(device)
    none = torch.full((T,), -1, dtype=torch.int32, device=device)
    runs = [fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg,
                                                     block_ids=ids, backend=backend), q, k, v, do)
            for ids in (None, none)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_block_overlay_equals_transformers_mask():
    """mrrm's reference mask is transformers' `create_causal_mask(..., block_sequence_ids=...)`
    for one sequence: Molmo2's ids (every image / frame token in block 0, text -1, from
    mm_token_type_ids) with several non-contiguous runs, and general ids (several blocks)."""
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import create_causal_mask

    # Molmo2's text config where transformers has it (>= 5.20), else a dense one: the mask reads only
    # the attention implementation
    Config = getattr(transformers, "Molmo2TextConfig", transformers.Qwen3Config)
    cfg = Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                 intermediate_size=64)
    cfg._attn_implementation = "sdpa"
    mm_token_type_ids = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0]])
    molmo2_ids = torch.where(mm_token_type_ids == 1, 0, -1)  # as Molmo2Model.forward builds them
    general_ids = torch.tensor([[-1, 3, 3, -1, 0, 0, 3, -1, 0, -1, -1, 5, 5, 5, -1, 0, -1, 3, -1, -1]])
    L = mm_token_type_ids.shape[1]
    for ids in (molmo2_ids, general_ids):
        # the cache positionally: transformers 5.20 and older name it past_key_values
        want = create_causal_mask(cfg, torch.zeros(1, L, 32), None, None, position_ids=None, block_sequence_ids=ids)
        assert want.dtype == torch.bool and want.shape == (1, 1, L, L)
        got = oracle.attention_mask_dense(0, L, "causal", None, ids[0].to(torch.int32))
        assert torch.equal(got, want[0, 0])
        assert not torch.equal(got, oracle.attention_mask_dense(0, L, "causal", None))
    # and inside a packed stream: the same mask for the sequence at offset 7
    packed = torch.cat([torch.full((7,), 2), general_ids[0]]).to(torch.int32)
    assert torch.equal(oracle.attention_mask_dense(7, 7 + L, "causal", None, packed), got)


def test_reference_block_mask_rule():
    """The oracle's rule, pair by pair: base mask OR same non-negative block id, for shared_prefix."""
    cu, seg, _ = make_layout([(6, [2, 3])])
    blk = torch.tensor([0, -1, 1, 0, 1, 1, -1, -1, -1, -1, -1], dtype=torch.int32)
    vis = oracle.attention_mask_dense(0, 11, "shared_prefix", seg, blk)
    for i in range(11):
        for j in range(11):
            base = j <= i and (int(seg[j]) == 0 or int(seg[j]) == int(seg[i]))
            same = int(blk[i]) >= 0 and int(blk[i]) == int(blk[j])
            assert bool(vis[i, j]) == (base or same), (i, j)


def _brute_block_spans(cu, blk):
    bounds, ids = cu.tolist(), blk.tolist()
    starts, ends = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for t in range(lo, hi):
            if ids[t] < 0:
                starts.append(hi - lo)
                ends.append(0)
            else:
                same = [u - lo for u in range(lo, hi) if ids[u] == ids[t]]
                starts.append(min(same))
                ends.append(max(same) + 1)
    return starts, ends


def test_block_metadata_matches_brute_force():
    g = torch.Generator().manual_seed(11)
    for lengths in ([45, 1, 0, 29, 38], [7], [0, 0, 13, 50]):
        T = sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        blk = (torch.randint(-1, 3, (T,), generator=g) * (torch.rand(T, generator=g) < 0.6)).to(torch.int32)
        blk[blk == 0] = -1
        if T:
            blk[-1] = 2 ** 31 - 1  # the largest id still packs into the sort key
        start, end = va.block_metadata(cu, blk)
        assert start.dtype == end.dtype == torch.int32
        assert (start.tolist(), end.tolist()) == _brute_block_spans(cu, blk)


def test_block_metadata_is_cached_per_input_tensors():
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    blk = torch.tensor([-1, 0, 0, -1, 0, 1, -1, 0, -1, 0, 0, -1], dtype=torch.int32)
    first = va.cached_block_metadata(cu, blk)
    assert va.cached_block_metadata(cu, blk) is first
    blk[3] = 1  # an in-place edit bumps the version: recomputed, and right
    edited = va.cached_block_metadata(cu, blk)
    assert edited is not first
    for got, want in zip(edited, va.block_metadata(cu, blk)):
        assert torch.equal(got, want)
    with torch.inference_mode():
        cu_i, blk_i = cu.clone(), blk.clone()
        got = va.cached_block_metadata(cu_i, blk_i)
        assert va.cached_block_metadata(cu_i, blk_i) is got


@pytest.mark.slow
def test_blocks_skip_key_blocks():
    """With blocks the kernels visit exactly the documented tiles, and only the tiles the blocks
    need: a query block visits cdiv(max(span end of its rows) - m1, BN) key tiles more than without
    block_ids (none without block rows), a key block visits cdiv(n0 - min(span start of its keys),
    BM) query tiles more per head (none without block keys)."""
    # causal: block 0 in two runs [20, 28) and [60, 70) of a 96-token sequence (span [20, 70)),
    # block 1 at [85, 90); shared_prefix: a 48-token prefix with block 0 at [3, 10) and [30, 40)
    cu_c, blk_c, len_c = make_block_ids([(96, [(20, 28, 0), (60, 70, 0), (85, 90, 1)]), (30, [])], TRITON_DEVICE)
    cu_s, seg_s, len_s = make_layout([(48, [16, 20]), (10, [7])], TRITON_DEVICE)
    _, blk_s, _ = make_block_ids([(84, [(3, 10, 0), (30, 40, 0)]), (17, [(2, 5, 3)])], TRITON_DEVICE)
    Hq, Hkv, B = 2, 1, 16
    cfg = va.uniform_configs(B, B)
    for mask, cu, seg, blk, lengths in (("causal", cu_c, None, blk_c, len_c),
                                        ("shared_prefix", cu_s, seg_s, blk_s, len_s)):
        T = int(cu[-1])
        fwd, dq, dkdv = kernel_counts(T, Hq, Hkv, cu, seg, lengths, mask, cfg, blk)
        fwd0, _, dkdv0 = kernel_counts(T, Hq, Hkv, cu, seg, lengths, mask, cfg)
        seg_cpu = seg.cpu() if seg is not None else None
        want_q = torch.tensor(expected_query_side_counts(lengths, cu.cpu(), seg_cpu, mask, B, B, blk.cpu()),
                              dtype=torch.int32)
        want_kv = torch.tensor(expected_dkdv_counts(lengths, cu.cpu(), seg_cpu, mask, B, B, Hq // Hkv, blk.cpu()),
                               dtype=torch.int32)
        assert torch.equal(fwd, want_q[:, None, :].expand_as(fwd)), mask
        assert torch.equal(dq, want_q[:, None, :].expand_as(dq)), mask
        assert torch.equal(dkdv, want_kv[:, None, :].expand_as(dkdv)), mask
        # independent of the mirror: the extra tiles from the block spans alone (brute force)
        start, end = _brute_block_spans(cu.cpu(), blk.cpu())
        for s, L in enumerate(lengths):
            lo = int(cu[s])
            for b in range(_cdiv(L, B)):
                b0, b1 = b * B, min(b * B + B, L)
                span_end = max(end[lo + b0:lo + b1])
                span_start = min(start[lo + b0:lo + b1])
                assert int(fwd[s, 0, b] - fwd0[s, 0, b]) == _cdiv(max(span_end - b1, 0), B), (mask, s, b)
                assert int(dkdv[s, 0, b] - dkdv0[s, 0, b]) == Hq // Hkv * _cdiv(max(b0 - span_start, 0), B), \
                    (mask, s, b)
        if mask == "causal":
            # query block [16, 32) reaches key 69: 3 more key tiles; key block [64, 80) goes back to
            # query 20: 3 more query tiles per head; blocks [32, 48) (text only) and the text-only
            # sequence: none
            assert int(fwd[0, 0, 1] - fwd0[0, 0, 1]) == 3
            assert int(dkdv[0, 0, 4] - dkdv0[0, 0, 4]) == 3 * Hq // Hkv
            assert int(fwd[0, 0, 2] - fwd0[0, 0, 2]) == 0
            assert torch.equal(fwd[1], fwd0[1]) and torch.equal(dkdv[1], dkdv0[1])
        assert int((fwd - fwd0).sum()) > 0 and int((dkdv - dkdv0).sum()) > 0, mask


@pytest.mark.parametrize("case", ["dtype", "ndim", "length", "below_minus_one", "device", "bidirectional",
                                  "outside_prefix"])
def test_bad_block_ids_raise_value_error(case):
    q, k, v, cu = _inputs()
    blk = torch.tensor([0, 0, -1, 1, -1, 0, 0, -1, -1, -1], dtype=torch.int32)
    kwargs = {"mask": "causal"}
    match = "block_ids"
    if case == "dtype":
        blk = blk.long()
    elif case == "ndim":
        blk = blk[None]
    elif case == "length":
        blk = blk[:-1]
    elif case == "below_minus_one":
        blk[6] = -2
        match = "token 6"
    elif case == "device":
        blk = torch.zeros(10, dtype=torch.int32, device="meta")
    elif case == "bidirectional":
        kwargs = {"mask": "bidirectional"}
    elif case == "outside_prefix":
        # second sequence (tokens 4..9): prefix 4..6, then response 1 at 7..9; token 8 is a block token
        seg = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.int32)
        blk = torch.tensor([0, 0, -1, -1, 0, -1, 0, -1, 2, -1], dtype=torch.int32)
        kwargs = {"mask": "shared_prefix", "segment_ids": seg}
        match = "token 8"
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu, 6, block_ids=blk, **kwargs)


def test_blocks_in_the_prefix_are_valid(small_blocks):
    q, k, v, cu = _inputs()
    seg = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.int32)
    blk = torch.tensor([0, 0, -1, -1, 0, -1, 0, -1, -1, -1], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, 6, mask="shared_prefix", segment_ids=seg, block_ids=blk, backend="cpu")
    assert_close(out, oracle.varlen_attention(q, k, v, cu, 6, mask="shared_prefix", segment_ids=seg,
                                                 block_ids=blk))


def test_triton_launcher_rejects_blocks_with_bidirectional():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="bidirectional"):
        varlen_attention_triton(q, k, v, cu, 6, mask="bidirectional",
                                   block_ids=torch.zeros(10, dtype=torch.int32))


def test_flash_cannot_serve_blocks_and_auto_never_picks_it(monkeypatch):
    """flash-attn has no such mask: an explicit backend='flash' with block_ids raises (whether or
    not flash-attn is installed), and `auto` sends CUDA tensors to Triton, never to flash."""
    from mrrm.ops import _dispatch

    monkeypatch.setattr(_dispatch, "flash_attn_available", lambda: True)
    monkeypatch.delenv("MRRM_OPS", raising=False)
    q, k, v, cu = _inputs()
    blk = torch.tensor([0, 0, -1, -1, 0, -1, 0, -1, -1, -1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_ids"):
        varlen_attention(q, k, v, cu, 6, block_ids=blk, backend="flash")
    assert _dispatch.choose_backend("varlen_attention", torch.device("cuda")) in ("triton", "torch")


@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_blocks_low_precision_vs_fp32_reference(mask, dtype):
    """Production tiles, Molmo2-like shapes: D = 128, GQA 4, images of hundreds of tokens, a video
    of frames separated by timestamp text, several images in one prefix."""
    Hq, Hkv, D = 8, 2, 128
    if mask == "causal":
        cu, blk, lengths = make_block_ids([(900, [(10, 310, 0), (350, 650, 0)]),
                                           (700, [(5 + 70 * f, 65 + 70 * f, 0) for f in range(8)]), (200, [])], "cuda")
        seg = None
    else:
        cu, seg, lengths = make_layout([(700, [120, 1, 257]), (300, [500])], "cuda")
        _, blk, _ = make_block_ids([(1078, [(20, 300, 0), (320, 600, 1), (650, 699, 0)]), (800, [(0, 290, 0)])],
                                   "cuda")
    T = int(cu[-1])
    q, k, v = rand_qkv(T, Hq, Hkv, D, dtype=dtype, device="cuda")
    do = torch.randn(T, Hq, D, device="cuda", dtype=dtype)
    out, grads = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths), mask=mask, segment_ids=seg,
                                                          block_ids=blk), q, k, v, do)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref, ref_grads = fwd_bwd(lambda a, b, c: oracle.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                        segment_ids=seg, block_ids=blk),
                             q32, k32, v32, do.float())
    assert (out.float() - ref).abs().max().item() <= 2e-2
    for name, g, rg in zip("qkv", grads, ref_grads):
        err = (g.float() - rg).abs().max().item()
        assert err <= 2e-2 * max(1.0, rg.abs().max().item()), f"d{name}: {err}"
