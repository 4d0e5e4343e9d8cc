"""GPU kernel benchmarks (skipped without CUDA). Run by bench_perf/gpu_check.sh.

Each benchmark times forward + backward with triton.testing.do_bench (median, ms) and records it
in extra_info together with the useful FLOPs (attention: only the visible query-key pairs), so
`python -m bench_perf.gpu_summary` can print ratios measured side by side in one run.

varlen_attention (bf16, Hq=32, Hkv=8, D=128: the Qwen3-VL-4B text tower), packed samples of
4,096 tokens: a 1,280-token prefix (an image) and N responses sharing the rest, T = 16k and 64k:
  - mrrm_triton   mrrm.ops.varlen_attention (causal and shared_prefix)
  - sdpa_flash    F.scaled_dot_product_attention, flash backend, ONE batched call over the equal-length
                  samples, GQA expanded outside the timing (causal only)
  - sdpa_cudnn    the same through the cuDNN backend (causal only)
  - flex          FlexAttention with the same masks (create_block_mask timed separately)
  - eager         the torch reference math (T = 16k only; it materialises the L x L scores)
gather_value_head (T=16k, H=2560, D=1024, M=64, bf16 hidden, fp32 head): mrrm_triton vs eager.
listwise_ce (4,096 groups of 4..8): the fused CUDA kernel (forward, which also yields the gradient).
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mrrm import ops
from mrrm.ops import oracle

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = cuda

HQ, HKV, HD = 32, 8, 128
SEQ, PREFIX = 4096, 1280


def _do_bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _layout(total_tokens, n_resp):
    """cu_seqlens and segment_ids for total_tokens / SEQ samples of [prefix, r_1 .. r_N]."""
    S = total_tokens // SEQ
    R = (SEQ - PREFIX) // n_resp
    seg_one = torch.zeros(SEQ, dtype=torch.int32)
    for i in range(n_resp):
        lo = PREFIX + i * R
        seg_one[lo: (lo + R if i < n_resp - 1 else SEQ)] = i + 1
    cu = torch.arange(0, (S + 1) * SEQ, SEQ, dtype=torch.int32)
    return cu.cuda(), seg_one.repeat(S).cuda(), S


def _useful_pairs(seg_one, mask):
    """Visible (query, key) pairs of one sample (the FLOP count that matters)."""
    vis = oracle.attention_mask_dense(0, SEQ, mask, seg_one.cpu() if mask == "shared_prefix" else None)
    return int(vis.sum())


def _qkv(T):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(T, h, HD, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)  # noqa: E731
    return mk(HQ), mk(HKV), mk(HKV)


def _fwd_bwd(fn, leaves, do):
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(do)
    return run


@pytest.mark.parametrize("T,n_resp", [(16384, 4), (16384, 8), (65536, 8)])
@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
@pytest.mark.parametrize("impl", ["mrrm_triton", "sdpa_flash", "sdpa_cudnn", "flex", "eager"])
def test_varlen_attention_gpu(benchmark, impl, mask, n_resp, T):
    if impl.startswith("sdpa") and mask != "causal":
        pytest.skip("SDPA's flash and cuDNN backends have no shared-prefix mask")
    if impl == "eager" and T > 16384:
        pytest.skip("eager materialises L x L scores per sequence; 16k only")
    cu, seg, S = _layout(T, n_resp)
    q, k, v = _qkv(T)
    do = torch.randn_like(q)
    segment_ids = seg if mask == "shared_prefix" else None
    info = dict(T=T, n_resp=n_resp, mask=mask, impl=impl, Hq=HQ, Hkv=HKV, D=HD)
    if impl == "mrrm_triton":
        fn = lambda: ops.varlen_attention(q, k, v, cu, SEQ, mask=mask, segment_ids=segment_ids,  # noqa: E731
                                          backend="triton", check_inputs=False)
    elif impl == "eager":
        fn = lambda: oracle.varlen_attention(q, k, v, cu, SEQ, mask=mask, segment_ids=segment_ids)  # noqa: E731
    elif impl in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        # GQA expanded once, outside the timing (flash / cuDNN want equal head counts); the S
        # equal-length samples as ONE batched call [S, H, SEQ, D] (the packed stream viewed as a batch)
        k = k.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(True)
        v = v.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(True)

        def fn():
            with sdpa_kernel(backend):
                qs, ks, vs = (x.view(S, SEQ, HQ, HD).transpose(1, 2) for x in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            return o.transpose(1, 2).reshape(T, HQ, HD)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(S, device="cuda"), SEQ)

        def mask_mod(b, h, qi, ki):
            ok = (doc[qi] == doc[ki]) & (ki <= qi)
            if mask == "shared_prefix":
                ok = ok & ((seg[ki] == 0) | (seg[ki] == seg[qi]))
            return ok

        import time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, T, T, device="cuda")
        torch.cuda.synchronize()
        info["create_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
        flex = torch.compile(flex_attention)

        def fn():
            o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     block_mask=block_mask, enable_gqa=True)
            return o[0].transpose(0, 1)
    run = _fwd_bwd(fn, (q, k, v), do)
    run()  # compile / warm up
    ms = _do_bench(run)
    pairs = _useful_pairs(seg[:SEQ], mask) * S
    useful_flops = 4 * pairs * HQ * HD * 3.5  # forward 2 GEMMs (4 FLOP/pair/dim), backward 2.5x
    info.update(do_bench_median_ms=ms, useful_tflops=useful_flops / ms / 1e9)
    benchmark.extra_info.update(info)
    benchmark.group = f"varlen_attention fwd+bwd T={T} N={n_resp} {mask}"
    benchmark.pedantic(run, rounds=3, iterations=1)


def _head_inputs():
    """gather_value_head at the paper's head size: T 16k, H 2560 (bf16 hidden), D 1024 (fp32 head), M 64."""
    T, H, D, M = 16384, 2560, 1024, 64
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.randperm(T, device="cuda")[:M].sort().values
    w1 = (torch.randn(D, H, device="cuda") * 0.01).requires_grad_(True)
    b1 = torch.zeros(D, device="cuda", requires_grad=True)
    w2 = (torch.randn(1, D, device="cuda") * 0.01).requires_grad_(True)
    b2 = torch.zeros(1, device="cuda", requires_grad=True)
    return hidden, positions, w1, b1, w2, b2


