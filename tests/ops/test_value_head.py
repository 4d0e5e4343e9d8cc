"""gather_value_head: every backend against the pure-torch reference (values and the gradients of
hidden, w1, b1, w2, b2), the scatter-only backward, input validation, and the GPU backends when a
GPU is present.

Tolerances:
  fp32 backends vs the fp64 reference: rtol = atol = 1e-5 (fp32 GEMMs over H, D <= 64).
  bf16 inputs: the backend result is rounded to bf16 (2^-8 relative) where the output/gradient
    dtype is bf16, so rtol = atol = 2e-2 against the fp64 reference on the same bf16-rounded
    inputs; with fp32 weights the weight gradients are fp32 and are held to 1e-4.
  CUDA fp32: rtol = atol = 1e-4 (GPU GEMM summation order over H).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_cuda

from mrrm import ops
from mrrm.common import ACTIVATIONS
from mrrm.ops import oracle as torch_ops
from mrrm.ops._dispatch import OP_BACKENDS, load_C

CPU_BACKENDS = ("torch", "cpu")
needs_C = pytest.mark.skipif(load_C() is None, reason="mrrm._C is not built")


def make_head(T=50, H=32, D=24, M=9, *, hidden_dtype=torch.float32, weight_dtype=torch.float32, repeat=True):
    """Random inputs, rounded to their dtypes. w1 is scaled so that z = h @ w1^T + b1 has unit-ish
    spread, reaching both sides of every activation's bend."""
    hidden = torch.randn(T, H, dtype=torch.float64)
    positions = torch.randint(0, T, (M,))
    if repeat and M >= 3:
        positions[-1] = positions[0]  # a repeated position: its gradients must add up
        positions[1] = T - 1  # the last row, an edge of the range
    w1 = torch.randn(D, H, dtype=torch.float64) * (1.5 / math.sqrt(H))
    b1 = torch.randn(D, dtype=torch.float64) * 0.5
    w2 = torch.randn(1, D, dtype=torch.float64) / math.sqrt(D)
    b2 = torch.randn(1, dtype=torch.float64)
    return (hidden.to(hidden_dtype), positions, w1.to(weight_dtype), b1.to(weight_dtype), w2.to(weight_dtype),
            b2.to(weight_dtype))


def run(backend, inputs, activation, scale, upstream=None):
    """Scores and the gradients of sum(scores * upstream) w.r.t. hidden, w1, b1, w2, b2."""
    hidden, positions, w1, b1, w2, b2 = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, w1, b1, w2, b2)]
    h, a1, c1, a2, c2 = leaves
    out = ops.gather_value_head(h, positions, a1, c1, a2, c2, activation=activation, scale=scale, backend=backend)
    if upstream is None:
        upstream = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64)
    (out.double() * upstream.to(out.device)).sum().backward()
    return out.detach(), [t.grad for t in leaves], upstream


def oracle(inputs, activation, scale, upstream):
    """The reference in fp64 on the same (already rounded) inputs, on the CPU."""
    hidden, positions, w1, b1, w2, b2 = inputs
    leaves = [t.detach().to("cpu", torch.float64).requires_grad_(True) for t in (hidden, w1, b1, w2, b2)]
    h, a1, c1, a2, c2 = leaves
    out = torch_ops.gather_value_head(h, positions.cpu(), a1, c1, a2, c2, activation=activation, scale=scale)
    (out * upstream.cpu()).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


NAMES = ("hidden", "w1", "b1", "w2", "b2")


