"""Gated DeltaNet (Qwen3.5's linear attention) over a packed stream, with state forks at the prefix.

A recurrent layer cannot be masked the way attention is: what a token sees is the state its own
history left behind. mrrm's packed layouts (`mrrm.data.packing`) turn into *segments* of that history:

- joint and single: every sequence of `cu_seqlens` is one segment from a zero state (a *root*);
- independent (mask "shared_prefix"): the prefix of a sequence (segment id 0) is a root, and every
  response (segment ids 1..N) is a *child* that starts from the state the prefix ended in: its
  conv state (the prefix's last W-1 inputs of the short causal convolution) and its recurrent state
  (the delta rule's [HV, K, V] matrix). A sequence without prefix tokens gives roots only; a prefix
  with a single response is one root (nothing to fork: the pass is the joint one).

So independent mode costs P + sum R tokens per sample, like its attention, and each response sees
exactly what it would see alone after the prefix. Gradients flow into the prefix through the forked
state (the children's initial states are gathered from the roots' final states, not detached).

Backends: "torch" (any device; the chunked delta rule of transformers' torch path as of 5.25,
`chunk_gated_delta_rule`, with batched initial states,
and a causal conv1d read through a history index that continues into the parent's last inputs) and
"fla" (CUDA; flash-linear-attention's varlen `chunk_gated_delta_rule` and `causal_conv1d`, each
called once for the roots and once for the children with the roots' final states). "auto" picks
"fla" for CUDA tensors when `fla` is importable, else "torch"; the choice is mrrm.ops._dispatch's (ops
"causal_conv1d" and "gated_delta_rule"; MRRM_OPS forces one).

    plan = recurrent_plan(cu_seqlens, mask, segment_ids)
    x = causal_conv1d_varlen(x [T, D], weight [D, W], bias [D] | None, plan, activation="silu")
    o = gated_delta_rule_varlen(q [T, H, K], k [T, H, K], v [T, HV, V], g [T, HV], beta [T, HV], plan)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mrrm.ops._dispatch import choose_backend

MASKS = ("causal", "shared_prefix")
CONV_ACTIVATIONS = (None, "silu", "swish")


@dataclass
class RecurrentPlan:
    """The segments of a packed stream of T tokens, in two phases. Host (CPU) tensors: the ops derive
    their gather indices from them once per call and move only those to the device.

    root_starts, root_lengths     int64 [R]: segments that start from a zero state (stream order)
    child_starts, child_lengths   int64 [C]: segments that start from a root's final state
    child_parent                  int64 [C]: index into the roots of each child's parent
    num_tokens                    T
    """

    root_starts: torch.Tensor
    root_lengths: torch.Tensor
    child_starts: torch.Tensor
    child_lengths: torch.Tensor
    child_parent: torch.Tensor
    num_tokens: int

    @property
    def has_children(self) -> bool:
        return int(self.child_starts.numel()) > 0


def _check_int_vector(name: str, t, dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a {dim}-D integer tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    return t


def recurrent_plan(cu_seqlens: torch.Tensor, mask: str = "causal", segment_ids: torch.Tensor | None = None
                   ) -> RecurrentPlan:
    """The segments of a packed stream (`mrrm.data.packing.PackedBatch` metadata): for mask "causal" one
    root per sequence; for "shared_prefix" the prefix of each sequence (segment id 0, at its start)
    is a root and each response (a run of one segment id > 0) a child of it."""
    cu = _check_int_vector("cu_seqlens", cu_seqlens)
    if cu.numel() < 2 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least 2 entries, got {cu.tolist()[:4]}")
    lengths = (cu[1:] - cu[:-1]).long().cpu()
    if bool((lengths <= 0).any()):
        raise ValueError("cu_seqlens must be strictly increasing (every sequence non-empty)")
    starts = cu[:-1].long().cpu()
    T = int(cu[-1])
    empty = torch.zeros(0, dtype=torch.int64)
    if mask == "causal":
        return RecurrentPlan(starts, lengths, empty, empty, empty, T)
    if mask != "shared_prefix":
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if segment_ids is None:
        raise ValueError("mask 'shared_prefix' needs segment_ids (0 = prefix, i = response i)")
    seg = _check_int_vector("segment_ids", segment_ids).long().cpu()
    if seg.numel() != T:
        raise ValueError(f"segment_ids has {seg.numel()} entries for {T} tokens (cu_seqlens[-1])")
    if T and int(seg.min()) < 0:
        raise ValueError("segment_ids must be >= 0")
    # a run = maximal stretch of one segment id inside one sequence
    new_seq = torch.zeros(T, dtype=torch.bool)
    new_seq[starts] = True
    run_start = new_seq.clone()
    run_start[1:] |= seg[1:] != seg[:-1]
    run_begin = run_start.nonzero().squeeze(1)
    run_len = torch.diff(torch.cat([run_begin, torch.tensor([T])]))
    run_seg = seg[run_begin]
    run_seq = torch.searchsorted(cu[1:].long().cpu(), run_begin, right=True)
    first_of_seq = new_seq[run_begin]
    # segment 0 may only open a sequence; every later run is a response
    bad = (run_seg == 0) & ~first_of_seq
    if bool(bad.any()):
        at = int(run_begin[bad][0])
        raise ValueError(f"segment_ids: prefix tokens (id 0) at token {at} follow a response in their sequence; "
                         "the prefix must come first")
    is_root = run_seg == 0
    seq_has_prefix = torch.zeros(lengths.numel(), dtype=torch.bool)
    seq_has_prefix[run_seq[is_root]] = True
    # responses of a sequence without prefix start from a zero state: roots as well
    orphan = ~is_root & ~seq_has_prefix[run_seq]
    root = is_root | orphan
    root_index = torch.full((lengths.numel(),), -1, dtype=torch.int64)
    root_ids = torch.cumsum(root.long(), 0) - 1
    root_index[run_seq[is_root]] = root_ids[is_root]
    child = ~root
    # a prefix with one response needs no fork: the response continues its prefix's run (the pass
    # is then the joint one, run for run)
    per_seq = torch.bincount(run_seq[child], minlength=lengths.numel())
    lone = child & (per_seq[run_seq] == 1)
    root_len = run_len[root].clone()
    root_len[root_index[run_seq[lone]]] += run_len[lone]
    child = child & ~lone
    return RecurrentPlan(run_begin[root], root_len, run_begin[child], run_len[child],
                         root_index[run_seq[child]], T)


def _check_plan(plan, T: int) -> RecurrentPlan:
    if not isinstance(plan, RecurrentPlan):
        raise TypeError(f"plan must be a RecurrentPlan (see recurrent_plan), got {type(plan).__name__}")
    if plan.num_tokens != T:
        raise ValueError(f"the plan covers {plan.num_tokens} tokens but the inputs have {T}")
    return plan


def _segment_index(starts: torch.Tensor, lengths: torch.Tensor, device) -> torch.Tensor:
    """Stream indices of the given segments, concatenated: [sum lengths]."""
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    return (starts[owner] + torch.arange(total) - offsets[owner]).to(device)


def _cu(lengths: torch.Tensor, device) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(device)


# --------------------------------------------------------------------------------------------------
# the short causal convolution
# --------------------------------------------------------------------------------------------------

def _history_index(plan: RecurrentPlan, width: int) -> torch.Tensor:
    """[T, W] stream index of the inputs each token's window reads (oldest first; T = a zero row):
    a token's own segment first, then, for a child, its parent's last inputs."""
    T = plan.num_tokens
    seg_start = torch.empty(T, dtype=torch.int64)
    offset = torch.empty(T, dtype=torch.int64)
    parent_start = torch.zeros(T, dtype=torch.int64)
    parent_len = torch.zeros(T, dtype=torch.int64)
    for starts, lengths, parents in ((plan.root_starts, plan.root_lengths, None),
                                     (plan.child_starts, plan.child_lengths, plan.child_parent)):
        if lengths.numel() == 0:
            continue
        idx = _segment_index(starts, lengths, "cpu")
        owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=idx.numel())
        seg_start[idx] = starts[owner]
        offset[idx] = idx - starts[owner]
        if parents is not None:
            parent_start[idx] = plan.root_starts[parents[owner]]
            parent_len[idx] = plan.root_lengths[parents[owner]]
    back = offset[:, None] - (width - 1) + torch.arange(width)   # logical step in the own segment
    in_parent = parent_len[:, None] + back                       # the same step in the parent
    return torch.where(back >= 0, seg_start[:, None] + back,
                       torch.where(in_parent >= 0, parent_start[:, None] + in_parent, T))


def _conv_torch(x, weight, bias, plan, activation):
    T, D = x.shape
    W = weight.shape[1]
    index = _history_index(plan, W).to(x.device)
    padded = torch.cat([x, x.new_zeros(1, D)]).to(weight.dtype)
    out = torch.einsum("twd,dw->td", padded[index], weight)
    if bias is not None:
        out = out + bias
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def _conv_fla(x, weight, bias, plan, activation):
    from fla.modules.causal_conv1d import causal_conv1d

    act = None if activation is None else "silu"
    root_idx = _segment_index(plan.root_starts, plan.root_lengths, x.device)
    root_out, root_state = causal_conv1d(x[root_idx][None], weight, bias, activation=act,
                                         output_final_state=plan.has_children,
                                         cu_seqlens=_cu(plan.root_lengths, x.device))
    out = x.new_zeros(x.shape).index_copy(0, root_idx, root_out[0].to(x.dtype))
    if not plan.has_children:
        return out
    child_idx = _segment_index(plan.child_starts, plan.child_lengths, x.device)
    child_out, _ = causal_conv1d(x[child_idx][None], weight, bias, activation=act,
                                 initial_state=root_state[plan.child_parent.to(x.device)],
                                 cu_seqlens=_cu(plan.child_lengths, x.device))
    return out.index_copy(0, child_idx, child_out[0].to(x.dtype))


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: RecurrentPlan,
                         activation: str | None = "silu", backend: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution of a packed stream: x [T, D], weight [D, W], bias [D] or None.
    Roots start from zero inputs; children continue from their parent's last W-1 inputs."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [D, W] with D = {x.shape[1]}, got {getattr(weight, 'shape', None)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[1],)):
        raise ValueError(f"bias must be None or [D] with D = {x.shape[1]}, got {getattr(bias, 'shape', None)}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    _check_plan(plan, x.shape[0])
    if choose_backend("causal_conv1d", x.device, backend) == "fla":
        return _conv_fla(x, weight, bias, plan, activation)
    return _conv_torch(x, weight, bias, plan, activation)


# --------------------------------------------------------------------------------------------------
# the gated delta rule
# --------------------------------------------------------------------------------------------------

def transformers_torch_function(name: str):
    """transformers' pure-torch `name` from the Qwen3.5 modeling file (torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule), found under the hub-kernel / fla dispatch wrapped around it:
    that wrapper only hands CPU tensors back to the same function, after a warning, and on CUDA it
    would route to fla. If the function cannot be found under the wrapper, the wrapper is returned."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    if not isinstance(name, str) or not hasattr(modeling, name):
        raise ValueError(f"transformers' qwen3_5 modeling file has no function {name!r}")
    return _find_function(getattr(modeling, name), name, modeling.__name__, 0, set()) or getattr(modeling, name)


