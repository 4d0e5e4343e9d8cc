"""gather_value_head: the value head evaluated on the M score rows of a [T, H] hidden state only.

Common practice runs the head on all T tokens and then gathers M of them; here the M rows are
gathered first (never a [T, H] copy, never the head on T tokens) and the backward writes only those
M rows of the hidden-state gradient.
"""
from __future__ import annotations

import torch

from .. import reference
from ..common import ACTIVATIONS, check_choice
from ._dispatch import C_or_raise, choose_backend
from ._validate import FLOAT_DTYPES, check_tensor


def _validate(hidden, positions, w1, b1, w2, b2, activation, scale):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    dev = hidden.device
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int64,), device=dev)
    check_tensor("w1", w1, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    T, H = hidden.shape
    D = w1.shape[0]
    if w1.shape[1] != H:
        raise ValueError(f"w1 must be [D, H={H}] (nn.Linear layout), got {tuple(w1.shape)}")
    check_tensor("b1", b1, ndim=1, dtypes=(w1.dtype,), device=dev)
    check_tensor("w2", w2, ndim=2, dtypes=(w1.dtype,), device=dev)
    check_tensor("b2", b2, ndim=1, dtypes=(w1.dtype,), device=dev)
    if b1.shape[0] != D:
        raise ValueError(f"b1 must be [D={D}], got {tuple(b1.shape)}")
    if tuple(w2.shape) != (1, D):
        raise ValueError(f"w2 must be [1, D={D}] (nn.Linear layout), got {tuple(w2.shape)}")
    if tuple(b2.shape) != (1,):
        raise ValueError(f"b2 must be [1], got {tuple(b2.shape)}")
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= T:
            bad = lo if lo < 0 else hi
            raise ValueError(f"positions must index rows of hidden (0 <= p < T={T}), got {bad}")
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


class _CpuGatherValueHead(torch.autograd.Function):
    """mrrm._C forward and backward (C++, fp32 accumulation, bf16/fp32 inputs)."""

    @staticmethod
    def forward(ctx, hidden, positions, w1, b1, w2, b2, activation, scale):
        C = C_or_raise("gather_value_head")
        out, z = C.gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, activation, float(scale))
        ctx.save_for_backward(hidden, positions, w1, w2, z)
        ctx.activation, ctx.scale = activation, float(scale)
        return out.to(torch.promote_types(hidden.dtype, w1.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        hidden, positions, w1, w2, z = ctx.saved_tensors
        C = C_or_raise("gather_value_head")
        g_hidden, g_w1, g_b1, g_w2, g_b2 = C.gather_value_head_bwd(
            grad_out.contiguous(), hidden, positions, w1, w2, z, ctx.activation, ctx.scale,
            bool(ctx.needs_input_grad[0]))
        return (g_hidden if ctx.needs_input_grad[0] else None, None, g_w1, g_b1, g_w2, g_b2, None, None)


def gather_value_head(hidden, positions, w1, b1, w2, b2, *, activation="silu", scale=1.0, backend=None,
                      check_inputs=True):
    """scale * (act(hidden[positions] @ w1.T + b1) @ w2.T + b2) -> scores [M].

    hidden [T, H]; positions int64 [M] (repeats allowed; their gradients add up); w1 [D, H], b1 [D],
    w2 [1, D], b2 [1] in nn.Linear layouts; activation in silu, gelu (erf), relu, selu, tanh.
    The result has the promoted dtype of hidden and w1; accumulation is fp32.
    """
    if check_inputs:
        _validate(hidden, positions, w1, b1, w2, b2, activation, scale)
    which = choose_backend("gather_value_head", hidden.device, backend)
    if which == "reference":
        return reference.gather_value_head(hidden, positions, w1, b1, w2, b2, activation=activation, scale=scale)
    if which == "cpu":
        # hidden as is: the C++ reads the M rows through its strides (no [T, H] copy)
        return _CpuGatherValueHead.apply(hidden, positions.contiguous(), w1.contiguous(),
                                         b1.contiguous(), w2.contiguous(), b2.contiguous(), activation, scale)
    from ..kernels.value_head import gather_value_head_triton
    return gather_value_head_triton(hidden, positions, w1, b1, w2, b2, activation=activation, scale=scale)