# ---- every CPU backend vs the fp64 reference ------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M", [1, 2, 9, 40])
def test_fp32_matches_reference(backend, activation, M):
    inputs = make_head(M=M)
    scale = 1.0 / math.sqrt(32)
    out, grads, up = run(backend, inputs, activation, scale)
    ref_out, ref_grads = oracle(inputs, activation, scale, up)
    assert out.dtype == torch.float32 and out.shape == (M,)
    assert_close(out, ref_out, 1e-5, "scores")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == torch.float32, name
        assert_close(g, r, 1e-5, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16-head", "fp32-head"])
def test_bf16_hidden_vs_fp32_reference(backend, activation, weight_dtype):
    """A bf16 backbone with a bf16 or fp32 head. Scores come back in the promoted dtype; gradients
    in their input's dtype."""
    inputs = make_head(M=12, hidden_dtype=torch.bfloat16, weight_dtype=weight_dtype)
    out, grads, up = run(backend, inputs, activation, 0.5)
    ref_out, ref_grads = oracle(inputs, activation, 0.5, up)
    assert out.dtype == torch.promote_types(torch.bfloat16, weight_dtype)
    assert_close(out, ref_out, 2e-2, "scores")
    assert grads[0].dtype == torch.bfloat16
    assert_close(grads[0], ref_grads[0], 2e-2, "hidden")
    weight_tol = 2e-2 if weight_dtype == torch.bfloat16 else 1e-4
    for name, g, r in zip(NAMES[1:], grads[1:], ref_grads[1:]):
        assert g.dtype == weight_dtype, name
        assert_close(g, r, weight_tol, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(backend, seed):
    g = torch.Generator().manual_seed(seed)
    T, H, D, M = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((1, 80), (1, 48), (1, 40), (1, 60)))
    activation = ACTIVATIONS[seed % len(ACTIVATIONS)]
    inputs = make_head(T=T, H=H, D=D, M=M)
    out, grads, up = run(backend, inputs, activation, 0.3)
    ref_out, ref_grads = oracle(inputs, activation, 0.3, up)
    assert_close(out, ref_out, 1e-5, "scores")
    for name, gr, r in zip(NAMES, grads, ref_grads):
        assert_close(gr, r, 1e-5, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_positions(backend):
    """M = 0: empty scores, zero gradients everywhere."""
    inputs = list(make_head(M=0))
    out, grads, _ = run(backend, inputs, "silu", 1.0)
    assert out.shape == (0,)
    for name, g in zip(NAMES, grads):
        assert g is not None and not g.any(), name


# ---- the backward writes only the gathered rows -----------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hidden_grad_only_on_gathered_rows_and_repeats_add_up(backend):
    hidden, _, w1, b1, w2, b2 = make_head(T=30)
    once = torch.tensor([4, 17])
    thrice = torch.tensor([4, 17, 4, 4, 17, 17])
    ones = torch.ones(6, dtype=torch.float64)
    _, g_once, _ = run(backend, (hidden, once, w1, b1, w2, b2), "gelu", 1.0, upstream=ones[:2])
    out3, g_thrice, _ = run(backend, (hidden, thrice, w1, b1, w2, b2), "gelu", 1.0, upstream=ones)
    gh = g_thrice[0]
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[[4, 17]] = False
    assert not gh[untouched].any(), "rows that were not gathered must have zero gradient"
    assert gh[4].abs().sum() > 0 and gh[17].abs().sum() > 0
    assert_close(gh, 3 * g_once[0], 1e-5, "hidden grad of a position used three times")
    assert_close(out3[[0, 2, 3]], out3[0].expand(3), 1e-6, "identical rows give identical scores")
    for name, a, b in zip(NAMES[1:], g_thrice[1:], g_once[1:]):
        assert_close(a, 3 * b, 1e-5, name)


@needs_C
def test_C_reads_strided_hidden_without_copy():
    """The C++ gathers rows through hidden's strides: a transposed view gives the same results."""
    C = load_C()
    hidden, positions, w1, b1, w2, b2 = make_head(T=20, H=16, D=8, M=5)
    strided = hidden.t().contiguous().t()  # same values, stride (1, T)
    assert not strided.is_contiguous()
    out_c, z_c = C.gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, "tanh", 0.5)
    out_s, z_s = C.gather_value_head_fwd(strided, positions, w1, b1, w2, b2, "tanh", 0.5)
    assert_close(out_s, out_c, 0.0, "scores")
    assert_close(z_s, z_c, 0.0, "z")
    go = torch.randn(5)
    grads_c = C.gather_value_head_bwd(go, hidden, positions, w1, w2, z_c, "tanh", 0.5, True)
    grads_s = C.gather_value_head_bwd(go, strided, positions, w1, w2, z_s, "tanh", 0.5, True)
    for name, a, b in zip(NAMES, grads_s, grads_c):
        assert_close(a, b, 0.0, name)


@needs_C
def test_C_skips_hidden_grad_when_not_needed():
    C = load_C()
    hidden, positions, w1, b1, w2, b2 = make_head(M=4)
    _, z = C.gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, "relu", 1.0)
    grads = C.gather_value_head_bwd(torch.ones(4), hidden, positions, w1, w2, z, "relu", 1.0, False)
    assert grads[0] is None
    # A frozen backbone (hidden without requires_grad) still trains the head.
    leaves = [t.clone().requires_grad_(True) for t in (w1, b1, w2, b2)]
    ops.gather_value_head(hidden, positions, *leaves, activation="relu", backend="cpu").sum().backward()
    assert all(t.grad is not None for t in leaves)