def _find_function(obj, name, module, depth, seen):
    if id(obj) in seen or depth > 6:
        return None
    seen.add(id(obj))
    if inspect.isfunction(obj) and obj.__name__ == name and obj.__module__ == module and not hasattr(obj, "__wrapped__"):
        return obj
    inner = []
    if isinstance(obj, torch.nn.Module):  # the hub-kernel layer that holds the function
        inner.append(type(obj).forward)
    if inspect.ismethod(obj):
        inner.append(obj.__func__)
    if hasattr(obj, "__wrapped__"):
        inner.append(obj.__wrapped__)
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    for candidate in inner:
        if callable(candidate):
            found = _find_function(candidate, name, module, depth + 1, seen)
            if found is not None:
                return found
    return None


DELTA_RULE_CHUNK = 64


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm=True,
                           chunk_size: int = DELTA_RULE_CHUNK):
    """The gated delta rule on padded batches in chunks: q, k [B, L, HV, K] (heads already one per
    value head), v [B, L, HV, V], g, beta [B, L, HV], initial_state [B, HV, K, V] or None. Returns
    (out [B, L, HV, V] in v's dtype, the final state [B, HV, K, V] in fp32 or None).

    The algorithm of transformers' torch_chunk_gated_delta_rule in 5.25 (fp32; q and k
    L2-normalised, q scaled by K^-0.5; per chunk the UT transform solved as a unit lower-triangular
    system, then a scan over chunks), kept here so that mrrm's torch path computes (and costs,
    mrrm.flops) the same on every transformers version: 5.15 and older invert the system by forward
    substitution and apply it with two more matmuls, and up to 5.20 the function needs q/k repeated
    to the value heads."""
    out_dtype = v.dtype
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    B, H, L, K = k.shape
    V = v.shape[-1]
    pad = (chunk_size - L % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (L + pad) // chunk_size
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, n, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    cum = g.reshape(B, H, n, chunk_size).cumsum(dim=-1)  # log decay from the chunk's start
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [.., i, j]: j -> i
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    state = (torch.zeros(B, H, K, V, dtype=new_v.dtype, device=new_v.device) if initial_state is None
             else initial_state.to(new_v))
    out = torch.zeros_like(new_v)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(n):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, H, -1, V)[:, :, :L].transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format)
    return out, (state if output_final_state else None)


