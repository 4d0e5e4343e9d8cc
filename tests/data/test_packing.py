"""mrrm.data.packing: layouts -> packed varlen batches, checked against a plain-Python oracle, and the key
equivalence: shared_prefix attention over an `independent` pack == causal attention over `single`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mrrm import ops
from mrrm.data.packing import (
    MODES,
    PackedBatch,
    SampleLayout,
    pack,
    pack_micro_batches,
    sample_num_tokens,
    split_scores,
)
from mrrm.ops import oracle as torch_ops

FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
VOCAB = 40  # small on purpose: repeated ids make the position bookkeeping matter


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

@st.composite
def layout_st(draw, mrope=None, max_n=64, max_prefix=5, joint=None):
    """A random valid SampleLayout. mrope: None = draw, True = [3, P] prefix positions, False = none.
    joint: None = draw, True = an explicit joint body (score / start offsets), False = built from
    separators."""
    ids = st.integers(0, VOCAB - 1)
    P = draw(st.integers(0, max_prefix))
    N = draw(st.one_of(st.integers(1, 4), st.integers(1, max_n)))
    prefix = draw(st.lists(ids, min_size=P, max_size=P))
    responses = [draw(st.lists(ids, min_size=1, max_size=draw(st.sampled_from([1, 1, 2, 3]))))
                 for _ in range(N)]
    starts = [draw(st.integers(0, len(r) - 1)) for r in responses] if draw(st.booleans()) else None
    sep = draw(st.lists(ids, min_size=1 if N > 1 else 0, max_size=3))
    explicit = draw(st.booleans()) if joint is None else joint
    joint_ids = joint_scores = joint_starts = None
    if explicit:  # a body whose score offsets are strictly increasing, a tail after the last one or not
        gaps = [draw(st.integers(0, 2)) for _ in range(N)]
        tail = draw(st.integers(0, 2))
        joint_scores, at = [], -1
        for g in gaps:
            at += g + 1
            joint_scores.append(at)
        joint_ids = draw(st.lists(ids, min_size=at + 1 + tail, max_size=at + 1 + tail))
        lows = [0] + [s + 1 for s in joint_scores[:-1]]
        joint_starts = [draw(st.integers(lo, hi)) for lo, hi in zip(lows, joint_scores)] if draw(st.booleans()) else None
    kind = draw(st.sampled_from(["none", "1d", "mrope"])) if mrope is None else ("mrope" if mrope else "none")
    positions = None
    if kind == "1d":  # e.g. a prefix whose positions skip (placeholders folded)
        positions = torch.tensor(draw(st.lists(st.integers(0, 30), min_size=P, max_size=P)), dtype=torch.int64)
    elif kind == "mrope":  # Qwen mrope: t/h/w rows, not monotone over vision tokens
        positions = torch.tensor([draw(st.lists(st.integers(0, 30), min_size=P, max_size=P)) for _ in range(3)],
                                 dtype=torch.int64).reshape(3, P)
    sid = draw(st.one_of(st.none(), st.text(min_size=1, max_size=4), st.integers(0, 99)))
    return SampleLayout(prefix, responses, sep, positions, sid, joint_ids=joint_ids, joint_score_offsets=joint_scores,
                        response_starts=starts, joint_starts=joint_starts)


@st.composite
def batch_st(draw, max_samples=4, max_n=64, mode=None, mrope=None, joint=None):
    mode = draw(st.sampled_from(MODES)) if mode is None else mode
    layouts = draw(st.lists(layout_st(mrope=mrope, max_n=max_n, joint=joint), min_size=1, max_size=max_samples))
    return layouts, mode


# --------------------------------------------------------------------------------------------------
# The oracle: the layout written out token by token in plain Python
# --------------------------------------------------------------------------------------------------

def joint_body(l):
    """(ids, score offsets, start offsets) of a layout's joint body, as the docstring defines it."""
    if l.joint_ids is not None:
        scores = list(l.joint_score_offsets)
        starts = list(l.joint_starts) if l.joint_starts is not None else [0] + [s + 1 for s in scores[:-1]]
        return list(l.joint_ids), scores, starts
    ids, scores, starts = [], [], []
    for i, r in enumerate(l.response_ids):
        if i:
            ids += list(l.separator_ids)
        starts.append(len(ids) + (l.response_starts[i] if l.response_starts is not None else 0))
        ids += list(r)
        scores.append(len(ids) - 1)
    return ids, scores, starts


