"""The Triton gather_value_head (mrrm.kernels.value_head) against the pure-torch reference.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
in fp32 and fp16 (bf16 is broken in the interpreter), with small blocks so that M, H and D are not
multiples of any block size; with a GPU the same checks run on CUDA, plus bf16 at the paper's sizes.

Every check compares the output and the gradients of hidden, w1, b1, w2 and b2 with the reference
evaluated in fp64 on the same (dtype-rounded) inputs. Errors are measured relative to the largest
entry of the reference tensor, max|x - ref| / max|ref|:
  fp32, interpreter:                     2e-5 (fp32 tl.dot, K <= 72)
  fp32, CUDA (3xTF32 dots):              1e-4 (summation order over H = 2560)
  fp16 hidden, fp32 weights:             fp32 results 2e-5; the fp16 hidden gradient 2e-3 (its rounding, 2^-11)
  fp16 hidden, fp16 weights:             5e-3 (fp16 output and gradients; dz rounded to fp16 for the dots)
  bf16 hidden, fp32 weights (CUDA):      fp32 results 1e-4; the bf16 hidden gradient 1e-2 (2^-8 rounding)
  bf16 hidden, bf16 weights (CUDA):      2e-2 (bf16 output and gradients; dz rounded to bf16 for the dots)
Rows of the hidden-state gradient that no position gathers must be exactly zero.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import HAS_CUDA, requires_cuda  # noqa: E402

from mrrm import ops
from mrrm.kernels import value_head as vh  # noqa: E402
from mrrm.ops import oracle
from mrrm.ops.value_head import gather_value_head_triton  # noqa: E402

ACTIVATIONS = oracle.ACTIVATIONS
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Small blocks for the interpreter (its cost is per program): none divides M, H or D below.
SMALL = vh.ValueHeadConfig(fwd_block_m=16, fwd_block_d=16, fwd_block_k=32, fwd_warps=4, fwd_stages=1,
                           dw_block_d=16, dw_block_h=32, dw_block_m=16,
                           dh_block_m=16, dh_block_h=32, dh_block_d=16, bwd_warps=4, bwd_stages=1,
                           reduce_block=16)
DEVICE = "cuda" if HAS_CUDA else "cpu"
FP32_TOL = 1e-4 if HAS_CUDA else 2e-5


def make_inputs(T, H, D, positions, *, hidden_dtype=torch.float32, weight_dtype=torch.float32, device=DEVICE):
    """Random inputs rounded to their dtypes. w1 is scaled so that z = h @ w1.T + b1 has unit-ish
    spread: every activation is evaluated on both sides of its bend."""
    hidden = torch.randn(T, H, dtype=torch.float64)
    w1 = torch.randn(D, H, dtype=torch.float64) * (1.5 / math.sqrt(H))
    b1 = torch.randn(D, dtype=torch.float64) * 0.5
    w2 = torch.randn(1, D, dtype=torch.float64) / math.sqrt(D)
    b2 = torch.randn(1, dtype=torch.float64)
    hidden = hidden.to(device=device, dtype=hidden_dtype)
    weights = [t.to(device=device, dtype=weight_dtype) for t in (w1, b1, w2, b2)]
    return hidden, torch.as_tensor(positions, dtype=torch.int64, device=device), *weights


def unique_positions(T, M):
    return torch.randperm(T)[:M]


def run(fn, hidden, positions, w1, b1, w2, b2, grad_out, **kw):
    """Output and the gradients of (hidden, w1, b1, w2, b2) for the upstream gradient grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, w1, b1, w2, b2)]
    h, a, b, c, d = leaves
    y = fn(h, positions, a, b, c, d, **kw)
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    return y.detach(), grads


def run_reference(hidden, positions, w1, b1, w2, b2, grad_out, **kw):
    """The reference in fp64 on the same rounded inputs."""
    f64 = [t.double() for t in (hidden, w1, b1, w2, b2)]
    return run(oracle.gather_value_head, f64[0], positions, *f64[1:], grad_out.double(), **kw)


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


NAMES = ("y", "grad_hidden", "grad_w1", "grad_b1", "grad_w2", "grad_b2")


