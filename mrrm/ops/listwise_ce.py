"""listwise_ce: segmented softmax cross-entropy over ragged groups of scores.

Where it lives: reference `mrrm.ops.oracle.listwise_ce`; CPU `csrc/listwise_ce.cpp`; GPU
`csrc/cuda/listwise_ce.cu` (both in mrrm._C); backend choice `mrrm.ops._dispatch`; tests
`tests/ops/test_listwise_ce.py`, `tests/ops/test_custom_ops.py`.

The compiled kernels (C++ on the CPU, CUDA C++ on the GPU) compute each group's loss AND the
gradient of that loss with respect to the group's scores in one pass; the backward only scales the
saved gradient by the upstream gradient of the group.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mrrm.ops import oracle
from mrrm.ops._dispatch import C_or_raise, choose_backend
from mrrm.ops._validate import FLOAT_DTYPES, check_offsets, check_tensor

_INT_DTYPES = (torch.int64, torch.int32)


def _validate(scores, group_offsets, targets, loss, reduction):
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    dev = scores.device
    check_tensor("group_offsets", group_offsets, ndim=1, dtypes=(torch.int64,), device=dev)
    if loss not in oracle.CE_LOSSES:
        raise ValueError(f"loss must be one of {oracle.CE_LOSSES}, got {loss!r}")
    if reduction not in oracle.REDUCTIONS:
        raise ValueError(f"reduction must be one of {oracle.REDUCTIONS}, got {reduction!r}")
    M = scores.shape[0]
    offs = check_offsets("group_offsets", group_offsets, M, allow_empty_groups=False, what="scores")
    B = offs.numel() - 1
    if B == 0:
        raise ValueError("group_offsets describes no group (it must have at least 2 elements)")
    if not bool(torch.isfinite(scores).all()):
        i = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"scores must be finite; scores[{i}] = {float(scores[i])}")
    sizes = offs[1:] - offs[:-1]
    if loss == "best":
        check_tensor("targets", targets, ndim=1, dtypes=(torch.int64,), device=dev)
        if targets.shape[0] != B:
            raise ValueError(f"targets for loss='best' must be [B={B}] (one index per group), got {tuple(targets.shape)}")
        t = targets.cpu()
        bad = (t < 0) | (t >= sizes)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"targets[{b}]={int(t[b])} is out of range for group {b} of {int(sizes[b])} responses")
    elif loss == "plackett_luce":
        check_tensor("targets", targets, ndim=1, dtypes=_INT_DTYPES, device=dev)
        if targets.shape[0] != M:
            raise ValueError(f"targets (rankings) for loss='plackett_luce' must be [M={M}], one rank per response, "
                             f"got {tuple(targets.shape)}")
        if M and int(targets.min()) < 1:
            i = int((targets < 1).nonzero()[0])
            raise ValueError(f"targets (rankings) must be >= 1 (1 = best); targets[{i}] = {int(targets[i])}")
    else:  # soft
        check_tensor("targets", targets, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        if targets.shape[0] != M:
            raise ValueError(f"targets (probabilities) for loss='soft' must be [M={M}], got {tuple(targets.shape)}")
        if not bool(torch.isfinite(targets).all()) or bool((targets < 0).any()):
            raise ValueError("targets (probabilities) for loss='soft' must be finite and >= 0")
        gid = torch.repeat_interleave(torch.arange(B, device=dev), sizes.to(dev), output_size=M)
        sums = torch.zeros(B, dtype=torch.float64, device=dev).index_add(0, gid, targets.double()).cpu()
        bad = (sums - 1).abs() > 1e-3
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"targets (probabilities) of group {b} sum to {float(sums[b]):.6f}, expected 1")
    return B


LOSS_CODES = {"best": 0, "plackett_luce": 1, "soft": 2}


@torch.library.custom_op("mrrm::listwise_ce_fwd_bwd", mutates_args=())
def listwise_ce_fwd_bwd(scores: Tensor, group_offsets: Tensor, targets: Tensor, loss: str,
                        reduction: str) -> tuple[Tensor, Tensor]:
    """mrrm._C (CPU or CUDA): the reduced loss (per group [B] for 'none', else a scalar; scores' dtype)
    and the gradient of each group's loss with respect to its scores [M] (fp32), in one pass. The
    reduction is done here, not by autograd, so fwd + bwd is two dispatcher calls."""
    per_group, unit_grad = C_or_raise("listwise_ce").listwise_ce_fwd_bwd(scores.contiguous(), group_offsets.contiguous(),
                                                                         targets.contiguous(), LOSS_CODES[loss])
    if reduction == "none":
        return per_group.to(scores.dtype), unit_grad
    total = per_group.sum()
    return (total / per_group.shape[0] if reduction == "mean" else total).to(scores.dtype), unit_grad


@listwise_ce_fwd_bwd.register_fake
def _(scores, group_offsets, targets, loss, reduction):
    B = group_offsets.shape[0] - 1
    return (scores.new_empty((B,) if reduction == "none" else ()),
            scores.new_empty(scores.shape[0], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    scores, group_offsets, _, _, reduction = inputs
    ctx.save_for_backward(output[1], group_offsets)
    ctx.scores_dtype, ctx.reduction = scores.dtype, reduction


def _backward(ctx, grad_out, _grad_unit):
    """The saved per-score gradient scaled by its group's upstream gradient."""
    unit_grad, group_offsets = ctx.saved_tensors
    g = grad_out.float()
    if ctx.reduction == "none":
        sizes = group_offsets[1:] - group_offsets[:-1]
        g = torch.repeat_interleave(g, sizes, output_size=unit_grad.shape[0])
    elif ctx.reduction == "mean":
        g = g / (group_offsets.shape[0] - 1)
    return (unit_grad * g).to(ctx.scores_dtype), None, None, None, None


listwise_ce_fwd_bwd.register_autograd(_backward, setup_context=_setup_context)


def listwise_ce(scores, group_offsets, targets, *, loss="best", reduction="mean", backend=None, check_inputs=True):
    """Listwise loss over ragged groups: group b is scores[group_offsets[b]:group_offsets[b+1]].

    loss='best' (the paper's): targets int64 [B], index of the preferred response within its group.
    loss='plackett_luce': targets int [M], ranks (1 = best). Ties: a response competes with every
      response not ranked strictly better than it, its tied peers included (Breslow), so the
      order among tied responses is not rewarded either way.
    loss='soft': targets float [M], a probability distribution per group (sums to 1).
    reduction: 'mean' over the B groups (a group of one response counts, with loss 0), 'sum', or
    'none' ([B]). Differentiable in scores only.
    Backends (mrrm.ops._dispatch): reference (mrrm.ops.oracle), cpu and cuda (the custom op
    mrrm::listwise_ce_fwd_bwd above: mrrm._C's C++ / CUDA C++).
    """
    if check_inputs:
        _validate(scores, group_offsets, targets, loss, reduction)
    which = choose_backend("listwise_ce", scores.device, backend, scores.dtype)
    if which == "torch":
        return oracle.listwise_ce(scores, group_offsets, targets, loss=loss, reduction=reduction)
    return listwise_ce_fwd_bwd(scores, group_offsets, targets, loss, reduction)[0]
