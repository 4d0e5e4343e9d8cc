"""gather_value_head: the value head evaluated on the M score rows of a [T, H] hidden state only.

Where it lives: reference `mrrm.ops.oracle.gather_value_head`; CPU `csrc/value_head.cpp` (mrrm._C); GPU
`kernels/value_head.py` (Triton); backend choice `mrrm.ops._dispatch`; tests `tests/ops/test_value_head.py`,
`tests/ops/test_value_head_triton.py`, `tests/ops/test_custom_ops.py`.

Common practice runs the head on all T tokens and then gathers M of them; here the M rows are
gathered first (never a [T, H] copy, never the head on T tokens) and the backward writes only those
M rows of the hidden-state gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from mrrm.common import ACTIVATIONS, check_choice
from mrrm.ops import oracle
from mrrm.ops._dispatch import C_or_raise, choose_backend
from mrrm.ops._validate import FLOAT_DTYPES, check_tensor


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


# ------------------------------------------------------------------------------------------------
# The compiled backends as torch.library custom ops (see mrrm.ops._dispatch): "cpu" = mrrm._C
# (csrc/value_head.cpp), "triton" = mrrm.kernels.value_head. The forward keeps z = rows @ w1.T + b1
# (fp32 [M, D]) for the backward when `store_z`; `repeats` (int32 [1], Triton only) says whether
# positions repeat, which the Triton backward needs to pick atomic adds. Both flags are hints: without
# them the backward recomputes z and assumes repeats, so every call is correct. `config` is the Triton
# block table flattened (kernels.value_head.flatten_config), or None.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mrrm::gather_value_head_fwd", mutates_args=())
def gather_value_head_fwd(hidden: Tensor, positions: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                          activation: str, scale: float, store_z: bool, detect_repeats: bool, backend: str,
                          config: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    out_dtype = torch.promote_types(hidden.dtype, w1.dtype)
    if backend == "cpu":
        out, z = C_or_raise("gather_value_head").gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, activation,
                                                                       scale)
        return out.to(out_dtype), (z if store_z else z.new_empty(0, w1.shape[0])), positions.new_zeros(1, dtype=torch.int32)
    from mrrm.kernels import value_head as kvh  # triton is optional: its kernels load when a triton backend runs
    return kvh.forward(hidden, positions, w1, b1, w2, b2, activation, scale, kvh.unflatten_config(config, positions.shape[0]),
                       store_z=store_z, detect_repeats=detect_repeats)


@gather_value_head_fwd.register_fake
def _(hidden, positions, w1, b1, w2, b2, activation, scale, store_z, detect_repeats, backend, config=None):
    M, D = positions.shape[0], w1.shape[0]
    return (hidden.new_empty(M, dtype=torch.promote_types(hidden.dtype, w1.dtype)),
            hidden.new_empty((M if store_z else 0, D), dtype=torch.float32), hidden.new_empty(1, dtype=torch.int32))


@torch.library.custom_op("mrrm::gather_value_head_bwd", mutates_args=())
def gather_value_head_bwd(grad_out: Tensor, hidden: Tensor, positions: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                          b2: Tensor, z: Tensor, repeats: Tensor, activation: str, scale: float, need_hidden: bool,
                          backend: str, config: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(g_hidden ([0, H] when not need_hidden), g_w1, g_b1, g_w2, g_b2)."""
    if z.shape[0] != positions.shape[0]:  # the forward was told no backward would follow: recompute z
        z = hidden.index_select(0, positions).float() @ w1.float().T + b1.float()
    if backend == "cpu":
        g = C_or_raise("gather_value_head").gather_value_head_bwd(grad_out, hidden, positions, w1, w2, z, activation,
                                                                  scale, need_hidden)
    else:
        from mrrm.kernels import value_head as kvh  # triton is optional: its kernels load when a triton backend runs
        g = kvh.backward(grad_out, hidden, positions, w1, b1, w2, b2, z, repeats, activation, scale,
                         kvh.unflatten_config(config, positions.shape[0]), need_hidden)
    g_hidden, g_w1, g_b1, g_w2, g_b2 = g
    if g_hidden is None:
        g_hidden = hidden.new_empty(0, hidden.shape[1])
    return g_hidden, g_w1, g_b1.to(b1.dtype), g_w2, g_b2.to(b2.dtype)