def oracle(layouts, mode):
    """Per token: id, position rows, segment; per sequence: length, sample, prefix length; per
    score: position and start. Written independently of mrrm.data.packing, as directly as possible."""
    K = 3 if any(l.prefix_positions is not None and l.prefix_positions.dim() == 2 for l in layouts) else 1
    ids, pos, seg, seq_lens, seq_sample, prefix_lens, scores, starts = [], [[] for _ in range(K)], [], [], [], [], [], []

    def emit(tok, position_rows, segment):
        ids.append(tok)
        for k in range(K):
            pos[k].append(position_rows[k] if isinstance(position_rows, list) else position_rows)
        seg.append(segment)

    for b, l in enumerate(layouts):
        P = len(l.prefix_ids)
        if l.prefix_positions is None:
            prefix_rows = [list(range(P)) for _ in range(K)]
        elif l.prefix_positions.dim() == 1:
            prefix_rows = [l.prefix_positions.tolist() for _ in range(K)]
        else:
            prefix_rows = l.prefix_positions.tolist()
        start = max(max(r) for r in prefix_rows) + 1 if P else 0
        N = len(l.response_ids)
        rstarts = l.response_starts or [0] * N

        def emit_prefix():
            for j, tok in enumerate(l.prefix_ids):
                emit(tok, [prefix_rows[k][j] for k in range(K)], 0)

        first = len(ids)
        if mode == "joint":
            body, sc, st_ = joint_body(l)
            emit_prefix()
            base = len(ids)
            for j, tok in enumerate(body):
                emit(tok, start + j, min(N, 1 + sum(1 for x in sc if x < j)))
            scores += [base + x for x in sc]
            starts += [base + x for x in st_]
            seq_lens.append(len(ids) - first)
            seq_sample.append(b)
            prefix_lens.append(P)
        elif mode == "independent":
            emit_prefix()
            for i, r in enumerate(l.response_ids):
                base = len(ids)
                for j, tok in enumerate(r):
                    emit(tok, start + j, i + 1)
                scores.append(base + len(r) - 1)
                starts.append(base + rstarts[i])
            seq_lens.append(len(ids) - first)
            seq_sample.append(b)
            prefix_lens.append(P)
        else:
            for i, r in enumerate(l.response_ids):
                first = len(ids)
                emit_prefix()
                base = len(ids)
                for j, tok in enumerate(r):
                    emit(tok, start + j, i + 1)
                scores.append(base + len(r) - 1)
                starts.append(base + rstarts[i])
                seq_lens.append(len(ids) - first)
                seq_sample.append(b)
                prefix_lens.append(P)
    return dict(ids=ids, pos=pos if K > 1 else pos[0], seg=seg, seq_lens=seq_lens, seq_sample=seq_sample,
                prefix_lens=prefix_lens, scores=scores, starts=starts)


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------