# ---- gradcheck ------------------------------------------------------------------------------------


def _gradcheck_inputs(activation, eps):
    """Small fp64 inputs. For relu, redraw until no pre-activation lies within 10*eps of the kink,
    where finite differences are meaningless."""
    for _ in range(100):
        hidden, positions, w1, b1, w2, b2 = make_head(T=6, H=5, D=4, M=4, hidden_dtype=torch.float64,
                                                      weight_dtype=torch.float64)
        z = hidden[positions] @ w1.t() + b1
        if activation != "relu" or bool((z.abs() > 10 * eps).all()):
            return hidden, positions, w1, b1, w2, b2
    raise AssertionError("could not draw inputs away from relu's kink")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_reference(activation):
    hidden, positions, w1, b1, w2, b2 = _gradcheck_inputs(activation, 1e-6)
    leaves = tuple(t.requires_grad_(True) for t in (hidden, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(
        lambda h, a1, c1, a2, c2: torch_ops.gather_value_head(h, positions, a1, c1, a2, c2, activation=activation,
                                                              scale=0.7), leaves)


@needs_C
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_cpu_backend(activation):
    """The C++ accepts fp64 but computes in fp32 (its contract: fp32 accumulation), so finite
    differences carry fp32 rounding (~1e-7 / eps): eps = 1e-3, tolerances of 2e-3."""
    eps = 1e-3
    hidden, positions, w1, b1, w2, b2 = _gradcheck_inputs(activation, eps)
    leaves = tuple(t.requires_grad_(True) for t in (hidden, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(
        lambda h, a1, c1, a2, c2: ops.gather_value_head(h, positions, a1, c1, a2, c2, activation=activation,
                                                        scale=0.7, backend="cpu"),
        leaves, eps=eps, atol=2e-3, rtol=2e-3)


# ---- validation: ValueError naming the argument ----------------------------------------------------


@pytest.mark.parametrize("mutate,match", [
    (lambda h, p, w1, b1, w2, b2: (h[None], p, w1, b1, w2, b2), "hidden"),
    (lambda h, p, w1, b1, w2, b2: (h.long(), p, w1, b1, w2, b2), "hidden"),
    (lambda h, p, w1, b1, w2, b2: (h, p.int(), w1, b1, w2, b2), "positions"),
    (lambda h, p, w1, b1, w2, b2: (h, p[None], w1, b1, w2, b2), "positions"),
    (lambda h, p, w1, b1, w2, b2: (h, p.float(), w1, b1, w2, b2), "positions"),
    (lambda h, p, w1, b1, w2, b2: (h, torch.tensor([0, -1]), w1, b1, w2, b2), "positions.*-1"),
    (lambda h, p, w1, b1, w2, b2: (h, torch.tensor([0, 50]), w1, b1, w2, b2), "positions.*50"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1[:, :-1], b1, w2, b2), "w1"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1[0], b1, w2, b2), "w1"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1, b1[:-1], w2, b2), "b1"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1, b1.double(), w2, b2), "b1"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1, b1, w2.t(), b2), "w2"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1, b1, w2[:, :-1], b2), "w2"),
    (lambda h, p, w1, b1, w2, b2: (h, p, w1, b1, w2, torch.zeros(2)), "b2"),
], ids=["hidden-3d", "hidden-int", "positions-int32", "positions-2d", "positions-float", "positions-negative",
        "positions-too-big", "w1-width", "w1-1d", "b1-size", "b1-dtype", "w2-transposed", "w2-size", "b2-size"])
def test_rejects_bad_input(mutate, match):
    args = mutate(*make_head(T=50, M=4))
    with pytest.raises(ValueError, match=match):
        ops.gather_value_head(*args)