@pytest.mark.parametrize("impl", ["mrrm_triton", "eager"])
def test_gather_value_head_gpu(benchmark, impl):
    hidden, positions, w1, b1, w2, b2 = _head_inputs()
    (T, H), D, M = hidden.shape, w1.shape[0], positions.shape[0]
    scale = 1.0 / math.sqrt(H)
    if impl == "mrrm_triton":
        fn = lambda: ops.gather_value_head(hidden, positions, w1, b1, w2, b2, scale=scale,  # noqa: E731
                                           backend="triton", check_inputs=False)
    else:
        fn = lambda: scale * (F.silu(hidden[positions].float() @ w1.t() + b1) @ w2.t() + b2).squeeze(-1)  # noqa: E731

    def run():
        for t in (hidden, w1, b1, w2, b2):
            t.grad = None
        fn().sum().backward()
    run()
    ms = _do_bench(run)
    benchmark.extra_info.update(impl=impl, T=T, H=H, D=D, M=M, do_bench_median_ms=ms)
    benchmark.group = "gather_value_head fwd+bwd T=16k H=2560 D=1024 M=64"
    benchmark.pedantic(run, rounds=3, iterations=1)


def test_listwise_ce_gpu(benchmark):
    B = 4096
    sizes = torch.randint(4, 9, (B,))
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    scores = torch.randn(int(offsets[-1]), device="cuda")
    targets = (torch.rand(B) * sizes).long().cuda()
    offsets = offsets.cuda()
    from mrrm.ops._dispatch import C_or_raise

    C = C_or_raise("listwise_ce")
    run = lambda: C.listwise_ce_fwd_bwd(scores, offsets, targets, 0)  # noqa: E731
    run()
    ms = _do_bench(run)
    benchmark.extra_info.update(impl="mrrm_cuda", B=B, do_bench_median_ms=ms, us=ms * 1e3)
    benchmark.group = "listwise_ce fused fwd+grad B=4096"
    benchmark.pedantic(run, rounds=3, iterations=1)


# --------------------------------------------------------------------------------------------------
# Round 2 (issue 17): the attention phases apart, the backward variants, timed tile sweeps; the value
# head under CUDA graphs with its split-K sweep and its host cost per call.
# --------------------------------------------------------------------------------------------------
def _phase_inputs(T, mask, n_resp=4):
    cu, seg, S = _layout(T, n_resp)
    q, k, v = (x.detach() for x in _qkv(T))
    segment_ids = seg if mask == "shared_prefix" else None
    return cu, seg, segment_ids, q, k, v


ATTN_TILES = {  # candidates per kernel (block_m, block_n, warps, stages); the table's own first
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 3)],
    "dq": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
}
PHASE_CASES = [(kern, tiles) for kern, cands in ATTN_TILES.items() for tiles in cands]