@FAST
@given(batch_st())
def test_pack_matches_oracle(case):
    layouts, mode = case
    batch = pack(layouts, mode)
    want = oracle(layouts, mode)
    T = len(want["ids"])

    assert batch.input_ids.dtype == torch.int64 and batch.position_ids.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32 and batch.segment_ids.dtype == torch.int32
    for name in ("score_positions", "start_positions", "group_offsets", "score_sample", "score_response",
                 "sequence_sample", "prefix_lengths"):
        assert getattr(batch, name).dtype == torch.int64, name
    assert batch.input_ids.tolist() == want["ids"]
    assert batch.position_ids.tolist() == want["pos"]
    assert batch.segment_ids.tolist() == want["seg"]
    assert batch.score_positions.tolist() == want["scores"]
    assert batch.start_positions.tolist() == want["starts"]
    assert batch.sequence_sample.tolist() == want["seq_sample"]
    assert batch.prefix_lengths.tolist() == want["prefix_lens"]
    assert batch.mask == ("shared_prefix" if mode == "independent" else "causal")
    assert batch.mode == mode

    # cu_seqlens / max_seqlen
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == T == batch.num_tokens
    assert [b - a for a, b in zip(cu[:-1], cu[1:])] == want["seq_lens"]
    assert batch.max_seqlen == max(want["seq_lens"])
    assert batch.num_sequences == len(want["seq_lens"])

    # the score tokens are what they should be
    if mode == "joint":
        expected = [joint_body(l)[0][o] for l in layouts for o in joint_body(l)[1]]
    else:
        expected = [r[-1] for l in layouts for r in l.response_ids]
    assert batch.input_ids[batch.score_positions].tolist() == expected
    assert (batch.start_positions <= batch.score_positions).all()

    # score maps and group offsets
    Ns = [len(l.response_ids) for l in layouts]
    assert batch.group_offsets.tolist() == [sum(Ns[:b]) for b in range(len(Ns) + 1)]
    assert batch.score_sample.tolist() == [b for b, n in enumerate(Ns) for _ in range(n)]
    assert batch.score_response.tolist() == [i for n in Ns for i in range(n)]
    assert (batch.num_samples, batch.num_scores) == (len(layouts), sum(Ns))
    assert batch.sample_indices == list(range(len(layouts)))
    # the segment of each score token is its response
    assert (batch.segment_ids[batch.score_positions].long() == batch.score_response + 1).all()

    # token accounting
    assert sum(sample_num_tokens(l, mode) for l in layouts) == T


@FAST
@given(batch_st(mrope=False))
def test_positions_direct(case):
    """Positions stated directly (no oracle): joint consecutive; independent restarts at the prefix
    end for every response; single sequences each like a standalone [prefix, r_i]."""
    layouts, mode = case
    batch = pack(layouts, mode)
    cu = batch.cu_seqlens.tolist()
    pos, seg = batch.position_ids, batch.segment_ids
    for s in range(batch.num_sequences):
        p, g = pos[cu[s]:cu[s + 1]], seg[cu[s]:cu[s + 1]]
        P = int(batch.prefix_lengths[s])
        assert (g[:P] == 0).all() and (g[P:] > 0).all()
        assert (g[1:] >= g[:-1]).all()  # contiguous, increasing segments
        if mode in ("joint", "single"):
            assert p.tolist() == list(range(len(p)))
        else:
            assert p[:P].tolist() == list(range(P))
            for i in g[P:].unique().tolist():
                pi = p[g == i]
                assert pi.tolist() == list(range(P, P + len(pi)))
        if mode == "single":
            assert len(g[P:].unique()) == 1


def _alone(l, i):
    """The one-response layout [prefix, r_i] (no joint body of its own: r_i is it)."""
    starts = None if l.response_starts is None else [l.response_starts[i]]
    return dataclasses.replace(l, response_ids=[l.response_ids[i]], response_starts=starts, joint_ids=None,
                               joint_score_offsets=None, joint_starts=None)


@FAST
@given(batch_st(mode="single"))
def test_single_sequences_are_standalone_packs(case):
    """Sequence i of a `single` pack is exactly the joint pack of the one-response sample [prefix, r_i]."""
    layouts, _ = case
    batch = pack(layouts, "single")
    cu = batch.cu_seqlens.tolist()
    s = 0
    for l in layouts:
        for i in range(len(l.response_ids)):
            alone = pack([_alone(l, i)], "joint")
            lo, hi = cu[s], cu[s + 1]
            assert batch.input_ids[lo:hi].tolist() == alone.input_ids.tolist()
            # (a text-only sample in an mrope batch has its positions repeated in every row)
            assert torch.equal(batch.position_ids[..., lo:hi], alone.position_ids.expand_as(batch.position_ids[..., lo:hi]))
            assert int(batch.score_positions[s]) - lo == int(alone.score_positions[0])
            assert int(batch.start_positions[s]) - lo == int(alone.start_positions[0])
            s += 1