def _padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [T, ...] gathered to [B, L, ...] by index [B, L] (T = zeros)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]


def _pad_index(starts, lengths, T, device):
    """[B, Lmax] stream indices of the segments (T past a segment's end), and the flat positions of
    the real steps in [B * Lmax] with their stream indices (computed on the CPU: no boolean masks
    on the device, so the meta device can run it too)."""
    L = int(lengths.max())
    steps = torch.arange(L)
    valid = steps[None] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + steps[None], T)
    rows = valid.reshape(-1).nonzero().squeeze(1)
    return index.to(device), rows.to(device), index.reshape(-1)[rows].to(device)


def _delta_torch_phase(q, k, v, g, beta, starts, lengths, initial_state, want_state, l2norm):
    T = q.shape[0]
    index, rows, stream = _pad_index(starts, lengths, T, q.device)
    # zero-padded steps keep the state: g = 0 (no decay) and beta = 0 (no write)
    out, state = chunk_gated_delta_rule(_padded(q, index), _padded(k, index), _padded(v, index), _padded(g, index),
                                        _padded(beta, index), initial_state=initial_state,
                                        output_final_state=want_state, use_qk_l2norm=l2norm)
    return out.reshape(-1, *out.shape[2:])[rows], stream, state


def _delta_torch(q, k, v, g, beta, plan, l2norm):
    # grouped value heads (HV = r * H, each q/k head serving r consecutive value heads), as Qwen3.5 does
    if v.shape[1] != q.shape[1]:
        r = v.shape[1] // q.shape[1]
        q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
    out_r, idx_r, state = _delta_torch_phase(q, k, v, g, beta, plan.root_starts, plan.root_lengths, None,
                                             plan.has_children, l2norm)
    out = v.new_zeros(v.shape).index_copy(0, idx_r, out_r.to(v.dtype))
    if plan.has_children:
        init = state[plan.child_parent.to(state.device)]
        out_c, idx_c, _ = _delta_torch_phase(q, k, v, g, beta, plan.child_starts, plan.child_lengths, init, False,
                                             l2norm)
        out = out.index_copy(0, idx_c, out_c.to(v.dtype))
    return out


