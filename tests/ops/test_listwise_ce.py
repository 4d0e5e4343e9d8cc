"""listwise_ce: every backend against the pure-torch reference (values and gradients), independent
checks of the reference itself, input validation, and the CUDA kernel when a GPU is present.

Tolerances:
  fp32 backends vs the fp64 reference: rtol = atol = 1e-5 (fp32 accumulation over <= a few hundred
    terms; Plackett-Luce losses reach a few hundred, so the relative part dominates there).
  bf16 / fp16 scores: the backend result is rounded to the score dtype (2^-8 / 2^-11 relative), so
    rtol = atol = 1e-2 (bf16) or 2e-3 (fp16) against the reference on the same rounded scores.
  CUDA fp32: rtol = atol = 1e-4, since the kernel is built with --use_fast_math (exp/log intrinsics
    with a few ulp of error) and sums in warp order.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from mrrm import ops
from mrrm.ops import oracle as torch_ops
from mrrm.ops._dispatch import load_C

LOSSES = torch_ops.CE_LOSSES
REDUCTIONS = torch_ops.REDUCTIONS
CPU_BACKENDS = ("torch", "cpu")

# Ragged group sizes: singletons, a full warp (32), one lane over (33), the paper's typical sizes and 64.
RAGGED_SIZES = (1, 64, 3, 7, 1, 32, 33, 2, 5, 4)

needs_C = pytest.mark.skipif(load_C() is None, reason="mrrm._C is not built")


def _offsets(sizes, device="cpu"):
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    return torch.tensor(offs, dtype=torch.int64, device=device)


def make_problem(sizes, loss, *, dtype=torch.float32, spread=3.0, device="cpu", rank_dtype=torch.int64):
    """Random scores (rounded to `dtype`), offsets and targets for groups of the given sizes."""
    M = sum(sizes)
    scores = (torch.randn(M, dtype=torch.float64) * spread).to(dtype)
    offsets = _offsets(sizes)
    if loss == "best":
        targets = torch.tensor([int(torch.randint(0, n, ())) for n in sizes], dtype=torch.int64)
    elif loss == "plackett_luce":
        # Ranks 1..n drawn with replacement: ties and gaps both occur.
        targets = torch.cat([torch.randint(1, n + 1, (n,)) for n in sizes]).to(rank_dtype)
    else:
        parts = []
        for n in sizes:
            p = torch.softmax(torch.randn(n, dtype=torch.float64) * 2, 0)
            if n > 2:
                p[torch.randint(0, n, ())] = 0.0  # zero-probability responses are legal
                p = p / p.sum()
            parts.append(p)
        targets = torch.cat(parts).to(torch.float32)
    return scores.to(device), offsets.to(device), targets.to(device)


def run(backend, scores, offsets, targets, loss, reduction, upstream=None):
    """Loss and d(sum(loss * upstream))/d scores for one backend."""
    x = scores.detach().clone().requires_grad_(True)
    out = ops.listwise_ce(x, offsets, targets, loss=loss, reduction=reduction, backend=backend)
    if upstream is None:
        upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.to(torch.float64) * upstream.to(out.device)).sum().backward()
    return out.detach(), x.grad.detach(), upstream


def oracle(scores, offsets, targets, loss, reduction, upstream):
    """The reference in fp64 on the same (already rounded) scores."""
    tg = targets.to("cpu")
    if loss == "soft":
        tg = tg.double()
    x = scores.detach().to("cpu", torch.float64).requires_grad_(True)
    out = torch_ops.listwise_ce(x, offsets.cpu(), tg, loss=loss, reduction=reduction)
    (out * upstream.cpu()).sum().backward()
    return out.detach(), x.grad.detach()


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.double(), rtol=tol, atol=tol)


# ---- every CPU backend vs the fp64 reference ------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_matches_reference(backend, loss, reduction):
    scores, offsets, targets = make_problem(RAGGED_SIZES, loss)
    out, grad, up = run(backend, scores, offsets, targets, loss, reduction)
    ref_out, ref_grad = oracle(scores, offsets, targets, loss, reduction, up)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert out.shape == ((len(RAGGED_SIZES),) if reduction == "none" else ())
    assert_close(out, ref_out, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("seed", range(3))
def test_random_ragged_groups(backend, loss, seed):
    """Random group counts and sizes, 1..70 (N differs per group)."""
    g = torch.Generator().manual_seed(100 + seed)
    B = int(torch.randint(1, 12, (), generator=g))
    sizes = torch.randint(1, 71, (B,), generator=g).tolist()
    scores, offsets, targets = make_problem(sizes, loss)
    out, grad, up = run(backend, scores, offsets, targets, loss, "none")
    ref_out, ref_grad = oracle(scores, offsets, targets, loss, "none", up)
    assert_close(out, ref_out, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_one_long_group(backend, loss):
    """N is not limited to a warp or to 64: a single group of 300 (Plackett-Luce is O(N^2))."""
    scores, offsets, targets = make_problem([300], loss)
    out, grad, up = run(backend, scores, offsets, targets, loss, "sum")
    ref_out, ref_grad = oracle(scores, offsets, targets, loss, "sum", up)
    assert_close(out, ref_out, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_vs_fp32_reference(backend, loss, dtype, tol):
    """bf16/fp16 scores: compared with the reference on the same rounded scores in fp64. Results
    come back in the scores' dtype, hence the tolerance of one rounding of that dtype."""
    scores, offsets, targets = make_problem(RAGGED_SIZES, loss, dtype=dtype)
    for reduction in REDUCTIONS:
        out, grad, up = run(backend, scores, offsets, targets, loss, reduction)
        assert out.dtype == dtype and grad.dtype == dtype
        ref_out, ref_grad = oracle(scores, offsets, targets, loss, reduction, up)
        # Plackett-Luce sums up to 64 terms per group: scale the tolerance with the loss size.
        assert_close(out / ref_out.abs().clamp_min(1).to(out.device), ref_out / ref_out.abs().clamp_min(1), tol)
        assert_close(grad, ref_grad, tol)