def test_small_example_exact():
    """Hand-written cases, to read the layouts off."""
    l = SampleLayout([1, 2, 3], [[4, 5], [6], [7, 8, 9]], [10, 11, 12])
    j = pack([l], "joint")
    assert j.input_ids.tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 6, 10, 11, 12, 7, 8, 9]
    assert j.position_ids.tolist() == list(range(15))
    assert j.segment_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    assert j.score_positions.tolist() == [4, 8, 14] and j.start_positions.tolist() == [3, 8, 12]
    ind = pack([l], "independent")
    assert ind.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert ind.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert ind.score_positions.tolist() == [4, 5, 8]
    assert ind.mask == "shared_prefix"
    sg = pack([l], "single")
    assert sg.input_ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 6, 1, 2, 3, 7, 8, 9]
    assert sg.cu_seqlens.tolist() == [0, 5, 9, 15] and sg.max_seqlen == 6
    assert sg.score_positions.tolist() == [4, 8, 14]
    assert sg.prefix_lengths.tolist() == [3, 3, 3]
    # the authors' layout: an explicit joint body (the separator's newlines merged into the
    # responses' last tokens, a template tail), every response alone with its own tail
    r = SampleLayout([1, 2], [[4, 5, 20, 21], [6, 20, 21]], joint_ids=[4, 30, 7, 31, 6, 20, 21],
                     joint_score_offsets=[1, 6], joint_starts=[0, 4])
    j = pack([r], "joint")
    assert j.input_ids.tolist() == [1, 2, 4, 30, 7, 31, 6, 20, 21]
    assert j.score_positions.tolist() == [3, 8] and j.start_positions.tolist() == [2, 6]
    assert j.segment_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    ind = pack([r], "independent")
    assert ind.input_ids.tolist() == [1, 2, 4, 5, 20, 21, 6, 20, 21]
    assert ind.score_positions.tolist() == [5, 8] and ind.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    assert sample_num_tokens(r, "joint") == 9 and sample_num_tokens(r, "single") == 11
    # mrope prefix: responses continue from the max over all rows + 1, identical in every row
    mp = torch.tensor([[0, 1, 1], [0, 1, 4], [0, 2, 2]])
    m = pack([dataclasses.replace(l, prefix_positions=mp)], "independent")
    assert m.position_ids.shape == (3, 9)
    assert m.position_ids[:, :3].tolist() == mp.tolist()
    assert (m.position_ids[:, 3:] == m.position_ids[0, 3:]).all()
    assert m.position_ids[0, 3:].tolist() == [5, 6, 5, 5, 6, 7]


def test_mixed_position_rows():
    """A text-only sample batched with an mrope sample gets its arange repeated in every row."""
    a = SampleLayout([1, 2], [[3]], [], prefix_positions=torch.tensor([[0, 1], [0, 5], [0, 1]]))
    b = SampleLayout([7], [[8], [9]], [5], prefix_positions=torch.tensor([4]))
    c = SampleLayout([7, 7], [[8]], [5])
    batch = pack([a, b, c], "joint")
    assert batch.position_ids.tolist() == [[0, 1, 6, 4, 5, 6, 7, 0, 1, 2],
                                           [0, 5, 6, 4, 5, 6, 7, 0, 1, 2],
                                           [0, 1, 6, 4, 5, 6, 7, 0, 1, 2]]
    bad = SampleLayout([1, 2], [[3]], [], prefix_positions=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sample 2 has 4"):
        pack([a, c, bad])


# --------------------------------------------------------------------------------------------------
# The key equivalence: independent (shared_prefix) == single (causal), token for token
# --------------------------------------------------------------------------------------------------

D, H = 8, 2
_gen = torch.Generator().manual_seed(1234)
_TABLES = {name: torch.randn(VOCAB, H, D, generator=_gen, dtype=torch.float64) for name in "qkv"}
MAX_POSITION = 4096  # above any position the strategies can produce (prefix positions + N responses)
_POS_TABLES = {name: torch.randn(3, MAX_POSITION, H, D, generator=_gen, dtype=torch.float64) for name in "qkv"}


def qkv_of(batch: PackedBatch):
    """q/k/v per token as a function of (token id, position ids) only: equal tokens at equal
    positions get equal q/k/v, whichever stream they are in (all position rows contribute)."""
    pos = batch.position_ids if batch.position_ids.dim() == 2 else batch.position_ids[None]
    out = []
    for name in "qkv":
        x = _TABLES[name][batch.input_ids].clone()
        for k in range(pos.shape[0]):
            x = x + _POS_TABLES[name][k][pos[k]]
        out.append(x)
    return out


def attend(batch: PackedBatch, mask=None):
    q, k, v = qkv_of(batch)
    mask = batch.mask if mask is None else mask
    return torch_ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, mask=mask,
                                      segment_ids=batch.segment_ids if mask == "shared_prefix" else None)