@pytest.mark.parametrize("mask", ["causal"])
@pytest.mark.parametrize("kernel,tiles", PHASE_CASES, ids=[f"{k}-{'x'.join(map(str, t))}" for k, t in PHASE_CASES])
def test_attention_phase_tiles_gpu(benchmark, kernel, tiles, mask):
    """One attention kernel alone at T = 16k (the forward; the dK/dV or the dQ launch of the split
    backward, each with the small preprocess) with one tile candidate: the phases apart, and the sweep."""
    from mrrm.kernels import varlen_attention as va

    T = 16384
    cu, seg, segment_ids, q, k, v = _phase_inputs(T, mask)
    cfg = {kernel: va.KernelConfig(*tiles)}
    out, lse, _ = va.attention_forward(q, k, v, cu, SEQ, mask=mask, segment_ids=segment_ids)
    do = torch.randn_like(out)
    if kernel == "fwd":
        run = lambda: va.attention_forward(q, k, v, cu, SEQ, mask=mask, segment_ids=segment_ids, configs=cfg)  # noqa: E731
    else:  # the preprocess (delta = rowsum(dO * O), the same for every tile choice) and that kernel alone
        run = lambda: va.attention_backward(do, q, k, v, out, lse, cu, SEQ, mask=mask, segment_ids=segment_ids,  # noqa: E731
                                            configs=cfg, only=kernel)
    run()
    ms = _do_bench(run)
    if kernel != "fwd":  # the whole default backward, for scale
        base = lambda: va.attention_backward(do, q, k, v, out, lse, cu, SEQ, mask=mask, segment_ids=segment_ids)  # noqa: E731
        benchmark.extra_info.update(backward_default_ms=_do_bench(base))
    benchmark.extra_info.update(phase=kernel, tiles=list(tiles), mask=mask, T=T, call_ms=ms,
                                default_tiles=list(dataclasses.astuple(va.choose_configs(HD)[kernel])))
    benchmark.group = f"attention phase {kernel} T=16k {mask}"
    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.parametrize("mask", ["causal", "shared_prefix"])
@pytest.mark.parametrize("variant", ["split", "atomic_dq"])
@pytest.mark.parametrize("T", [16384, 65536])
def test_attention_backward_variants_gpu(benchmark, variant, mask, T):
    """The whole backward (preprocess, dK/dV, dQ) per variant, and the forward alone, side by side."""
    from mrrm.kernels import varlen_attention as va

    cu, seg, segment_ids, q, k, v = _phase_inputs(T, mask)
    fwd = lambda: va.attention_forward(q, k, v, cu, SEQ, mask=mask, segment_ids=segment_ids)  # noqa: E731
    out, lse, _ = fwd()
    do = torch.randn_like(out)
    run = lambda: va.attention_backward(do, q, k, v, out, lse, cu, SEQ, mask=mask, segment_ids=segment_ids,  # noqa: E731
                                        variant=variant)
    run()
    ms = _do_bench(run)
    fwd_ms = _do_bench(fwd)
    pairs = _useful_pairs(seg[:SEQ], mask) * (T // SEQ)
    benchmark.extra_info.update(variant=variant, mask=mask, T=T, backward_ms=ms, forward_ms=fwd_ms,
                                fwd_bwd_useful_tflops=4 * pairs * HQ * HD * 3.5 / (ms + fwd_ms) / 1e9)
    benchmark.group = f"attention backward variants T={T} {mask}"
    benchmark.pedantic(run, rounds=3, iterations=1)


def _host_us_per_call(fn, calls=200):
    """Host time per call while the GPU is kept busy (a long sleep kernel queued first), so the
    launches never wait for the device: the Python + dispatcher + launch cost alone."""
    import time

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles ahead of the calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


@pytest.mark.parametrize("split_k", [1, 2, 4, 8])
@pytest.mark.parametrize("what", ["forward", "fwd+bwd"])
def test_value_head_cudagraph_gpu(benchmark, what, split_k):
    """gather_value_head timed with triton's do_bench_cudagraph (no host overhead in the number),
    forward alone and forward + backward, for each forward K split; plus the host cost per call."""
    from triton.testing import do_bench_cudagraph

    from mrrm.ops.value_head import gather_value_head_triton

    hidden, positions, w1, b1, w2, b2 = _head_inputs()
    from mrrm.kernels import value_head as vh

    cfg = dataclasses.replace(vh.choose_config(positions.shape[0]), fwd_split_k=split_k)
    scale = 1.0 / math.sqrt(hidden.shape[1])
    if what == "forward":
        def run():
            with torch.no_grad():
                return gather_value_head_triton(hidden, positions, w1, b1, w2, b2, scale=scale, config=cfg)
    else:
        grad_out = torch.ones(positions.shape[0], device="cuda")

        def run():  # the gradients as autograd.grad returns them (no accumulation into .grad)
            y = gather_value_head_triton(hidden, positions, w1, b1, w2, b2, scale=scale, config=cfg)
            return torch.autograd.grad(y, (hidden, w1, b1, w2, b2), grad_out)
    run()
    graph_ms = do_bench_cudagraph(run, rep=100, return_mode="median")
    floor_mb = (hidden.shape[0] * hidden.shape[1] * 2 * (what != "forward")  # the dense hidden gradient
                + w1.numel() * 4 * (2 if what != "forward" else 1)  # w1 read (and its gradient written)
                + positions.shape[0] * hidden.shape[1] * 2) / 1e6   # the gathered rows
    benchmark.extra_info.update(what=what, split_k=split_k, cudagraph_us=graph_ms * 1e3,
                                host_us_per_call=_host_us_per_call(run), memory_floor_mb=floor_mb)
    benchmark.group = f"gather_value_head {what} under CUDA graphs"
    benchmark.pedantic(run, rounds=3, iterations=1)
