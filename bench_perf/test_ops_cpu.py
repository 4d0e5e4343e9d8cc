"""CPU op microbenchmarks: mrrm._C kernels against what people write in eager torch.

gather_value_head (T=16k, H=2560, M=64, D=1024: a Qwen3-VL-4B width, 16k packed tokens, 64 scores):
  - mrrm_cpu:       mrrm.ops.gather_value_head, backend="cpu" (mrrm._C)
  - eager_gather:   hidden[positions] -> Linear -> SiLU -> Linear (torch autograd)
  - head_all_tokens: the common practice: the head on all T tokens, then gather M scores
listwise_ce (B=4096 groups, N ragged in 2..8):
  - mrrm_cpu:       mrrm.ops.listwise_ce, backend="cpu" (fused loss + gradient)
  - padded_log_softmax: scatter into a -inf padded [B, Nmax] tensor, log_softmax, pick targets
varlen_attention (one training step of the demo: 32 samples, vision stream of 24 images x 64 patches
and 8 videos x 256, text stream of 32 sequences of 40..120 tokens; Hq 4, Hkv 2, D 32):
  - mrrm_cpu:          mrrm.ops.varlen_attention, backend="cpu" (similar lengths batched per call of torch's CPU
                       flash-attention kernel, forward and backward)
  - per_sequence_sdpa: one torch SDPA call per sequence (GQA expanded), what a varlen fallback loops
All timings are forward + backward.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mrrm import ops

from .conftest import SMALL

T, H, M, D = (2048, 512, 64, 256) if SMALL else (16384, 2560, 64, 1024)
B = 512 if SMALL else 4096


def _head_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).requires_grad_(True)
    positions = torch.randperm(T, generator=g)[:M].sort().values
    w1 = (torch.randn(D, H, generator=g) * 0.01).requires_grad_(True)
    b1 = torch.zeros(D, requires_grad=True)
    w2 = (torch.randn(1, D, generator=g) * 0.01).requires_grad_(True)
    b2 = torch.zeros(1, requires_grad=True)
    return hidden, positions, w1, b1, w2, b2


def _fwd_bwd(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.sum().backward()


@pytest.mark.parametrize("impl", ["mrrm_cpu", "eager_gather", "head_all_tokens"])
def test_gather_value_head_cpu(benchmark, impl):
    hidden, positions, w1, b1, w2, b2 = _head_inputs()
    scale = 1.0 / math.sqrt(H)
    if impl == "mrrm_cpu":
        fn = lambda: ops.gather_value_head(hidden, positions, w1, b1, w2, b2, scale=scale, backend="cpu")  # noqa: E731
    elif impl == "eager_gather":
        fn = lambda: scale * (F.silu(hidden[positions] @ w1.t() + b1) @ w2.t() + b2).squeeze(-1)  # noqa: E731
    else:
        fn = lambda: (scale * (F.silu(hidden @ w1.t() + b1) @ w2.t() + b2).squeeze(-1))[positions]  # noqa: E731
    benchmark.group = f"gather_value_head fwd+bwd T={T} H={H} M={M} D={D}"
    benchmark.extra_info.update(T=T, H=H, M=M, D=D, impl=impl)
    ref = ops.gather_value_head(hidden, positions, w1, b1, w2, b2, scale=scale, backend="torch")
    torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-6)  # the benchmarked thing is right
    benchmark.pedantic(_fwd_bwd, args=(fn, [hidden, w1, b1, w2, b2]), rounds=7, warmup_rounds=1)


def _ce_inputs():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(2, 9, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    scores = torch.randn(int(offsets[-1]), generator=g).requires_grad_(True)
    targets = (torch.rand(B, generator=g) * sizes).long()
    return scores, offsets, sizes, targets


def _padded_ce(scores, offsets, sizes, targets):
    nmax = int(sizes.max())
    group = torch.repeat_interleave(torch.arange(B), sizes)
    col = torch.arange(scores.shape[0]) - offsets[:-1][group]
    padded = scores.new_full((B, nmax), float("-inf")).index_put((group, col), scores)
    return F.cross_entropy(padded, targets)


@pytest.mark.parametrize("impl", ["mrrm_cpu", "padded_log_softmax"])
def test_listwise_ce_cpu(benchmark, impl):
    scores, offsets, sizes, targets = _ce_inputs()
    if impl == "mrrm_cpu":
        fn = lambda: ops.listwise_ce(scores, offsets, targets, backend="cpu")  # noqa: E731
    else:
        fn = lambda: _padded_ce(scores, offsets, sizes, targets)  # noqa: E731
    benchmark.group = f"listwise_ce fwd+bwd B={B} N=2..8"
    benchmark.extra_info.update(B=B, impl=impl)
    torch.testing.assert_close(fn(), ops.listwise_ce(scores, offsets, targets, backend="torch"))
    benchmark.pedantic(_fwd_bwd, args=(fn, [scores]), rounds=50, warmup_rounds=3)


def _attention_streams():
    g = torch.Generator().manual_seed(2)
    scale = 8 if SMALL else 1
    vision = [64] * (24 // scale) + [256] * (8 // scale)
    text = torch.randint(40, 121, (32 // scale,), generator=g).tolist()
    out = []
    for name, lengths, mask, hq, hkv in (("vision", vision, "bidirectional", 4, 4), ("text", text, "causal", 4, 2)):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        T = int(cu[-1])
        q, k, v = (torch.randn(T, h, 32, generator=g).requires_grad_(True) for h in (hq, hkv, hkv))
        out.append((name, lengths, mask, cu, q, k, v))
    return out


def _per_sequence_sdpa(q, k, v, cu, mask):
    outs = []
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[lo:hi].transpose(0, 1) for x in (q, k, v))
        ks = ks.repeat_interleave(q.shape[1] // k.shape[1], dim=0)
        vs = vs.repeat_interleave(q.shape[1] // k.shape[1], dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=mask == "causal").transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("impl", ["mrrm_cpu", "per_sequence_sdpa"])
def test_varlen_attention_cpu(benchmark, impl):
    streams = _attention_streams()

    def fn():
        total = 0
        for _, lengths, mask, cu, q, k, v in streams:
            if impl == "mrrm_cpu":
                o = ops.varlen_attention(q, k, v, cu, max(lengths), mask=mask, backend="cpu", check_inputs=False)
            else:
                o = _per_sequence_sdpa(q, k, v, cu, mask)
            total = total + o.sum()
        return total

    for _, lengths, mask, cu, q, k, v in streams:  # the benchmarked thing is right
        torch.testing.assert_close(ops.varlen_attention(q, k, v, cu, max(lengths), mask=mask, backend="cpu"),
                                   _per_sequence_sdpa(q, k, v, cu, mask), rtol=1e-5, atol=1e-5)
    tensors = [t for s in streams for t in s[4:]]
    benchmark.group = "varlen_attention fwd+bwd, one demo training step (vision + text streams)"
    benchmark.extra_info.update(impl=impl, vision_seqs=len(streams[0][1]), text_seqs=len(streams[1][1]))
    benchmark.pedantic(_fwd_bwd, args=(fn, tensors), rounds=20, warmup_rounds=2)