def token_map(layouts):
    """Pairs (index in the independent pack, index in the single pack) of tokens that must agree:
    the prefix (against every copy of it) and each response's own tokens."""
    ind, sgl = [], []
    ind_off = sgl_off = 0
    for l in layouts:
        P = len(l.prefix_ids)
        body = ind_off + P
        for r in l.response_ids:
            ind += list(range(ind_off, ind_off + P)) + list(range(body, body + len(r)))
            sgl += list(range(sgl_off, sgl_off + P + len(r)))
            sgl_off += P + len(r)
            body += len(r)
        ind_off = body
    return torch.tensor(ind), torch.tensor(sgl)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch_st(max_samples=3, max_n=64))
def test_independent_equals_single(case):
    layouts, _ = case
    ind = pack(layouts, "independent")
    sgl = pack(layouts, "single")
    out_ind, out_sgl = attend(ind), attend(sgl)
    i_idx, s_idx = token_map(layouts)
    assert ind.input_ids[i_idx].tolist() == sgl.input_ids[s_idx].tolist()  # the map itself is right
    torch.testing.assert_close(out_ind[i_idx], out_sgl[s_idx], rtol=1e-12, atol=1e-12)
    # and what the reward head reads: the score and start rows, in the same order
    torch.testing.assert_close(out_ind[ind.score_positions], out_sgl[sgl.score_positions], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_ind[ind.start_positions], out_sgl[sgl.start_positions], rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch_st(max_samples=2, max_n=8, joint=False))
def test_equivalence_is_not_vacuous(case):
    """Where some sample has N > 1, a later response must see different context in joint than in
    independent, and causal attention over the independent stream (mask dropped) must differ
    from single: so the test above really checks the mask and positions."""
    layouts, _ = case
    if all(len(l.response_ids) == 1 for l in layouts):
        return
    # inputs that cannot show a difference: a sample made of one repeated token id (every token
    # has the same q/k/v), or a sample with two identical responses (a later response then sees an
    # exact copy of itself earlier, and attention over duplicated keys equals attention over one)
    assume(all(len(set(l.prefix_ids + sum(l.response_ids, []) + l.separator_ids)) > 1
               and len(set(map(tuple, l.response_ids))) == len(l.response_ids)
               for l in layouts if len(l.response_ids) > 1))
    ind = pack(layouts, "independent")
    joint = pack(layouts, "joint")
    sgl = pack(layouts, "single")
    later = ind.score_response > 0  # responses with an earlier sibling
    out_ind = attend(ind)[ind.score_positions][later]
    out_joint = attend(joint)[joint.score_positions][later]
    out_sgl = attend(sgl)[sgl.score_positions][later]
    out_nomask = attend(ind, mask="causal")[ind.score_positions][later]
    # the same score tokens, in different contexts
    assert torch.equal(joint.input_ids[joint.score_positions], ind.input_ids[ind.score_positions])
    assert (out_joint - out_ind).abs().amax(-1).amax(-1).min() > 1e-9
    assert (out_nomask - out_sgl).abs().amax(-1).amax(-1).min() > 1e-9