@gather_value_head_bwd.register_fake
def _(grad_out, hidden, positions, w1, b1, w2, b2, z, repeats, activation, scale, need_hidden, backend, config=None):
    return (hidden.new_empty(hidden.shape if need_hidden else (0, hidden.shape[1])), torch.empty_like(w1),
            torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    hidden, positions, w1, b1, w2, b2, activation, scale, store_z, detect_repeats, backend, config = inputs
    _, z, repeats = output
    ctx.save_for_backward(hidden, positions, w1, b1, w2, b2, z, repeats)
    ctx.args = (activation, scale, backend, config)


def _backward(ctx, grad_out, _gz, _grepeats):
    hidden, positions, w1, b1, w2, b2, z, repeats = ctx.saved_tensors
    activation, scale, backend, config = ctx.args
    need = ctx.needs_input_grad
    g_hidden, g_w1, g_b1, g_w2, g_b2 = gather_value_head_bwd(grad_out.contiguous(), hidden, positions, w1, b1, w2, b2,
                                                             z, repeats, activation, scale, need[0], backend, config)
    return (g_hidden if need[0] else None, None, g_w1 if need[2] else None, g_b1 if need[3] else None,
            g_w2 if need[4] else None, g_b2 if need[5] else None, None, None, None, None, None, None)


gather_value_head_fwd.register_autograd(_backward, setup_context=_setup_context)


# FLOPs of the custom ops for torch.utils.flop_counter.FlopCounterMode, which cannot see inside them: the
# two matmuls on the M gathered rows, 2 * M * (H * D + D) (what the counter reports for the pure-torch
# reference); the backward g_w1 and g_hidden (2 * M * H * D each; g_hidden when asked for), g_w2 and g_a.
def _head_flops(positions, w1) -> int:
    return 2 * positions.shape[0] * (w1.shape[1] * w1.shape[0] + w1.shape[0])


@register_flop_formula(torch.ops.mrrm.gather_value_head_fwd, get_raw=True)
def _fwd_flops(hidden, positions, w1, *args, out_val=None, **kwargs) -> int:
    return _head_flops(positions, w1)


@register_flop_formula(torch.ops.mrrm.gather_value_head_bwd, get_raw=True)
def _bwd_flops(grad_out, hidden, positions, w1, b1, w2, b2, z, repeats, activation, scale, need_hidden, *args,
               out_val=None, **kwargs) -> int:
    M, (D, H) = positions.shape[0], w1.shape
    return 2 * M * (H * D * (2 if need_hidden else 1) + 2 * D)


def gather_value_head(hidden, positions, w1, b1, w2, b2, *, activation="silu", scale=1.0, backend=None,
                      check_inputs=True):
    """scale * (act(hidden[positions] @ w1.T + b1) @ w2.T + b2) -> scores [M].

    hidden [T, H]; positions int64 [M] (repeats allowed; their gradients add up); w1 [D, H], b1 [D],
    w2 [1, D], b2 [1] in nn.Linear layouts; activation in silu, gelu (erf), relu, selu, tanh.
    The result has the promoted dtype of hidden and w1; accumulation is fp32.
    Backends (mrrm.ops._dispatch): reference (mrrm.ops.oracle), cpu and triton (the custom ops
    mrrm::gather_value_head_fwd / _bwd above).
    """
    if check_inputs:
        _validate(hidden, positions, w1, b1, w2, b2, activation, scale)
    which = choose_backend("gather_value_head", hidden.device, backend, torch.promote_types(hidden.dtype, w1.dtype))
    if which == "torch":
        return oracle.gather_value_head(hidden, positions, w1, b1, w2, b2, activation=activation, scale=scale)
    return call_compiled(hidden, positions, w1, b1, w2, b2, activation, scale, which, None)


def call_compiled(hidden, positions, w1, b1, w2, b2, activation, scale, backend, config):
    """The custom op for a resolved compiled backend. Whether a backward can follow decides what the
    forward keeps (z) and detects (repeated positions): known here, before the call."""
    grad = torch.is_grad_enabled()
    need_hidden = grad and hidden.requires_grad
    store_z = need_hidden or (grad and any(t.requires_grad for t in (w1, b1, w2, b2)))
    if backend == "triton" and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    # hidden as is on the CPU: the C++ reads the M rows through its strides (no [T, H] copy)
    return gather_value_head_fwd(hidden, positions.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                                 b2.contiguous(), activation, float(scale), store_z, need_hidden, backend, config)[0]


def gather_value_head_triton(hidden, positions, w1, b1, w2, b2, *, activation="silu", scale=1.0,
                             config=None):
    """scale * (act(hidden[positions] @ w1.T + b1) @ w2.T + b2) -> [M] with Triton kernels.

    Inputs as in mrrm.ops.gather_value_head, which validates them; here positions are NOT range
    checked (that would cost a host sync): out-of-range positions read and write out of bounds.
    Repeated positions are allowed (their hidden-state gradients add up, with atomic adds, so
    not bitwise reproducible; with unique positions every result is deterministic).
    `config` overrides the block sizes (tests use small blocks in the interpreter). fp32, fp16 and
    bf16 only: float64 goes to the reference by the dispatch's rule (mrrm.ops._dispatch).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if torch.float64 in (hidden.dtype, w1.dtype):
        raise ValueError("gather_value_head (triton) accumulates in fp32 and takes float16, bfloat16 and float32; "
                         "use backend='torch' (or mrrm.ops.gather_value_head, whose 'auto' picks it) for float64")
    from mrrm.kernels import value_head as kvh  # triton: optional, imported on use

    return call_compiled(hidden, positions, w1, b1, w2, b2, activation, scale, "triton", kvh.flatten_config(config))