def _delta_fla(q, k, v, g, beta, plan, l2norm):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    root_idx = _segment_index(plan.root_starts, plan.root_lengths, q.device)
    out_r, state = chunk_gated_delta_rule(q[root_idx][None], k[root_idx][None], v[root_idx][None],
                                          g=g[root_idx][None], beta=beta[root_idx][None],
                                          output_final_state=plan.has_children, use_qk_l2norm_in_kernel=l2norm,
                                          cu_seqlens=_cu(plan.root_lengths, q.device).long())
    out = v.new_zeros(v.shape).index_copy(0, root_idx, out_r[0].to(v.dtype))
    if plan.has_children:
        child_idx = _segment_index(plan.child_starts, plan.child_lengths, q.device)
        out_c, _ = chunk_gated_delta_rule(q[child_idx][None], k[child_idx][None], v[child_idx][None],
                                          g=g[child_idx][None], beta=beta[child_idx][None],
                                          initial_state=state[plan.child_parent.to(q.device)],
                                          use_qk_l2norm_in_kernel=l2norm,
                                          cu_seqlens=_cu(plan.child_lengths, q.device).long())
        out = out.index_copy(0, child_idx, out_c[0].to(v.dtype))
    return out


def gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            plan: RecurrentPlan, *, use_qk_l2norm: bool = True, backend: str | None = None
                            ) -> torch.Tensor:
    """The gated delta rule over a packed stream: q, k [T, H, K], v [T, HV, V] (HV a multiple of H,
    each q/k head serving HV/H consecutive value heads), g [T, HV] (log decay, <= 0), beta [T, HV].
    Queries are scaled by K^-0.5 (and L2-normalised with q and k when use_qk_l2norm), as Qwen3.5's
    layer does. Returns [T, HV, V] in v's dtype; children start from their parent's final state."""
    for name, t, dim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("g", g, 2), ("beta", beta, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    T, H, K = q.shape
    HV = v.shape[1]
    if tuple(k.shape) != (T, H, K):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != T or HV % H:
        raise ValueError(f"v must be [T={T}, HV, V] with HV a multiple of H={H}, got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (T, HV):
            raise ValueError(f"{name} must be [T={T}, HV={HV}], got {tuple(t.shape)}")
    _check_plan(plan, T)
    if T == 0:
        return v.new_zeros(v.shape)
    if choose_backend("gated_delta_rule", q.device, backend) == "fla":
        return _delta_fla(q, k, v, g, beta, plan, use_qk_l2norm)
    return _delta_torch(q, k, v, g, beta, plan, use_qk_l2norm)