def test_packed_metadata_accepted_by_public_op():
    """The public op's validation accepts the packed metadata (segment ids non-decreasing per
    sequence, int32 offsets), and its CPU backend agrees with single scoring too."""
    layouts = [SampleLayout([1, 2, 3], [[4, 5], [6], [7, 8, 9]], [10, 11], sample_id="x"),
               SampleLayout([], [[20, 21], [22]], [10, 11]),
               SampleLayout([5], [[30]], [])]
    ind, sgl = pack(layouts, "independent"), pack(layouts, "single")
    for backend in ("torch", "cpu"):
        outs = []
        for batch in (ind, sgl):
            q, k, v = qkv_of(batch)
            seg = batch.segment_ids if batch.mask == "shared_prefix" else None
            outs.append(ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, mask=batch.mask,
                                             segment_ids=seg, backend=backend))
        torch.testing.assert_close(outs[0][ind.score_positions], outs[1][sgl.score_positions])


# --------------------------------------------------------------------------------------------------
# Scores: split and merge
# --------------------------------------------------------------------------------------------------

@FAST
@given(batch_st(max_n=16))
def test_split_scores_round_trip(case):
    layouts, mode = case
    batch = pack(layouts, mode)
    scores = torch.randn(batch.num_scores, dtype=torch.float64)
    groups = split_scores(scores, batch.group_offsets)
    assert [len(g) for g in groups] == [len(l.response_ids) for l in layouts]
    assert [x for g in groups for x in g] == scores.tolist()
    for m, (b, i) in enumerate(zip(batch.score_sample.tolist(), batch.score_response.tolist())):
        assert groups[b][i] == scores[m].item()
    assert split_scores(scores.tolist(), batch.group_offsets.tolist()) == groups


def _score_of(sample, response):
    return sample * 100.0 + response


@FAST
@given(batch_st(max_samples=12, max_n=12), st.integers(1, 120), st.sampled_from(["own_batch", "error"]))
def test_micro_batches(case, max_tokens, oversize):
    layouts, mode = case
    sizes = [sample_num_tokens(l, mode) for l in layouts]
    too_big = [i for i, n in enumerate(sizes) if n > max_tokens]
    if too_big and oversize == "error":
        with pytest.raises(ValueError, match=rf"^sample {too_big[0]}\b.*max_tokens={max_tokens}"):
            pack_micro_batches(layouts, mode, max_tokens, oversize=oversize)
        return
    batches = pack_micro_batches(layouts, mode, max_tokens, oversize=oversize)
    # order preserved, nothing lost or duplicated
    order = [i for b in batches for i in b.sample_indices]
    assert order == list(range(len(layouts)))
    for j, b in enumerate(batches):
        assert b.num_tokens == sum(sizes[i] for i in b.sample_indices)
        if b.num_tokens > max_tokens:  # only an oversize sample, alone
            assert len(b.sample_indices) == 1 and b.sample_indices[0] in too_big
        # greedy: the next sample would not have fit (or one of the two is oversize)
        if j + 1 < len(batches):
            nxt = batches[j + 1].sample_indices[0]
            assert b.num_tokens + sizes[nxt] > max_tokens
        # each micro-batch is the pack of its subset
        sub = pack([layouts[i] for i in b.sample_indices], mode, sample_indices=b.sample_indices)
        assert torch.equal(sub.input_ids, b.input_ids) and torch.equal(sub.score_positions, b.score_positions)
        assert sub.sample_indices == b.sample_indices
    # merge back: scores built from (original sample, response) come back in the original order
    per_batch = [torch.tensor([_score_of(b.sample_indices[s], r)
                               for s, r in zip(b.score_sample.tolist(), b.score_response.tolist())])
                 for b in batches]
    merged = [[None] * len(lay.response_ids) for lay in layouts]
    for b, s in zip(batches, per_batch):  # as RewardModel.score_encoded puts them back
        for m, (si, r) in enumerate(zip(b.score_sample.tolist(), b.score_response.tolist())):
            merged[b.sample_indices[si]][r] = float(s[m])
    assert merged == [[_score_of(i, r) for r in range(len(l.response_ids))] for i, l in enumerate(layouts)]