def check(hidden, positions, w1, b1, w2, b2, *, tol, activation="silu", scale=0.7, config=SMALL):
    """Triton vs reference: values, all gradients, dtypes, and untouched hidden-gradient rows."""
    M = positions.shape[0]
    grad_out = torch.randn(M, dtype=torch.float64, device=hidden.device)
    kw = dict(activation=activation, scale=scale)
    y, grads = run(gather_value_head_triton, hidden, positions, w1, b1, w2, b2, grad_out, config=config, **kw)
    y_ref, grads_ref = run_reference(hidden, positions, w1, b1, w2, b2, grad_out, **kw)

    assert y.dtype == torch.promote_types(hidden.dtype, w1.dtype)
    for g, t in zip(grads, (hidden, w1, b1, w2, b2)):
        assert g.dtype == t.dtype and g.shape == t.shape
    tols = tol if isinstance(tol, dict) else {}
    for name, x, ref in zip(NAMES, (y, *grads), (y_ref, *grads_ref)):
        t = tols.get(name, tols.get("default", tol))
        err = rel_err(x, ref)
        assert err <= t, f"{activation}: {name} relative error {err:.2e} > {t:.0e}"

    gathered = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    gathered[positions] = True
    assert torch.equal(grads[0][~gathered], torch.zeros_like(grads[0][~gathered])), \
        "rows of the hidden gradient that no position gathers must stay exactly zero"
    assert grads[0][gathered].abs().amax(dim=1).gt(0).all()
    return y, grads


# ------------------------------------------------------------------------------------------------
# Interpreter (or GPU) tests in fp32 / fp16
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference_every_activation(activation):
    # M = 19, H = 72, D = 40: none a multiple of the blocks (16, 32).
    inputs = make_inputs(37, 72, 40, unique_positions(37, 19))
    check(*inputs, tol=FP32_TOL, activation=activation)


@pytest.mark.parametrize("split_k", [2, 3, 100])
def test_split_k_forward(split_k):
    """fwd_split_k: the H loop split over more programs (K = 72 in 32-wide steps: 2 splits of 64 + 8,
    3 of 32, and 100 clamped to 3), partial sums added in a fixed order by the epilogue kernel:
    values and gradients as the reference, the output within fp32 rounding of the unsplit one."""
    import dataclasses

    inputs = make_inputs(37, 72, 40, unique_positions(37, 19))
    y, _ = check(*inputs, tol=FP32_TOL, config=dataclasses.replace(SMALL, fwd_split_k=split_k))
    y1, _ = check(*inputs, tol=FP32_TOL, config=SMALL)
    assert (y - y1).abs().max().item() <= 1e-5 * y1.abs().max().item()