@needs_C
@pytest.mark.parametrize("loss", ["best", "plackett_luce"])
def test_fp64_scores_on_cpu_backend(loss):
    """fp64 scores run in fp64 inside the C++ (opmath type); results are fp32, returned as fp64."""
    scores, offsets, targets = make_problem(RAGGED_SIZES, loss, dtype=torch.float64)
    out, grad, up = run("cpu", scores, offsets, targets, loss, "mean")
    assert out.dtype == torch.float64
    ref_out, ref_grad = oracle(scores, offsets, targets, loss, "mean", up)
    assert_close(out, ref_out, 1e-6)
    assert_close(grad, ref_grad, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_ranks(backend):
    scores, offsets, ranks = make_problem(RAGGED_SIZES, "plackett_luce", rank_dtype=torch.int32)
    out, grad, up = run(backend, scores, offsets, ranks, "plackett_luce", "none")
    ref_out, ref_grad = oracle(scores, offsets, ranks.long(), "plackett_luce", "none", up)
    assert_close(out, ref_out, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_numerically_stable_for_large_scores(backend, loss):
    """Scores far beyond exp's fp32 range (|s| ~ 1e3, offsets of 1e4): max-subtraction keeps every
    intermediate finite."""
    sizes = (5, 1, 40, 3)
    scores, offsets, targets = make_problem(sizes, loss, spread=300.0)
    scores = scores + 1e4
    out, grad, up = run(backend, scores, offsets, targets, loss, "none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref_out, ref_grad = oracle(scores, offsets, targets, loss, "none", up)
    assert_close(out, ref_out, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


# ---- gradcheck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_reference(loss, reduction):
    scores, offsets, targets = make_problem((1, 3, 4, 2), loss, dtype=torch.float64)
    if loss == "soft":
        targets = targets.double()
    x = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: torch_ops.listwise_ce(s, offsets, targets, loss=loss, reduction=reduction), (x,))


@needs_C
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu_backend(loss, reduction):
    """The C++ computes in fp64 for fp64 scores but returns fp32 losses, so the finite differences
    carry fp32 rounding (~1e-7 * |loss| / eps): eps = 1e-3 and tolerances of 1e-3."""
    scores, offsets, targets = make_problem((1, 3, 4, 2), loss, dtype=torch.float64)
    x = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: ops.listwise_ce(s, offsets, targets, loss=loss, reduction=reduction, backend="cpu"),
        (x,), eps=1e-3, atol=1e-3, rtol=1e-3)


# ---- the reference against independent formulas ------------------------------------------------


def _groups(t, sizes):
    return torch.split(t, list(sizes))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_best_equals_cross_entropy(backend):
    scores, offsets, targets = make_problem(RAGGED_SIZES, "best", dtype=torch.float64)
    expected = torch.stack([F.cross_entropy(g[None], targets[b:b + 1])
                            for b, g in enumerate(_groups(scores, RAGGED_SIZES))])
    out = ops.listwise_ce(scores, offsets, targets, loss="best", reduction="none", backend=backend)
    assert_close(out, expected, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_equals_cross_entropy_with_probabilities(backend):
    scores, offsets, targets = make_problem(RAGGED_SIZES, "soft", dtype=torch.float64)
    expected = torch.stack([F.cross_entropy(g[None], p[None].double())
                            for g, p in zip(_groups(scores, RAGGED_SIZES), _groups(targets, RAGGED_SIZES))])
    out = ops.listwise_ce(scores, offsets, targets, loss="soft", reduction="none", backend=backend)
    assert_close(out, expected, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_plackett_luce_strict_ranking_is_sequential_choice(backend):
    """Without ties, PL is the sequential choice model: the best of all, then the best of the rest..."""
    sizes = (1, 5, 9)
    scores = torch.randn(sum(sizes), dtype=torch.float64)
    ranks = torch.cat([torch.randperm(n) + 1 for n in sizes])
    expected = []
    for s, r in zip(_groups(scores, sizes), _groups(ranks, sizes)):
        order = torch.argsort(r)
        ordered = s[order]
        expected.append(sum(torch.logsumexp(ordered[t:], 0) - ordered[t] for t in range(len(ordered))))
    out = ops.listwise_ce(scores, _offsets(sizes), ranks, loss="plackett_luce", reduction="none", backend=backend)
    assert_close(out, torch.stack([torch.as_tensor(e) for e in expected]), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_plackett_luce_all_tied(backend):
    """All tied: every response competes with all, loss = N * LSE - sum(s)."""
    scores = torch.randn(6, dtype=torch.float64)
    out = ops.listwise_ce(scores, _offsets([6]), torch.full((6,), 3), loss="plackett_luce", reduction="sum",
                          backend=backend)
    assert_close(out, 6 * torch.logsumexp(scores, 0) - scores.sum(), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_singleton_groups_have_zero_loss_and_gradient(backend, loss):
    scores, offsets, targets = make_problem((1, 1, 1), loss)
    out, grad, _ = run(backend, scores, offsets, targets, loss, "none")
    assert_close(out, torch.zeros(3), 1e-6)
    assert_close(grad, torch.zeros(3), 1e-6)
    mean, _, _ = run(backend, scores, offsets, targets, loss, "mean")
    assert float(mean) == pytest.approx(0.0, abs=1e-6)


@needs_C
@pytest.mark.parametrize("loss", LOSSES)
def test_C_unit_gradient_invariants(loss):
    """Straight from mrrm._C: fp32 outputs of the documented shapes; every loss is invariant to
    shifting a group's scores, so each group's gradient sums to zero and a shift changes nothing."""
    C = load_C()
    scores, offsets, targets = make_problem(RAGGED_SIZES, loss, dtype=torch.float64)
    code = {"best": 0, "plackett_luce": 1, "soft": 2}[loss]
    per_group, unit_grad = C.listwise_ce_fwd_bwd(scores, offsets, targets, code)
    assert per_group.dtype == torch.float32 and per_group.shape == (len(RAGGED_SIZES),)
    assert unit_grad.dtype == torch.float32 and unit_grad.shape == scores.shape
    sums = torch.stack([g.sum() for g in _groups(unit_grad, RAGGED_SIZES)])
    assert_close(sums, torch.zeros(len(RAGGED_SIZES)), 1e-5)
    shift = torch.repeat_interleave(torch.arange(len(RAGGED_SIZES), dtype=torch.float64) * 7.0,
                                    torch.tensor(RAGGED_SIZES))
    per_group2, unit_grad2 = C.listwise_ce_fwd_bwd(scores + shift, offsets, targets, code)
    assert_close(per_group2, per_group, 1e-5)
    assert_close(unit_grad2, unit_grad, 1e-5)


# ---- validation: ValueError naming the argument ----------------------------------------------------


def _valid(loss="best"):
    return make_problem((2, 3), loss)


@pytest.mark.parametrize("mutate,match", [
    (lambda s, o, t: (s[None], o, t), "scores"),
    (lambda s, o, t: (s.long(), o, t), "scores"),
    (lambda s, o, t: (s, o.int(), t), "group_offsets"),
    (lambda s, o, t: (s, o[None], t), "group_offsets"),
    (lambda s, o, t: (s, torch.tensor([1, 2, 5]), t), r"group_offsets\[0\]"),
    (lambda s, o, t: (s, torch.tensor([0, 2, 4]), t), r"group_offsets\[-1\]"),
    (lambda s, o, t: (s, torch.tensor([0, 3, 2, 5]), torch.tensor([0, 0, 0])), "non-decreasing"),
    (lambda s, o, t: (s, torch.tensor([0, 2, 2, 5]), torch.tensor([0, 0, 0])), "empty"),
    (lambda s, o, t: (s, torch.tensor([0]), t), "group_offsets"),
    (lambda s, o, t: (s, o, t.float()), "targets"),
    (lambda s, o, t: (s, o, torch.tensor([0])), "targets"),
    (lambda s, o, t: (s, o, torch.tensor([2, 0])), r"targets\[0\]"),
    (lambda s, o, t: (s, o, torch.tensor([0, -1])), r"targets\[1\]"),
    (lambda s, o, t: (s, o, torch.tensor([0, 3])), r"targets\[1\]"),
    (lambda s, o, t: (torch.tensor([0.0, float("nan"), 1.0, 2.0, 3.0]), o, t), r"scores\[1\]"),
    (lambda s, o, t: (torch.tensor([0.0, 1.0, 1.0, float("inf"), 3.0]), o, t), r"scores\[3\]"),
], ids=["scores-2d", "scores-int", "offsets-int32", "offsets-2d", "offsets-start", "offsets-end",
        "offsets-decreasing", "offsets-empty-group", "offsets-no-group", "targets-float", "targets-length",
        "target-too-big", "target-negative", "target-edge", "scores-nan", "scores-inf"])
def test_best_rejects_bad_input(mutate, match):
    s, o, t = mutate(*_valid("best"))
    with pytest.raises(ValueError, match=match):
        ops.listwise_ce(s, o, t, loss="best")


def test_plackett_luce_rejects_bad_rankings():
    s, o, r = _valid("plackett_luce")
    with pytest.raises(ValueError, match=r"targets \(rankings\).*\[M=5\]"):
        ops.listwise_ce(s, o, r[:4], loss="plackett_luce")
    with pytest.raises(ValueError, match=r"targets\[2\] = 0"):
        ops.listwise_ce(s, o, torch.tensor([1, 2, 0, 1, 1]), loss="plackett_luce")
    with pytest.raises(ValueError, match="targets"):
        ops.listwise_ce(s, o, r.float(), loss="plackett_luce")


def test_soft_rejects_bad_probabilities():
    s, o, p = _valid("soft")
    with pytest.raises(ValueError, match="group 1 sum to"):
        ops.listwise_ce(s, o, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]), loss="soft")
    with pytest.raises(ValueError, match=">= 0"):
        ops.listwise_ce(s, o, torch.tensor([1.5, -0.5, 0.2, 0.3, 0.5]), loss="soft")
    with pytest.raises(ValueError, match="targets"):
        ops.listwise_ce(s, o, p[:3], loss="soft")
    with pytest.raises(ValueError, match="targets"):
        ops.listwise_ce(s, o, (p * 10).long(), loss="soft")


def test_rejects_unknown_loss_and_reduction():
    s, o, t = _valid()
    with pytest.raises(ValueError, match="loss"):
        ops.listwise_ce(s, o, t, loss="hinge")
    with pytest.raises(ValueError, match="reduction"):
        ops.listwise_ce(s, o, t, reduction="max")


@needs_C
def test_C_checks_inputs_itself():
    """Direct calls of mrrm._C (or check_inputs=False) must fail cleanly, never read out of bounds."""
    C = load_C()
    s, o, t = _valid("best")
    with pytest.raises(RuntimeError, match="loss must be"):
        C.listwise_ce_fwd_bwd(s, o, t, 7)
    with pytest.raises(RuntimeError, match="group_offsets"):
        C.listwise_ce_fwd_bwd(s, torch.tensor([0, 2, 9]), t, 0)
    with pytest.raises(RuntimeError, match="group 1 has 0"):
        C.listwise_ce_fwd_bwd(s, torch.tensor([0, 5, 5]), t, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        C.listwise_ce_fwd_bwd(s, o, torch.tensor([0, 3]), 0)
    with pytest.raises(RuntimeError, match="targets"):
        C.listwise_ce_fwd_bwd(s, o, torch.tensor([1, 1, 1]), 1)
    with pytest.raises(RuntimeError, match="scores"):
        C.listwise_ce_fwd_bwd(s.long(), o, t, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.listwise_ce(s, o, torch.tensor([0, 5]), backend="cpu", check_inputs=False)


# ---- the build and the CUDA kernel -----------------------------------------------------------------


def test_extension_has_cuda_when_buildable():
    """With a CUDA build of torch and nvcc on PATH, setup.py compiles the CUDA sources: has_cuda()."""
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: the CUDA sources are not built")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources are not built")
    if os.environ.get("MRRM_BUILD_CUDA", "auto").lower() in ("0", "false", "no", "off"):
        pytest.skip("MRRM_BUILD_CUDA=0 asks for a CPU-only build")
    C = load_C()
    assert C is not None, "mrrm._C failed to import"
    assert C.has_cuda(), "torch is a CUDA build and nvcc is on PATH, but mrrm._C lacks its CUDA sources; " \
                         "rebuild with `MRRM_BUILD_CUDA=1 python setup.py build_ext --inplace`"


def _cuda_backends():
    C = load_C()
    return ["torch", "cuda", "auto"] if C is not None and C.has_cuda() else ["torch"]


@requires_cuda
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_fp32_matches_reference(loss, reduction):
    scores, offsets, targets = make_problem(RAGGED_SIZES + (300,), loss)
    for backend in _cuda_backends():
        out, grad, up = run(backend, scores.cuda(), offsets.cuda(), targets.cuda(), loss, reduction)
        assert out.is_cuda and grad.is_cuda
        ref_out, ref_grad = oracle(scores, offsets, targets, loss, reduction, up)
        assert_close(out, ref_out, 1e-4)
        assert_close(grad, ref_grad, 1e-4)


@requires_cuda
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_bf16_vs_fp32_reference(loss):
    scores, offsets, targets = make_problem(RAGGED_SIZES, loss, dtype=torch.bfloat16)
    for backend in _cuda_backends():
        out, grad, up = run(backend, scores.cuda(), offsets.cuda(), targets.cuda(), loss, "none")
        assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
        ref_out, ref_grad = oracle(scores, offsets, targets, loss, "none", up)
        assert_close(out / ref_out.abs().clamp_min(1).cuda(), ref_out / ref_out.abs().clamp_min(1), 1e-2)
        assert_close(grad, ref_grad, 1e-2)


@requires_cuda
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_many_groups_matches_cpu_kernel(loss):
    """Thousands of groups (many blocks, partial last block) of sizes 1..70: CUDA vs the C++ CPU
    kernel, which runs the same per-group code serially."""
    if "cuda" not in _cuda_backends():
        pytest.skip("mrrm._C was built without CUDA")
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 71, (3001,), generator=g).tolist()
    scores, offsets, targets = make_problem(sizes, loss)
    out_gpu, grad_gpu, up = run("cuda", scores.cuda(), offsets.cuda(), targets.cuda(), loss, "none")
    out_cpu, grad_cpu, _ = run("cpu", scores, offsets, targets, loss, "none", upstream=up)
    assert_close(out_gpu, out_cpu, 1e-4)
    assert_close(grad_gpu, grad_cpu, 1e-4)


@requires_cuda
def test_cuda_kernel_flags_bad_offsets_with_nan():
    """The CUDA launcher does not read offsets back (no sync); a malformed group gets NaN instead of
    an out-of-bounds read."""
    C = load_C()
    if C is None or not C.has_cuda():
        pytest.skip("mrrm._C was built without CUDA")
    scores = torch.randn(5, device="cuda")
    per_group, _ = C.listwise_ce_fwd_bwd(scores, torch.tensor([0, 3, 2, 5], device="cuda"),
                                         torch.zeros(3, dtype=torch.int64, device="cuda"), 0)
    per_group = per_group.cpu()
    assert math.isnan(float(per_group[1])) and math.isfinite(float(per_group[0]))