def test_micro_batch_policy_examples():
    l3 = SampleLayout([1], [[2], [3]], [4])              # 4 tokens joint
    big = SampleLayout([1] * 10, [[2]], [], sample_id="big")  # 11 tokens joint
    batches = pack_micro_batches([l3, l3, l3, big, l3], "joint", 8, oversize="own_batch")
    assert [b.sample_indices for b in batches] == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match=r"sample 3 \(sample_id='big'\) has 11 tokens"):
        pack_micro_batches([l3, l3, l3, big, l3], "joint", 8)
    # the budget counts the mode's tokens: single repeats the prefix
    assert sample_num_tokens(l3, "single") == 4 and sample_num_tokens(l3, "independent") == 3
    assert [b.sample_indices for b in pack_micro_batches([l3] * 3, "single", 4)] == [[0], [1], [2]]
    assert [b.sample_indices for b in pack_micro_batches([l3] * 5, "joint", 100, max_samples=2)] == [[0, 1], [2, 3], [4]]
    assert pack_micro_batches([], "joint", 8) == []
    with pytest.raises(ValueError, match="max_tokens"):
        pack_micro_batches([l3], "joint", 0)
    with pytest.raises(ValueError, match="oversize"):
        pack_micro_batches([l3], "joint", 8, oversize="drop")


def test_split_scores_errors():
    with pytest.raises(ValueError, match="group_offsets"):
        split_scores(torch.zeros(3), torch.tensor([0, 2]))


# --------------------------------------------------------------------------------------------------
# Bad inputs: the error names the sample and the problem
# --------------------------------------------------------------------------------------------------

GOOD = SampleLayout([1, 2], [[3, 4], [5]], [6, 7])
GOOD_JOINT = SampleLayout([1, 2], [[3, 4, 9], [5, 9]], joint_ids=[3, 4, 8, 5, 9], joint_score_offsets=[1, 4])