@pytest.mark.parametrize("activation", ("silu", "selu"))
def test_repeated_positions_add_up(activation):
    # A pair inside one M block, a triple spanning two M blocks (block 16), the last row of hidden.
    positions = [3, 9, 3, 30, 7, 11, 12, 13, 14, 15, 16, 17, 18, 30, 1, 2, 36, 4, 30, 5, 6]
    inputs = make_inputs(37, 72, 40, positions)
    check(*inputs, tol=FP32_TOL, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_derivative_at_zero(activation):
    # A gathered row of zeros and zero biases give z = 0 exactly: torch's conventions at the kink
    # (relu'(0) = 0, selu'(0) = lambda * alpha) must hold.
    hidden, positions, w1, b1, w2, b2 = make_inputs(37, 72, 40, [3, 8, 20])
    hidden[8] = 0
    b1[::2] = 0
    check(hidden, positions, w1, b1, w2, b2, tol=FP32_TOL, activation=activation)


def test_single_row():
    inputs = make_inputs(37, 72, 40, [36])
    check(*inputs, tol=FP32_TOL, activation="gelu", scale=1.0)


def test_empty_positions():
    hidden, positions, w1, b1, w2, b2 = make_inputs(5, 16, 16, [])
    leaves = [t.clone().requires_grad_() for t in (hidden, w1, b1, w2, b2)]
    y = gather_value_head_triton(leaves[0], positions, *leaves[1:], config=SMALL)
    assert y.shape == (0,)
    grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
    for g, t in zip(grads, leaves):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype and not g.any()


def test_fp16_hidden_with_fp32_head():
    # The mixed path: operands taken in fp32 for the dots; fp32 output and weight gradients.
    inputs = make_inputs(37, 72, 40, [0, 5, 9, 5, 20, 33, 14, 2, 8, 21, 22, 23, 24, 25, 26, 27, 28],
                         hidden_dtype=torch.float16, weight_dtype=torch.float32)
    check(*inputs, tol={"default": FP32_TOL, "grad_hidden": 2e-3}, activation="tanh")


def test_fp16_hidden_with_fp16_head():
    # The 16-bit path: tiles fed to tl.dot as fp16, dz rounded to fp16.
    inputs = make_inputs(37, 72, 40, unique_positions(37, 19), hidden_dtype=torch.float16,
                         weight_dtype=torch.float16)
    check(*inputs, tol=5e-3, activation="silu")


def test_strided_hidden():
    # hidden as a column slice of a wider buffer: row stride 80 != H = 72.
    hidden, positions, w1, b1, w2, b2 = make_inputs(37, 72, 40, unique_positions(37, 19))
    wide = torch.zeros(37, 80, dtype=hidden.dtype, device=hidden.device)
    wide[:, :72] = hidden
    strided = wide[:, :72]
    assert strided.stride(0) == 80
    grad_out = torch.randn(19, dtype=torch.float64, device=hidden.device)
    y, grads = run(gather_value_head_triton, strided, positions, w1, b1, w2, b2, grad_out, config=SMALL)
    y_ref, grads_ref = run_reference(hidden, positions, w1, b1, w2, b2, grad_out)
    for name, x, ref in zip(NAMES, (y, *grads), (y_ref, *grads_ref)):
        assert rel_err(x, ref) <= FP32_TOL, name


def test_default_configs():
    # No config override: the GPU block tables (small M and large M) in the interpreter.
    for M in (7, 70):
        inputs = make_inputs(80, 48, 40, unique_positions(80, M))
        check(*inputs, tol=FP32_TOL, activation="relu", config=None)


@pytest.mark.parametrize("which", ("hidden_only", "head_only"))
def test_partial_requires_grad(which):
    # A frozen head (LoRA on the backbone) or a frozen backbone: only the needed gradients.
    hidden, positions, w1, b1, w2, b2 = make_inputs(37, 72, 40, [4, 4, 17, 30, 2])
    grad_out = torch.randn(5, dtype=torch.float64, device=hidden.device)
    _, grads_ref = run_reference(hidden, positions, w1, b1, w2, b2, grad_out)
    hidden = hidden.clone().requires_grad_(which == "hidden_only")
    head = [t.clone().requires_grad_(which == "head_only") for t in (w1, b1, w2, b2)]
    y = gather_value_head_triton(hidden, positions, *head, config=SMALL)
    leaves = [hidden] if which == "hidden_only" else head
    grads = torch.autograd.grad(y, leaves, grad_out.float())
    refs = grads_ref[:1] if which == "hidden_only" else grads_ref[1:]
    for g, ref in zip(grads, refs):
        assert rel_err(g, ref) <= FP32_TOL


def test_no_grad_inference_and_public_op():
    hidden, positions, w1, b1, w2, b2 = make_inputs(37, 72, 40, unique_positions(37, 19))
    y_ref = oracle.gather_value_head(hidden.double(), positions, w1.double(), b1.double(), w2.double(),
                                        b2.double(), activation="gelu", scale=0.5)
    with torch.no_grad():
        y = gather_value_head_triton(hidden, positions, w1, b1, w2, b2, activation="gelu", scale=0.5,
                                        config=SMALL)
    assert rel_err(y, y_ref) <= FP32_TOL
    # The public op routes backend="triton" here (default blocks).
    y_op = ops.gather_value_head(hidden, positions, w1, b1, w2, b2, activation="gelu", scale=0.5, backend="triton")
    assert rel_err(y_op, y_ref) <= FP32_TOL


def test_deterministic():
    inputs = make_inputs(37, 72, 40, unique_positions(37, 19))
    grad_out = torch.randn(19, dtype=torch.float64, device=inputs[0].device)
    y1, g1 = run(gather_value_head_triton, *inputs, grad_out, config=SMALL)
    y2, g2 = run(gather_value_head_triton, *inputs, grad_out, config=SMALL)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("positions, expected", [
    ([0, 1, 2, 3], 0),
    ([5], 0),
    ([4, 9, 4], 1),
    ([7, 7, 7, 1, 1], 3),  # a position held by k entries counts k - 1
    (list(range(30)) + [29, 0, 15], 3),  # repeats across the reduce kernel's blocks of 16
])
def test_repeat_detection(positions, expected):
    hidden, positions, w1, b1, w2, b2 = make_inputs(37, 32, 16, positions)
    _, _, repeats = vh._forward(hidden, positions, w1, b1, w2, b2, "silu", 1.0, SMALL,
                                store_z=True, detect_repeats=True)
    assert int(repeats.item()) == expected


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 backbones with fp32 and bf16 heads at the paper's sizes, and fp32
# ------------------------------------------------------------------------------------------------
def _paper_positions(T, M, repeat):
    positions = torch.randperm(T)[:M]
    if repeat:
        positions[M - 1] = positions[0]
        positions[M // 2] = positions[0]
    return positions


@requires_cuda
@pytest.mark.parametrize("M", (64, 300))
@pytest.mark.parametrize("weight_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_bf16_backbone(M, weight_dtype, activation):
    inputs = make_inputs(4096, 2560, 1024, _paper_positions(4096, M, repeat=M == 300),
                         hidden_dtype=torch.bfloat16, weight_dtype=weight_dtype, device="cuda")
    if weight_dtype == torch.float32:
        tol = {"default": 1e-4, "grad_hidden": 1e-2}
    else:
        tol = 2e-2
    check(*inputs, tol=tol, activation=activation, scale=1 / math.sqrt(2560), config=None)


@requires_cuda
@pytest.mark.parametrize("repeat", (False, True))
def test_cuda_fp32(repeat):
    inputs = make_inputs(1000, 640, 320, _paper_positions(1000, 130, repeat), device="cuda")
    check(*inputs, tol=1e-4, activation="silu", config=None)


@requires_cuda
def test_cuda_deterministic():
    inputs = make_inputs(4096, 2560, 1024, _paper_positions(4096, 64, False), hidden_dtype=torch.bfloat16,
                         device="cuda")
    grad_out = torch.randn(64, dtype=torch.float64, device="cuda")
    y1, g1 = run(gather_value_head_triton, *inputs, grad_out)
    y2, g2 = run(gather_value_head_triton, *inputs, grad_out)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90
# ------------------------------------------------------------------------------------------------
def test_aot_specs_cover_the_gpu_path():
    specs = vh.AOT_SPECS
    assert len(specs) < 24
    kernels = {s["kernel"] for s in specs}
    assert kernels == {vh._vh_fwd_kernel, vh._vh_fwd_reduce_kernel, vh._vh_bwd_kernel, vh._vh_fwd_split_epilogue_kernel}
    assert {s["constexprs"].get("SPLIT_K") for s in specs if s["kernel"] is vh._vh_fwd_kernel} == {1, 4, 8}
    gemm = [s for s in specs if s["kernel"] in (vh._vh_fwd_kernel, vh._vh_bwd_kernel)]
    assert all(s["signature"]["hidden_ptr"] == "*bf16" for s in gemm)
    for kernel in (vh._vh_fwd_kernel, vh._vh_bwd_kernel):
        mine = [s for s in gemm if s["kernel"] is kernel]
        assert {s["constexprs"]["ACTIVATION"] for s in mine} == set(ACTIVATIONS)
        assert {s["signature"]["w1_ptr"] for s in mine} == {"*fp32", "*bf16"}
        blocks = {tuple(v for k, v in s["constexprs"].items() if "BLOCK" in k) for s in mine}
        assert len(blocks) == len(vh.GPU_CONFIGS)
    for s in specs:  # every non-constexpr argument is typed, every constexpr given
        args = s["kernel"].arg_names
        assert list(s["signature"]) == args
        assert {a for a, t in s["signature"].items() if t == "constexpr"} == set(s["constexprs"])


@pytest.mark.slow
def test_aot_compile_sm90():
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mrrm.kernels.aot", "--only", "value_head"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    for spec in vh.AOT_SPECS:
        assert f"OK   value_head.{spec['name']}:" in out, f"{spec['name']} did not compile:\n{out[-4000:]}"
    assert "FAIL value_head." not in out
