"""Input checks shared by the public ops. Every failure is a ValueError naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the other inputs)")


def check_offsets(name, offsets, total, *, allow_empty_groups, what):
    """`offsets` [G+1] must start at 0, end at `total` and be non-decreasing (strictly increasing
    unless empty groups are allowed). Returns the offsets as a CPU int64 tensor (one device sync)."""
    if offsets.numel() < 1:
        raise ValueError(f"{name} must have at least one element (0), got an empty tensor")
    vals = offsets.detach().to("cpu", torch.int64)
    if int(vals[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(vals[0])}")
    if int(vals[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of {what} ({total}), got {int(vals[-1])}")
    sizes = vals[1:] - vals[:-1]
    if bool((sizes < 0).any()):
        i = int((sizes < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing: {name}[{i + 1}]={int(vals[i + 1])} < {name}[{i}]={int(vals[i])}")
    if not allow_empty_groups and bool((sizes == 0).any()):
        i = int((sizes == 0).nonzero()[0])
        raise ValueError(f"{name}: group {i} is empty ({name}[{i}] == {name}[{i + 1}] == {int(vals[i])}); "
                         f"every group needs at least one {what.rstrip('s')}")
    return vals
