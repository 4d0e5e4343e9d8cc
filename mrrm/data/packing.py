"""Packing: per-sample token layouts -> one varlen token stream (no padding) for one forward pass.

One sample is a prompt (the *prefix*: chat template, user turn with media placeholders, assistant
header) and N >= 1 candidate responses. A layout holds the sample's tokens twice over, because
the three modes need different streams:

- ``joint`` (the paper, the authors' layout): ``prefix + joint_ids``, one causal sequence with
  consecutive positions. ``joint_ids`` is the whole assistant turn as the checkpoint's chat template
  renders it and the tokenizer splits it in one piece (responses joined by
  ``"\\n\\n<|resp_sep|>\\n\\n"``, the template's tail after the last one), and response i is scored
  at ``joint_score_offsets[i]`` in it: for the reference layout the token right before response
  i's ``<|resp_sep|>``, and the last token of the sequence for the last response.
- ``independent``: ``prefix + r_1 + ... + r_N`` as one sequence under the mask ``shared_prefix``
  (segment id 0 for the prefix, i for response i); every response's positions restart at the end of
  the prefix, so response i sees exactly what it would see alone, for the cost of one pass.
- ``single``: N separate causal sequences ``[prefix, r_i]``: the conventional reward model.

``response_ids[i]`` is response i *alone* after the prefix (for the reference layout: the assistant
turn holding only that response, template tail included) and is scored at its last token, so
``independent`` equals ``single`` token for token. A layout may leave ``joint_ids`` out: it is then
``r_1 + sep + r_2 + ... + sep + r_N`` (``separator_ids`` between responses) scored at each
response's last token, the shape synthetic layouts (tests, FLOPs counting) use.

Positions: a prefix with ``prefix_positions=None`` gets ``arange(P)``; a multimodal prefix may bring
its own [P] or [K, P] position ids (Qwen2-VL mrope: K = 3). Tokens after the prefix continue from
``prefix_positions.max() + 1``, identical in all K rows (text positions are 1-D in mrope).

Many samples are packed into one `PackedBatch`; `pack_micro_batches` splits a list of samples into
several under a token budget; each batch's `sample_indices`, `score_sample` and `score_response`
map its scores back to the caller's samples (RewardModel.score_encoded).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mrrm.common import MODES, check_choice, check_int

OVERSIZE = ("error", "own_batch")
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------


@dataclass
class SampleLayout:
    """The token layout of one sample: a shared prefix and N >= 1 responses.

    prefix_ids:          tokens before the responses (chat template, user turn with media
                         placeholders, assistant header); may be empty.
    response_ids:        response i alone after the prefix (non-empty), scored at its last token
                         (independent and single modes).
    separator_ids:       tokens placed between two responses when `joint_ids` is not given.
    prefix_positions:    None (= arange(P)), or [P] / [K, P] integer position ids of the prefix
                         (multimodal rotary: Qwen mrope has K = 3). Later tokens continue from its max + 1.
    sample_id:           any identifier, quoted in error messages.
    joint_ids:           the joint body after the prefix (None: the responses joined by separator_ids).
    joint_score_offsets: N strictly increasing indices into joint_ids: where response i is scored.
    response_starts:     first token of response i within response_ids[i] (default 0); read by the
                         response representations that use the start (first, response_mean, ...).
    joint_starts:        first token of response i within joint_ids (default: built from
                         separators, where response i starts alone; else 0 for the first response
                         and one past the previous score offset for the others).
    """

    prefix_ids: list[int]
    response_ids: list[list[int]]
    separator_ids: list[int] = field(default_factory=list)
    prefix_positions: torch.Tensor | None = None
    sample_id: str | int | None = None
    joint_ids: list[int] | None = None
    joint_score_offsets: list[int] | None = None
    response_starts: list[int] | None = None
    joint_starts: list[int] | None = None

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)


@dataclass
class PackedBatch:
    """B samples packed into one token stream of S sequences and T tokens, with M scores.

    input_ids       int64 [T]
    position_ids    int64 [T], or [K, T] when a sample brought [K, P] prefix positions (mrope)
    cu_seqlens      int32 [S+1] sequence boundaries (flash-attn's varlen convention)
    max_seqlen      int, the longest sequence
    segment_ids     int32 [T]: 0 for prefix tokens, i (1-based) for response i (in joint mode: the
                    tokens after response i-1's score position up to response i's); filled in every
                    mode, used by the attention only with mask "shared_prefix"
    mask            "causal" (joint, single) or "shared_prefix" (independent)
    mode            as given to `pack`
    score_positions int64 [M]: token index of each response's score, samples in order, then
                    responses in order; M = sum of N_b
    start_positions int64 [M]: token index of each response's first token (same order)
    group_offsets   int64 [B+1]: scores of sample b are score_positions[group_offsets[b]:group_offsets[b+1]]
    score_sample    int64 [M]: sample (index within this batch) of each score
    score_response  int64 [M]: response index (0-based, within its sample) of each score
    sequence_sample int64 [S]: sample (index within this batch) of each sequence
    prefix_lengths  int64 [S]: prefix tokens at the start of each sequence (where the model places
                    the vision features)
    sample_indices  list[int]: index of each sample in the caller's original list (micro-batches)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    segment_ids: torch.Tensor
    mask: str
    mode: str
    score_positions: torch.Tensor
    start_positions: torch.Tensor
    group_offsets: torch.Tensor
    score_sample: torch.Tensor
    score_response: torch.Tensor
    sequence_sample: torch.Tensor
    prefix_lengths: torch.Tensor
    sample_indices: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.group_offsets.shape[0]) - 1

    @property
    def num_scores(self) -> int:
        return int(self.score_positions.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    def _map_tensors(self, fn) -> "PackedBatch":
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, sample_indices=list(self.sample_indices), **changes)

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on `device`. Host-to-GPU copies are non-blocking (they overlap
        with compute when the batch is in pinned memory, see `pin_memory`); copies to the CPU block,
        since the data must be there when this returns."""
        device = torch.device(device)
        non_blocking = device.type != "cpu"
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """A copy with every (CPU) tensor in page-locked memory, for asynchronous `.to("cuda")`."""
        return self._map_tensors(lambda t: t.pin_memory())


# --------------------------------------------------------------------------------------------------
# Validation: every layout is checked and normalised to tensors once
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    """A validated layout, ids as int64 tensors."""

    prefix: torch.Tensor             # [P]
    responses: list[torch.Tensor]    # N x [R_i], each response alone
    response_starts: torch.Tensor    # [N] first token of response i within responses[i]
    joint: torch.Tensor              # [J] the joint body
    joint_scores: torch.Tensor       # [N] score offsets within joint
    joint_starts: torch.Tensor       # [N] start offsets within joint
    prefix_positions: torch.Tensor   # [K0, P] int64 (K0 = 1 for 1-D / default positions)
    multirow: bool                   # prefix_positions was given as [K, P]
    response_start: int              # first position id after the prefix

    @property
    def num_responses(self) -> int:
        return len(self.responses)


def _where(index: int | None, sample_id) -> str:
    where = "sample" if index is None else f"sample {index}"
    if sample_id is not None:
        where += f" (sample_id={sample_id!r})"
    return where


def _as_ids(value, what: str, where: str) -> torch.Tensor:
    """A 1-D sequence of non-negative integers -> int64 tensor, or a ValueError saying what is wrong."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{where}: {what} must hold integer token ids, got a {t.dtype} tensor")
        t = t.to("cpu", torch.int64)
    else:
        if isinstance(value, (str, bytes)):
            raise ValueError(f"{where}: {what} must be a list of integer token ids, got {type(value).__name__}")
        try:
            items = list(value)
        except TypeError:
            raise ValueError(f"{where}: {what} must be a list of integer token ids, "
                             f"got {type(value).__name__}") from None
        if not all(type(x) is int for x in items):  # fast path for plain ints; else find the culprit
            for j, x in enumerate(items):
                if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                    raise ValueError(f"{where}: {what}[{j}] = {x!r} is not an integer token id")
        try:
            t = torch.tensor(items, dtype=torch.int64)
        except (OverflowError, RuntimeError) as e:
            raise ValueError(f"{where}: {what} holds a token id that does not fit in int64 ({e})") from None
    if t.dim() != 1:
        raise ValueError(f"{where}: {what} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        j = int((t < 0).nonzero()[0])
        raise ValueError(f"{where}: {what}[{j}] = {int(t[j])} is a negative token id")
    return t


def _as_offsets(value, what: str, where: str, n: int, limits) -> torch.Tensor:
    """N integer offsets, offsets[i] in [0, limits[i]) -> int64 [N]."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)):
        raise ValueError(f"{where}: {what} must be a list of {n} integer offsets, got {type(value).__name__}")
    items = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    if len(items) != n:
        raise ValueError(f"{where}: {what} has {len(items)} entries for {n} responses")
    for i, (x, hi) in enumerate(zip(items, limits)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"{where}: {what}[{i}] = {x!r} is not an integer offset")
        if not 0 <= int(x) < hi:
            raise ValueError(f"{where}: {what}[{i}] = {int(x)} is outside 0..{hi - 1}")
    return torch.tensor([int(x) for x in items], dtype=torch.int64)


def _joint_from_separators(responses, separator, response_starts):
    """r_1 + sep + ... + sep + r_N, each response scored at its last token and starting where it
    starts alone."""
    parts, scores, starts, at = [], [], [], 0
    for i, r in enumerate(responses):
        if i:
            parts.append(separator)
            at += separator.numel()
        starts.append(at + int(response_starts[i]))
        parts.append(r)
        at += r.numel()
        scores.append(at - 1)
    return torch.cat(parts), torch.tensor(scores, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)


def _validate(layout: SampleLayout, index: int | None) -> _Sample:
    """Check one layout and normalise it to tensors; every ValueError names the sample (`_where`)."""
    where = _where(index, getattr(layout, "sample_id", None))
    if not isinstance(layout, SampleLayout):
        raise ValueError(f"{where}: expected a SampleLayout, got {type(layout).__name__}")
    prefix = _as_ids(layout.prefix_ids, "prefix_ids", where)
    responses = _validate_responses(layout.response_ids, where)
    N = len(responses)
    lengths = [r.numel() for r in responses]
    starts = (torch.zeros(N, dtype=torch.int64) if layout.response_starts is None
              else _as_offsets(layout.response_starts, "response_starts", where, N, lengths))
    if layout.joint_ids is None:
        joint, joint_scores, joint_starts = _validate_separated_joint(layout, responses, starts, where)
    else:
        joint, joint_scores, joint_starts = _validate_given_joint(layout, N, where)
    if bool((starts > torch.tensor(lengths) - 1).any()):  # defensive: _as_offsets bounds them already
        raise ValueError(f"{where}: a response start lies past its last token")
    P = prefix.numel()
    positions, multirow = _validate_prefix_positions(layout.prefix_positions, P, where)
    response_start = int(positions.max()) + 1 if P else 0
    return _Sample(prefix, responses, starts, joint, joint_scores, joint_starts, positions, multirow, response_start)


def _validate_responses(raw_responses, where: str) -> list[torch.Tensor]:
    """response_ids -> N >= 1 non-empty int64 tensors."""
    if isinstance(raw_responses, (str, bytes, torch.Tensor)) or not isinstance(raw_responses, Sequence):
        raise ValueError(f"{where}: response_ids must be a list of responses (lists of token ids), "
                         f"got {type(raw_responses).__name__}")
    if len(raw_responses) == 0:
        raise ValueError(f"{where}: has no responses (response_ids is empty); every sample needs N >= 1")
    responses = []
    for i, r in enumerate(raw_responses):
        t = _as_ids(r, f"response_ids[{i}]", where)
        if t.numel() == 0:
            raise ValueError(f"{where}: response {i} is empty; every response needs at least one token "
                             f"(its last token is where it is scored)")
        responses.append(t)
    return responses


def _validate_separated_joint(layout: SampleLayout, responses, starts, where: str):
    """(joint, score offsets, start offsets) of a layout without joint_ids: the responses joined by
    separator_ids."""
    if layout.joint_score_offsets is not None or layout.joint_starts is not None:
        raise ValueError(f"{where}: joint_score_offsets / joint_starts are given without joint_ids")
    separator = _as_ids(layout.separator_ids, "separator_ids", where)
    N = len(responses)
    if N > 1 and separator.numel() == 0:
        raise ValueError(f"{where}: separator_ids is empty, but {N} responses must be separated "
                         "(or give joint_ids)")
    return _joint_from_separators(responses, separator, starts)


def _validate_given_joint(layout: SampleLayout, N: int, where: str):
    """(joint, score offsets, start offsets) of a layout that gives joint_ids: N strictly increasing
    score offsets, each response starting at or before its score offset."""
    joint = _as_ids(layout.joint_ids, "joint_ids", where)
    if layout.joint_score_offsets is None:
        raise ValueError(f"{where}: joint_ids needs joint_score_offsets (where each response is scored)")
    J = joint.numel()
    joint_scores = _as_offsets(layout.joint_score_offsets, "joint_score_offsets", where, N, [J] * N)
    if N > 1 and bool((joint_scores[1:] <= joint_scores[:-1]).any()):
        raise ValueError(f"{where}: joint_score_offsets must be strictly increasing, got {joint_scores.tolist()}")
    if layout.joint_starts is None:  # the first response starts the body, each other one follows the previous score
        joint_starts = torch.cat([joint_scores.new_zeros(1), joint_scores[:-1] + 1])
    else:
        joint_starts = _as_offsets(layout.joint_starts, "joint_starts", where, N, [J] * N)
    if bool((joint_starts > joint_scores).any()):
        i = int((joint_starts > joint_scores).nonzero()[0])
        raise ValueError(f"{where}: response {i} starts at joint offset {int(joint_starts[i])}, after its score "
                         f"offset {int(joint_scores[i])}")
    return joint, joint_scores, joint_starts


def _validate_prefix_positions(pp, P: int, where: str) -> tuple[torch.Tensor, bool]:
    """prefix_positions (None, [P] or [K, P] integers) -> (int64 [K0, P] on the CPU, whether given as
    [K, P]); None gives arange(P) as one row."""
    if pp is None:
        return torch.arange(P, dtype=torch.int64)[None], False
    if not isinstance(pp, torch.Tensor):
        try:
            pp = torch.as_tensor(pp)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{where}: prefix_positions must be an integer tensor [P] or [K, P], "
                             f"got {type(pp).__name__}") from None
    if pp.dtype == torch.bool or pp.is_floating_point() or pp.is_complex():
        raise ValueError(f"{where}: prefix_positions must hold integers, got dtype {pp.dtype}")
    if pp.dim() not in (1, 2) or (pp.dim() == 2 and pp.shape[0] == 0):
        raise ValueError(f"{where}: prefix_positions must be [P] or [K, P] with K >= 1, "
                         f"got shape {tuple(pp.shape)}")
    if pp.shape[-1] != P:
        raise ValueError(f"{where}: prefix_positions has {pp.shape[-1]} positions but the prefix has "
                         f"{P} tokens (shape {tuple(pp.shape)})")
    multirow = pp.dim() == 2
    positions = pp.detach().to("cpu", torch.int64)
    return (positions if multirow else positions[None]), multirow


def _num_tokens(s: _Sample, mode: str) -> int:
    N, P = s.num_responses, s.prefix.numel()
    R = sum(r.numel() for r in s.responses)
    if mode == "single":
        return N * P + R
    if mode == "independent":
        return P + R
    return P + s.joint.numel()


def sample_num_tokens(layout: SampleLayout, mode: str = "joint") -> int:
    """Tokens the sample occupies in a batch packed with `mode`: joint: P + len(joint body);
    independent: P + sum R_i; single: N * P + sum R_i. Validates the layout."""
    check_choice("mode", mode, MODES)
    return _num_tokens(_validate(layout, None), mode)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def _pack_sample(s: _Sample, mode: str, K: int):
    """The chunk of the stream one sample contributes, with offsets local to that chunk.

    Returns ids [L], positions [K, L], segments [L], sequence lengths (list), local score offsets
    [N], local start offsets [N].
    """
    N, P = s.num_responses, s.prefix.numel()
    R = torch.tensor([r.numel() for r in s.responses], dtype=torch.int64)
    prefix_pos = s.prefix_positions.expand(K, P)  # 1-row positions repeat in every mrope row
    start = s.response_start
    resp_ids = torch.arange(1, N + 1, dtype=torch.int32)

    if mode == "joint":
        J = s.joint.numel()
        ids = torch.cat([s.prefix, s.joint])
        positions = torch.cat([prefix_pos, (start + torch.arange(J, dtype=torch.int64)).expand(K, J)], 1)
        # joint token t belongs to the first response whose score offset is >= t (the tail, if
        # any, to the last one)
        body_seg = (torch.searchsorted(s.joint_scores, torch.arange(J, dtype=torch.int64)) + 1).clamp(max=N)
        seg = torch.cat([torch.zeros(P, dtype=torch.int32), body_seg.to(torch.int32)])
        return ids, positions, seg, [P + J], P + s.joint_scores, P + s.joint_starts

    body_len = int(R.sum())
    seg_begin = torch.cumsum(R, 0) - R  # where each response begins after the prefix
    if mode == "single":
        parts, pos_parts = [], []
        for r in s.responses:
            parts += [s.prefix, r]
            pos_parts += [prefix_pos, (start + torch.arange(r.numel(), dtype=torch.int64)).expand(K, r.numel())]
        seq_len_t = P + R
        seq_starts = torch.cumsum(seq_len_t, 0) - seq_len_t
        seg = torch.repeat_interleave(
            torch.stack([torch.zeros(N, dtype=torch.int32), resp_ids], 1).reshape(-1),
            torch.stack([torch.full((N,), P, dtype=torch.int64), R], 1).reshape(-1))
        resp_begin = seq_starts + P
        ids = torch.cat(parts)
        positions = torch.cat(pos_parts, 1)
        seq_lens = seq_len_t.tolist()
    else:  # independent: every response restarts right after the prefix, as if it were alone
        ids = torch.cat([s.prefix, *s.responses])
        body_pos = start + torch.arange(body_len, dtype=torch.int64) \
            - torch.repeat_interleave(seg_begin, R, output_size=body_len)
        positions = torch.cat([prefix_pos, body_pos.expand(K, body_len)], 1)
        seg = torch.cat([torch.zeros(P, dtype=torch.int32), torch.repeat_interleave(resp_ids, R, output_size=body_len)])
        seq_lens = [P + body_len]
        resp_begin = P + seg_begin
    return ids, positions, seg, seq_lens, resp_begin + R - 1, resp_begin + s.response_starts


def _pack_validated(samples: list[_Sample], mode: str, sample_indices: list[int]) -> PackedBatch:
    """One PackedBatch of validated samples: their chunks concatenated, offsets made batch-wide."""
    K, multirow = _position_rows(samples, sample_indices)
    chunks = _pack_chunks(samples, mode, K)
    T = sum(t.numel() for t in chunks.ids)
    if T > _INT32_MAX:
        raise ValueError(f"the batch has {T} tokens, more than cu_seqlens (int32) can address; "
                         f"split it with pack_micro_batches")
    position_ids = torch.cat(chunks.positions, 1)
    if not multirow:
        position_ids = position_ids[0]
    return PackedBatch(
        input_ids=torch.cat(chunks.ids),
        position_ids=position_ids.contiguous(),
        segment_ids=torch.cat(chunks.segments),
        mask="shared_prefix" if mode == "independent" else "causal",
        mode=mode,
        sample_indices=list(sample_indices),
        **_sequence_fields(samples, chunks),
        **_score_fields(samples, chunks),
    )


def _position_rows(samples: list[_Sample], sample_indices: list[int]) -> tuple[int, bool]:
    """(K, whether any sample brought [K, P] positions): the batch's number of position rows; samples
    with 1-row positions are repeated in every row. Samples with different K cannot share a batch."""
    multirow = [s.prefix_positions.shape[0] for s in samples if s.multirow]
    if len(set(multirow)) > 1:
        first = next(i for i, s in enumerate(samples) if s.multirow)
        other = next(i for i, s in enumerate(samples) if s.multirow and s.prefix_positions.shape[0] != multirow[0])
        raise ValueError(f"prefix_positions of sample {sample_indices[first]} has {multirow[0]} rows but "
                         f"sample {sample_indices[other]} has {samples[other].prefix_positions.shape[0]}; "
                         f"one batch needs one number of position rows")
    return (multirow[0] if multirow else 1), bool(multirow)


@dataclass
class _Chunks:
    """Each sample's chunk of the stream (`_pack_sample`), samples in order, offsets local to each chunk."""

    ids: list = field(default_factory=list)         # [L_b] each
    positions: list = field(default_factory=list)   # [K, L_b] each
    segments: list = field(default_factory=list)    # [L_b] each
    scores: list = field(default_factory=list)      # [N_b] each
    starts: list = field(default_factory=list)      # [N_b] each
    seq_lens: list = field(default_factory=list)    # the length of every sequence of the batch
    seq_counts: list = field(default_factory=list)  # the number of sequences of each sample


def _pack_chunks(samples: list[_Sample], mode: str, K: int) -> _Chunks:
    """`_pack_sample` of every sample, collected."""
    chunks = _Chunks()
    for s in samples:
        ids, positions, segments, seq_lens, scores, starts = _pack_sample(s, mode, K)
        chunks.ids.append(ids)
        chunks.positions.append(positions)
        chunks.segments.append(segments)
        chunks.scores.append(scores)
        chunks.starts.append(starts)
        chunks.seq_lens += seq_lens
        chunks.seq_counts.append(len(seq_lens))
    return chunks


def _sequence_fields(samples: list[_Sample], chunks: _Chunks) -> dict:
    """The PackedBatch fields that describe its sequences: cu_seqlens, max_seqlen, sequence_sample,
    prefix_lengths."""
    seq_len_t = torch.tensor(chunks.seq_lens, dtype=torch.int64)
    cu_seqlens = torch.zeros(len(chunks.seq_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(seq_len_t, 0).to(torch.int32)
    seq_count_t = torch.tensor(chunks.seq_counts, dtype=torch.int64)
    sequence_sample = torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int64), seq_count_t)
    prefix_lengths = torch.tensor([s.prefix.numel() for s in samples], dtype=torch.int64).repeat_interleave(seq_count_t)
    return dict(cu_seqlens=cu_seqlens, max_seqlen=int(seq_len_t.max()), sequence_sample=sequence_sample,
                prefix_lengths=prefix_lengths)


def _score_fields(samples: list[_Sample], chunks: _Chunks) -> dict:
    """The PackedBatch fields that describe its M scores: score_positions and start_positions (each
    chunk's local offsets shifted to where the chunk starts in the stream), group_offsets,
    score_sample, score_response."""
    B = len(samples)
    chunk_len_t = torch.tensor([t.numel() for t in chunks.ids], dtype=torch.int64)
    chunk_start = torch.cumsum(chunk_len_t, 0) - chunk_len_t
    N_t = torch.tensor([s.num_responses for s in samples], dtype=torch.int64)
    M = int(N_t.sum())
    group_offsets = torch.zeros(B + 1, dtype=torch.int64)
    group_offsets[1:] = torch.cumsum(N_t, 0)
    score_sample = torch.repeat_interleave(torch.arange(B, dtype=torch.int64), N_t, output_size=M)
    score_response = torch.arange(M, dtype=torch.int64) - group_offsets[:-1].repeat_interleave(N_t, output_size=M)
    shift = chunk_start.repeat_interleave(N_t, output_size=M)
    return dict(score_positions=torch.cat(chunks.scores) + shift, start_positions=torch.cat(chunks.starts) + shift,
                group_offsets=group_offsets, score_sample=score_sample, score_response=score_response)


def _check_sample_indices(sample_indices, B: int) -> list[int]:
    if sample_indices is None:
        return list(range(B))
    out = []
    for x in sample_indices:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(f"sample_indices must be non-negative ints, got {x!r}")
        out.append(int(x))
    if len(out) != B:
        raise ValueError(f"sample_indices has {len(out)} entries for {B} samples")
    return out


def pack(layouts: Sequence[SampleLayout], mode: str = "joint", *,
         sample_indices: Sequence[int] | None = None) -> PackedBatch:
    """Pack B >= 1 samples into one `PackedBatch` (see the module docstring for the layouts).

    `sample_indices` (default 0..B-1) records where each sample came from in the caller's list;
    validation errors name a sample by that index. Raises ValueError on an invalid layout, naming
    the sample index, its sample_id if set, and the problem.
    """
    check_choice("mode", mode, MODES)
    layouts = list(layouts)
    if not layouts:
        raise ValueError("pack needs at least one sample, got an empty list")
    indices = _check_sample_indices(sample_indices, len(layouts))
    samples = [_validate(layout, idx) for layout, idx in zip(layouts, indices)]
    return _pack_validated(samples, mode, indices)


def pack_micro_batches(layouts: Sequence[SampleLayout], mode: str = "joint", max_tokens: int = 16384, *,
                       oversize: str = "error", max_samples: int | None = None) -> list[PackedBatch]:
    """Split samples into micro-batches of at most `max_tokens` packed tokens each, then pack them.

    Policy: greedy and order-preserving. Samples are taken in the given order and appended to the
    current micro-batch while its token count (`sample_num_tokens` in this mode) stays within
    `max_tokens` (and its sample count within `max_samples`, when set); otherwise a new micro-batch
    starts. Samples are never reordered or split, so concatenating the batches' `sample_indices`
    gives 0..len(layouts)-1, and each batch's sample_indices map its samples back.

    A sample that alone exceeds `max_tokens`: with oversize="error" (default) a ValueError names its
    index (and sample_id); with oversize="own_batch" it gets a micro-batch of its own (the only batch
    allowed over the budget) and packing goes on with the next sample in a fresh batch.
    An empty `layouts` gives an empty list.
    """
    check_choice("mode", mode, MODES)
    check_choice("oversize", oversize, OVERSIZE)
    check_int("max_tokens", max_tokens)
    check_int("max_samples", max_samples, allow_none=True)
    samples = [_validate(layout, idx) for idx, layout in enumerate(layouts)]

    groups: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for idx, s in enumerate(samples):
        n = _num_tokens(s, mode)
        if n > max_tokens:
            if oversize == "error":
                raise ValueError(f"{_where(idx, layouts[idx].sample_id)} has {n} tokens in mode {mode!r}, more "
                                 f"than max_tokens={max_tokens}; raise max_tokens or pass oversize='own_batch'")
            if current:
                groups.append(current)
            groups.append([idx])
            current, current_tokens = [], 0
            continue
        full = current_tokens + n > max_tokens or (max_samples is not None and len(current) >= max_samples)
        if current and full:
            groups.append(current)
            current, current_tokens = [], 0
        current.append(idx)
        current_tokens += n
    if current:
        groups.append(current)
    return [_pack_validated([samples[i] for i in g], mode, g) for g in groups]


# --------------------------------------------------------------------------------------------------
# Scores back to samples
# --------------------------------------------------------------------------------------------------


def _to_float_list(scores) -> list[float]:
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be 1-D [M], got shape {tuple(scores.shape)}")
        return scores.detach().to("cpu", torch.float64).tolist()
    return [float(x) for x in scores]


def split_scores(scores, group_offsets) -> list[list[float]]:
    """Flat scores [M] -> one list of N_b floats per sample, by group_offsets [B+1]."""
    flat = _to_float_list(scores)
    offs = group_offsets.tolist() if isinstance(group_offsets, torch.Tensor) else [int(x) for x in group_offsets]
    if not offs or offs[0] != 0:
        raise ValueError(f"group_offsets must start at 0, got {offs[:1]}")
    if offs[-1] != len(flat):
        raise ValueError(f"group_offsets[-1]={offs[-1]} does not match the number of scores ({len(flat)})")
    if any(b < a for a, b in zip(offs[:-1], offs[1:])):
        raise ValueError("group_offsets must be non-decreasing")
    return [flat[a:b] for a, b in zip(offs[:-1], offs[1:])]