BAD = {
    "no responses": (GOOD, dict(response_ids=[]), r"has no responses"),
    "empty response": (GOOD, dict(response_ids=[[3], []]), r"response 1 is empty"),
    "empty separator, N > 1": (GOOD, dict(separator_ids=[]), r"separator_ids is empty.*2 responses"),
    "negative prefix id": (GOOD, dict(prefix_ids=[1, -3]), r"prefix_ids\[1\] = -3 is a negative token id"),
    "negative response id": (GOOD, dict(response_ids=[[3], [5, -1]]),
                             r"response_ids\[1\]\[1\] = -1 is a negative token id"),
    "float id": (GOOD, dict(response_ids=[[3.0], [5]]), r"response_ids\[0\]\[0\] = 3.0 is not an integer"),
    "str id": (GOOD, dict(separator_ids=[6, "x"]), r"separator_ids\[1\] = 'x' is not an integer"),
    "float tensor ids": (GOOD, dict(prefix_ids=torch.tensor([1.0, 2.0])), r"prefix_ids must hold integer"),
    "negative tensor id": (GOOD, dict(prefix_ids=torch.tensor([1, -2])), r"prefix_ids\[1\] = -2 is a negative"),
    "response not a list": (GOOD, dict(response_ids=[3, 4]), r"response_ids\[0\] must be a list"),
    "prefix_positions too short": (GOOD, dict(prefix_positions=torch.arange(1)),
                                   r"prefix_positions has 1 positions but the prefix has 2"),
    "prefix_positions rows too short": (GOOD, dict(prefix_positions=torch.zeros(3, 3, dtype=torch.long)),
                                        r"prefix_positions has 3 positions but the prefix has 2"),
    "prefix_positions 3-D": (GOOD, dict(prefix_positions=torch.zeros(1, 3, 2, dtype=torch.long)),
                             r"prefix_positions must be \[P\] or \[K, P\]"),
    "prefix_positions float": (GOOD, dict(prefix_positions=torch.zeros(2)), r"prefix_positions must hold integers"),
    "response start past its end": (GOOD, dict(response_starts=[0, 1]), r"response_starts\[1\] = 1 is outside 0..0"),
    "response starts too few": (GOOD, dict(response_starts=[0]), r"response_starts has 1 entries for 2"),
    "joint without offsets": (GOOD_JOINT, dict(joint_score_offsets=None), r"joint_ids needs joint_score_offsets"),
    "joint offsets not increasing": (GOOD_JOINT, dict(joint_score_offsets=[4, 1]), r"strictly increasing"),
    "joint offset outside": (GOOD_JOINT, dict(joint_score_offsets=[1, 5]), r"joint_score_offsets\[1\] = 5 is outside"),
    "joint offsets too many": (GOOD_JOINT, dict(joint_score_offsets=[0, 1, 2]), r"has 3 entries for 2 responses"),
    "joint start outside": (GOOD_JOINT, dict(joint_starts=[0, 9]), r"joint_starts\[1\] = 9 is outside"),
    "joint starts after score": (GOOD_JOINT, dict(joint_starts=[2, 3]), r"response 0 starts at joint offset 2, "
                                                                        r"after its score offset 1"),
    "offsets without joint": (GOOD, dict(joint_score_offsets=[0, 1]), r"without joint_ids"),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("sample_id", [None, "prompt-7"])
def test_bad_layouts_name_the_sample(name, sample_id):
    good, changes, problem = BAD[name]
    bad = dataclasses.replace(good, sample_id=sample_id, **changes)
    layouts = [GOOD, GOOD_JOINT, bad, GOOD]
    where = r"sample 2" + (r" \(sample_id='prompt-7'\)" if sample_id else "") + ": "
    for call in (lambda: pack(layouts, "joint"),
                 lambda: pack_micro_batches(layouts, "independent", 1000)):
        with pytest.raises(ValueError, match="^" + where + ".*" + problem):
            call()
    with pytest.raises(ValueError, match=problem):
        sample_num_tokens(bad, "single")
    # with caller indices, the error names the caller's index
    with pytest.raises(ValueError, match=r"^sample 12\b"):
        pack(layouts, sample_indices=[10, 11, 12, 13])


def test_valid_edge_cases():
    # N == 1 needs no separator
    one = SampleLayout([], [[9]], [])
    for mode in MODES:
        b = pack([one], mode)
        assert b.input_ids.tolist() == [9] and b.score_positions.tolist() == [0]
        assert b.position_ids.tolist() == [0] and b.max_seqlen == 1
    # token ids may come as tensors or numpy-like integers
    t = SampleLayout(torch.tensor([1, 2]), [torch.tensor([3]), [4]], torch.tensor([5]))
    assert pack([t]).input_ids.tolist() == [1, 2, 3, 5, 4]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        pack([GOOD], "pairwise")
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_num_tokens(GOOD, "both")
    with pytest.raises(ValueError, match="at least one sample"):
        pack([])
    with pytest.raises(ValueError, match="sample_indices has 1 entries for 2 samples"):
        pack([GOOD, GOOD], sample_indices=[0])
    with pytest.raises(ValueError, match="expected a SampleLayout"):
        pack([GOOD, {"prefix_ids": []}])


def test_to_device_copies():
    b = pack([GOOD, GOOD], "independent", sample_indices=[4, 2])
    c = b.to("cpu")
    assert c is not b and c.sample_indices == [4, 2] and c.sample_indices is not b.sample_indices
    assert torch.equal(c.input_ids, b.input_ids) and c.mask == "shared_prefix" and c.max_seqlen == b.max_seqlen
    m = b.to("meta")
    for f in dataclasses.fields(PackedBatch):
        value = getattr(m, f.name)
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", f.name
            assert value.dtype == getattr(b, f.name).dtype and value.shape == getattr(b, f.name).shape
            assert getattr(b, f.name).device.type == "cpu"  # the original is untouched
    assert (m.num_tokens, m.num_samples, m.num_scores) == (b.num_tokens, b.num_samples, b.num_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_pinned():
    b = pack([GOOD, GOOD], "single").pin_memory()
    g = b.to("cuda")
    torch.cuda.synchronize()
    assert g.input_ids.is_cuda and torch.equal(g.input_ids.cpu(), b.input_ids)
    assert torch.equal(g.to("cpu").score_positions, b.score_positions)
