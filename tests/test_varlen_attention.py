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

import os
import subprocess
import sys

import pytest
import torch

import mrrm.kernels.varlen_attention as va
from mrrm import reference
from mrrm.ops import varlen_attention

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
BACKEND_CASES = [(b, m, s) for b in ("reference", "cpu", "triton") for m in ("causal", "bidirectional", "shared_prefix")
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
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: reference.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg_arg), q, k, v, do)
    assert out.shape == (T, Hq, D) and out.dtype == q.dtype
    assert_close(out, ref_out, what=f"{backend} out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g, rg, what=f"{backend} d{name}")


def test_reference_mask_rule():
    """The oracle itself: shared_prefix visibility is `same sequence, j <= i, seg[j] in (0, seg[i])`."""
    cu, seg, _ = make_layout([(3, [2, 2])])
    vis = reference.attention_mask_dense(0, 7, "shared_prefix", seg)
    for i in range(7):
        for j in range(7):
            assert bool(vis[i, j]) == (j <= i and (int(seg[j]) == 0 or int(seg[j]) == int(seg[i])))


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
    out, grads = fwd_bwd(lambda a, b, c: va.varlen_attention_triton(a, b, c, cu, max(lengths), mask=mask,
                                                                    segment_ids=seg_arg, softmax_scale=0.3,
                                                                    configs=cfg), q, k, v, do)
    ref_out, ref_grads = fwd_bwd(lambda a, b, c: reference.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
                                                                            segment_ids=seg_arg, softmax_scale=0.3),
                                 q, k, v, do)
    assert_close(out, ref_out, what="out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, what=f"d{name}")


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
        out = va.varlen_attention_triton(q, k, v, cu, max(lengths), mask="shared_prefix", segment_ids=seg,
                                         configs=SMALL)
        (g,) = torch.autograd.grad(out, fused, do.to(dtype))
        f32 = qkv.clone().requires_grad_(True)
        ref = reference.varlen_attention(f32[:, :Hq], f32[:, Hq:Hq + Hkv], f32[:, Hq + Hkv:], cu, max(lengths),
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


def expected_query_side_counts(lengths, cu, seg, mask, BM, BN):
    """Key blocks each (sequence, query block) program visits, from the ranges the module
    docstring specifies (mirror of `_query_key_ranges`), as a list per sequence."""
    P_all, ss_all, _ = _meta_lists(cu, seg) if mask == "shared_prefix" else (None, None, None)
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
                ranges = [(0, min(P, m0) // BN * BN), (min(P, m0) // BN * BN, min(P, m1))]
                if mask == "shared_prefix":
                    b0 = min(max(P, ss_all[lo_tok + m0]), m1)
                    u0 = min(max(P, ss_all[lo_tok + m1 - 1]), m1)
                    b_body = u0 + max(m0 - u0, 0) // BN * BN
                    ranges += [(b0, u0), (u0, b_body), (b_body, m1)]
            row.append(sum(_cdiv(hi - lo, BN) for lo, hi in ranges))
        out.append(row)
    return out


def expected_dkdv_counts(lengths, cu, seg, mask, BM, BN, group):
    _, _, ke_all = _meta_lists(cu, seg) if mask == "shared_prefix" else (None, None, None)
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
                c = (_cdiv(min(n0 + BN, q_hi) - n0, BM) + _cdiv(body - body_lo, BM)
                     + _cdiv(q_hi - max(body, body_lo), BM))
            row.append(c * group)
        out.append(row)
    return out


def kernel_counts(T, Hq, Hkv, cu, seg, lengths, mask, cfg):
    """Visited-block counters from the kernels, reshaped to [S, heads, blocks] in block order."""
    q, k, v = (x.detach() for x in rand_qkv(T, Hq, Hkv, 16, device=TRITON_DEVICE))
    S = len(lengths)
    out, lse, c_fwd = va.attention_forward(q, k, v, cu, max(lengths), mask=mask, segment_ids=seg, configs=cfg,
                                           count_blocks=True)
    _, _, _, c_bwd = va.attention_backward(torch.ones_like(out), q, k, v, out, lse, cu, max(lengths), mask=mask,
                                           segment_ids=seg, configs=cfg, count_blocks=True)
    # program x of the grid handles block (num_blocks - 1 - x): flip back to block order
    return (c_fwd.view(S, Hq, -1).flip(-1).cpu(), c_bwd["dq"].view(S, Hq, -1).flip(-1).cpu(),
            c_bwd["dkdv"].view(S, Hkv, -1).flip(-1).cpu())


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
    ref = reference.varlen_attention(q, k, v, cu, 6, mask="shared_prefix", segment_ids=seg)
    assert_close(out, ref)


def test_launcher_rejects_float64_and_bad_configs():
    q, k, v, cu = _inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        va.varlen_attention_triton(q, k, v, cu, 6)
    with pytest.raises(ValueError):
        va.varlen_attention_triton(q.float(), k.float(), v.float(), cu, 6, configs={"fwd": va.KernelConfig(16, 32)})
    with pytest.raises(ValueError):
        va.varlen_attention_triton(q.float(), k.float(), v.float(), cu, 6, configs={"dkdv": va.KernelConfig(24, 24)})


def test_empty_stream():
    q, k, v = (torch.zeros(0, 2, 16, device=TRITON_DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    out = va.varlen_attention_triton(q, k, v, cu, 0)
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
    for spec in va.AOT_SPECS:
        if "BLOCK_M" in spec["constexprs"]:
            kernel = spec["name"].split("_")[0]
            cfg = va.choose_configs(spec["constexprs"]["HEAD_DIM"])[kernel]
            assert (spec["constexprs"]["BLOCK_M"], spec["constexprs"]["BLOCK_N"], spec["num_warps"],
                    spec["num_stages"]) == (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert len(va.AOT_SPECS) < 25


# --------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_90 (no GPU needed)
# --------------------------------------------------------------------------------------------
def _has_cuda_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


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
    ref, ref_grads = fwd_bwd(lambda a, b, c: reference.varlen_attention(a, b, c, cu, max(lengths), mask=mask,
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