def test_rejects_bad_activation_and_scale():
    args = make_head(M=3)
    with pytest.raises(ValueError, match="activation"):
        ops.gather_value_head(*args, activation="swish")
    with pytest.raises(ValueError, match="scale"):
        ops.gather_value_head(*args, scale=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        ops.gather_value_head(*args, scale=float("inf"))


@needs_C
def test_C_checks_inputs_itself():
    """Direct calls of mrrm._C (or check_inputs=False) fail with a clear error, never read out of range."""
    C = load_C()
    hidden, positions, w1, b1, w2, b2 = make_head(T=50, M=3)
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        C.gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, "swish", 1.0)
    with pytest.raises(RuntimeError, match=r"positions\[1\]=50"):
        C.gather_value_head_fwd(hidden, torch.tensor([0, 50]), w1, b1, w2, b2, "silu", 1.0)
    with pytest.raises(RuntimeError, match="w1"):
        C.gather_value_head_fwd(hidden, positions, w1[:, 1:], b1, w2, b2, "silu", 1.0)
    with pytest.raises(RuntimeError, match="z must be"):
        C.gather_value_head_bwd(torch.ones(3), hidden, positions, w1, w2, torch.zeros(3, 5), "silu", 1.0, True)
    with pytest.raises(RuntimeError, match="unknown activation"):
        C.gather_value_head_bwd(torch.ones(3), hidden, positions, w1, w2, torch.zeros(3, 24), "elu", 1.0, True)
    with pytest.raises(RuntimeError, match="positions"):
        ops.gather_value_head(hidden, torch.tensor([-2]), w1, b1, w2, b2, backend="cpu", check_inputs=False)


def test_auto_backend_on_cpu_is_the_cpp_kernel():
    assert ops.choose_backend("gather_value_head", torch.device("cpu")) in ("cpu", "torch")


# ---- GPU backends ----------------------------------------------------------------------------------


def _gpu_backends():
    return [b for b in OP_BACKENDS["gather_value_head"]["have"] if b != "cpu"]


@requires_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_fp32_matches_reference(activation):
    inputs = make_head(T=300, H=64, D=128, M=37)
    cuda_inputs = [t.cuda() for t in inputs]
    for backend in _gpu_backends() + ["auto"]:
        out, grads, up = run(backend, cuda_inputs, activation, 0.125)
        ref_out, ref_grads = oracle(inputs, activation, 0.125, up)
        assert out.is_cuda
        assert_close(out, ref_out, 1e-4, f"{backend} scores")
        for name, g, r in zip(NAMES, grads, ref_grads):
            assert_close(g, r, 1e-4, f"{backend} {name}")


@requires_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_bf16_vs_fp32_reference(activation):
    inputs = make_head(T=300, H=64, D=128, M=37, hidden_dtype=torch.bfloat16, weight_dtype=torch.bfloat16)
    cuda_inputs = [t.cuda() for t in inputs]
    for backend in _gpu_backends() + ["auto"]:
        out, grads, up = run(backend, cuda_inputs, activation, 0.125)
        ref_out, ref_grads = oracle(inputs, activation, 0.125, up)
        assert out.dtype == torch.bfloat16
        assert_close(out, ref_out, 2e-2, f"{backend} scores")
        for name, g, r in zip(NAMES, grads, ref_grads):
            assert g.dtype == torch.bfloat16
            assert_close(g, r, 2e-2, f"{backend} {name}")


def test_one_activation_list_across_python_cpp_and_triton():
    """mrrm.common.ACTIVATIONS is the one list: the C++ kernel's name table, the Triton kernel's
    branches and the model's modules implement exactly these names."""
    import re
    from pathlib import Path

    from mrrm.model.parts import ACTIVATION_MODULES
    root = Path(__file__).resolve().parents[2]
    cpp = re.findall(r'name == "(\w+)"', (root / "csrc" / "value_head.cpp").read_text())
    triton_src = (root / "kernels" / "value_head.py").read_text()
    triton_names = re.findall(r'ACTIVATION == "(\w+)"', triton_src)
    assert tuple(cpp) == ACTIVATIONS
    # the forward and the derivative each branch on every name but the last, which is their `else`
    assert set(triton_names) == set(ACTIVATIONS[:-1]) and len(triton_names) == 2 * (len(ACTIVATIONS) - 1)
    assert tuple(ACTIVATION_MODULES) == ACTIVATIONS
    assert torch_ops.ACTIVATIONS is ACTIVATIONS
    x = torch.linspace(-2, 2, 9)
    for name in ACTIVATIONS:  # the reference has each, and it is the model module's function
        torch.testing.assert_close(torch_ops.activation_fn(name)(x), ACTIVATION_MODULES[name]()(x))
