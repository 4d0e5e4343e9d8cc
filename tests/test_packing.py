"""mrrm.packing: layouts -> packed varlen batches, checked against a plain-Python oracle, and the key
equivalence: shared_prefix attention over an `independent` pack == causal attention over `single`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mrrm import ops, reference
from mrrm.packing import (MODES, SCORE_AT, PackedBatch, SampleLayout, merge_scores, pack,
                          pack_micro_batches, sample_num_tokens, split_scores)

FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
VOCAB = 40  # small on purpose: repeated ids make the position bookkeeping matter


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

@st.composite
def layout_st(draw, score_at, mrope=None, max_n=64, max_prefix=5):
    """A random valid SampleLayout. mrope: None = draw, True = [3, P] prefix positions, False = none."""
    ids = st.integers(0, VOCAB - 1)
    P = draw(st.integers(0, max_prefix))
    N = draw(st.one_of(st.integers(1, 4), st.integers(1, max_n)))
    prefix = draw(st.lists(ids, min_size=P, max_size=P))
    responses = [draw(st.lists(ids, min_size=1, max_size=draw(st.sampled_from([1, 1, 2, 3]))))
                 for _ in range(N)]
    min_sep = 1 if (N > 1 or score_at == "separator") else 0
    sep = draw(st.lists(ids, min_size=min_sep, max_size=3))
    sep_index = draw(st.integers(0, len(sep) - 1)) if sep else draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["none", "1d", "mrope"])) if mrope is None else ("mrope" if mrope else "none")
    positions = None
    if kind == "1d":  # e.g. a prefix whose positions skip (placeholders folded)
        positions = torch.tensor(draw(st.lists(st.integers(0, 30), min_size=P, max_size=P)), dtype=torch.int64)
    elif kind == "mrope":  # Qwen mrope: t/h/w rows, not monotone over vision tokens
        positions = torch.tensor([draw(st.lists(st.integers(0, 30), min_size=P, max_size=P)) for _ in range(3)],
                                 dtype=torch.int64).reshape(3, P)
    sid = draw(st.one_of(st.none(), st.text(min_size=1, max_size=4), st.integers(0, 99)))
    return SampleLayout(prefix, responses, sep, sep_index, positions, sid)


@st.composite
def batch_st(draw, max_samples=4, max_n=64, mode=None, score_at=None, mrope=None):
    score_at = draw(st.sampled_from(SCORE_AT)) if score_at is None else score_at
    mode = draw(st.sampled_from(MODES)) if mode is None else mode
    layouts = draw(st.lists(layout_st(score_at, mrope=mrope, max_n=max_n), min_size=1, max_size=max_samples))
    return layouts, mode, score_at


# --------------------------------------------------------------------------------------------------
# The oracle: the layout written out token by token in plain Python
# --------------------------------------------------------------------------------------------------

def oracle(layouts, mode, score_at):
    """Per token: id, position rows, segment; per sequence: length, sample, prefix length; per
    score: position. Written independently of mrrm.packing, as directly as possible."""
    K = 3 if any(l.prefix_positions is not None and l.prefix_positions.dim() == 2 for l in layouts) else 1
    ids, pos, seg, seq_lens, seq_sample, prefix_lens, scores = [], [[] for _ in range(K)], [], [], [], [], []

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

        def emit_prefix():
            for j, tok in enumerate(l.prefix_ids):
                emit(tok, [prefix_rows[k][j] for k in range(K)], 0)

        if mode == "single":
            for i, r in enumerate(l.response_ids):
                first = len(ids)
                emit_prefix()
                p = start
                for tok in r:
                    if score_at == "last" and p == start + len(r) - 1:
                        scores.append(len(ids))
                    emit(tok, p, i + 1)
                    p += 1
                if score_at == "separator":
                    for j, tok in enumerate(l.separator_ids):
                        if j == l.separator_index:
                            scores.append(len(ids))
                        emit(tok, p, i + 1)
                        p += 1
                seq_lens.append(len(ids) - first)
                seq_sample.append(b)
                prefix_lens.append(P)
        else:
            first = len(ids)
            emit_prefix()
            p = start
            for i, r in enumerate(l.response_ids):
                if mode == "independent":
                    p = start
                for j, tok in enumerate(r):
                    if score_at == "last" and j == len(r) - 1:
                        scores.append(len(ids))
                    emit(tok, p, i + 1)
                    p += 1
                if i < N - 1 or score_at == "separator":
                    for j, tok in enumerate(l.separator_ids):
                        if score_at == "separator" and j == l.separator_index:
                            scores.append(len(ids))
                        emit(tok, p, i + 1)
                        p += 1
            seq_lens.append(len(ids) - first)
            seq_sample.append(b)
            prefix_lens.append(P)
    return dict(ids=ids, pos=pos if K > 1 else pos[0], seg=seg, seq_lens=seq_lens, seq_sample=seq_sample,
                prefix_lens=prefix_lens, scores=scores)


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------

@FAST
@given(batch_st())
def test_pack_matches_oracle(case):
    layouts, mode, score_at = case
    batch = pack(layouts, mode, score_at=score_at)
    want = oracle(layouts, mode, score_at)
    T = len(want["ids"])

    assert batch.input_ids.dtype == torch.int64 and batch.position_ids.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32 and batch.segment_ids.dtype == torch.int32
    for name in ("score_positions", "group_offsets", "score_sample", "score_response", "sequence_sample",
                 "prefix_lengths"):
        assert getattr(batch, name).dtype == torch.int64, name
    assert batch.input_ids.tolist() == want["ids"]
    assert batch.position_ids.tolist() == want["pos"]
    assert batch.segment_ids.tolist() == want["seg"]
    assert batch.score_positions.tolist() == want["scores"]
    assert batch.sequence_sample.tolist() == want["seq_sample"]
    assert batch.prefix_lengths.tolist() == want["prefix_lens"]
    assert batch.mask == ("shared_prefix" if mode == "independent" else "causal")
    assert (batch.mode, batch.score_at) == (mode, score_at)

    # cu_seqlens / max_seqlen
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == T == batch.num_tokens
    assert [b - a for a, b in zip(cu[:-1], cu[1:])] == want["seq_lens"]
    assert batch.max_seqlen == max(want["seq_lens"])
    assert batch.num_sequences == len(want["seq_lens"])

    # the score tokens are what they should be
    expected_tokens = [r[-1] if score_at == "last" else l.separator_ids[l.separator_index]
                       for l in layouts for r in l.response_ids]
    assert batch.input_ids[batch.score_positions].tolist() == expected_tokens

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
    assert sum(sample_num_tokens(l, mode, score_at) for l in layouts) == T


@FAST
@given(batch_st(mrope=False))
def test_positions_direct(case):
    """Positions stated directly (no oracle): joint consecutive; independent restarts at the prefix
    end for every response; single sequences each like a standalone [prefix, r_i]."""
    layouts, mode, score_at = case
    batch = pack(layouts, mode, score_at=score_at)
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


@FAST
@given(batch_st(mode="single"))
def test_single_sequences_are_standalone_packs(case):
    """Sequence i of a `single` pack is exactly the joint pack of the one-response sample [prefix, r_i]."""
    layouts, _, score_at = case
    batch = pack(layouts, "single", score_at=score_at)
    cu = batch.cu_seqlens.tolist()
    s = 0
    for l in layouts:
        for i, r in enumerate(l.response_ids):
            alone = pack([dataclasses.replace(l, response_ids=[r])], "joint", score_at=score_at)
            lo, hi = cu[s], cu[s + 1]
            assert batch.input_ids[lo:hi].tolist() == alone.input_ids.tolist()
            # (a text-only sample in an mrope batch has its positions repeated in every row)
            assert torch.equal(batch.position_ids[..., lo:hi], alone.position_ids.expand_as(batch.position_ids[..., lo:hi]))
            assert int(batch.score_positions[s]) - lo == int(alone.score_positions[0])
            s += 1


def test_small_example_exact():
    """A hand-written case, to read the layout off."""
    l = SampleLayout([1, 2, 3], [[4, 5], [6], [7, 8, 9]], [10, 11, 12], 1)
    j = pack([l], "joint")
    assert j.input_ids.tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 6, 10, 11, 12, 7, 8, 9]
    assert j.position_ids.tolist() == list(range(15))
    assert j.segment_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert j.score_positions.tolist() == [4, 8, 14]
    ind = pack([l], "independent", score_at="separator")
    assert ind.input_ids.tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 6, 10, 11, 12, 7, 8, 9, 10, 11, 12]
    assert ind.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8]
    assert ind.score_positions.tolist() == [6, 10, 16]
    assert ind.mask == "shared_prefix"
    sg = pack([l], "single")
    assert sg.input_ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 6, 1, 2, 3, 7, 8, 9]
    assert sg.cu_seqlens.tolist() == [0, 5, 9, 15] and sg.max_seqlen == 6
    assert sg.score_positions.tolist() == [4, 8, 14]
    assert sg.prefix_lengths.tolist() == [3, 3, 3]
    # mrope prefix: responses continue from the max over all rows + 1, identical in every row
    mp = torch.tensor([[0, 1, 1], [0, 1, 4], [0, 2, 2]])
    m = pack([dataclasses.replace(l, prefix_positions=mp)], "independent")
    assert m.position_ids.shape == (3, 15)
    assert m.position_ids[:, :3].tolist() == mp.tolist()
    assert (m.position_ids[:, 3:] == m.position_ids[0, 3:]).all()
    assert m.position_ids[0, 3:].tolist() == [5, 6, 7, 8, 9, 5, 6, 7, 8, 5, 6, 7]


def test_mixed_position_rows():
    """A text-only sample batched with an mrope sample gets its arange repeated in every row."""
    a = SampleLayout([1, 2], [[3]], [], 0, prefix_positions=torch.tensor([[0, 1], [0, 5], [0, 1]]))
    b = SampleLayout([7], [[8], [9]], [5], 0, prefix_positions=torch.tensor([4]))
    c = SampleLayout([7, 7], [[8]], [5], 0)
    batch = pack([a, b, c], "joint")
    assert batch.position_ids.tolist() == [[0, 1, 6, 4, 5, 6, 7, 0, 1, 2],
                                           [0, 5, 6, 4, 5, 6, 7, 0, 1, 2],
                                           [0, 1, 6, 4, 5, 6, 7, 0, 1, 2]]
    bad = SampleLayout([1, 2], [[3]], [], 0, prefix_positions=torch.zeros(4, 2, dtype=torch.int64))
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
    return reference.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, mask=mask,
                                      segment_ids=batch.segment_ids if mask == "shared_prefix" else None)


def token_map(layouts, score_at):
    """Pairs (index in the independent pack, index in the single pack) of tokens that must agree:
    the prefix (against every copy of it) and each response's own tokens (plus its separator
    when score_at="separator", which the single sequence then contains too)."""
    ind, sgl = [], []
    ind_off = sgl_off = 0
    for l in layouts:
        P, L, N = len(l.prefix_ids), len(l.separator_ids), len(l.response_ids)
        body = ind_off + P
        for i, r in enumerate(l.response_ids):
            tail = len(r) + (L if score_at == "separator" else 0)
            ind += list(range(ind_off, ind_off + P)) + list(range(body, body + tail))
            sgl += list(range(sgl_off, sgl_off + P + tail))
            sgl_off += P + tail
            body += len(r) + (L if (i < N - 1 or score_at == "separator") else 0)
        ind_off = body
    return torch.tensor(ind), torch.tensor(sgl)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch_st(max_samples=3, max_n=64))
def test_independent_equals_single(case):
    layouts, _, score_at = case
    ind = pack(layouts, "independent", score_at=score_at)
    sgl = pack(layouts, "single", score_at=score_at)
    out_ind, out_sgl = attend(ind), attend(sgl)
    i_idx, s_idx = token_map(layouts, score_at)
    assert ind.input_ids[i_idx].tolist() == sgl.input_ids[s_idx].tolist()  # the map itself is right
    torch.testing.assert_close(out_ind[i_idx], out_sgl[s_idx], rtol=1e-12, atol=1e-12)
    # and what the reward head reads: the score rows, in the same order
    torch.testing.assert_close(out_ind[ind.score_positions], out_sgl[sgl.score_positions], rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch_st(max_samples=2, max_n=8))
def test_equivalence_is_not_vacuous(case):
    """Where some sample has N > 1, a later response must see different context in joint than in
    independent, and causal attention over the independent stream (mask dropped) must differ
    from single: so the test above really checks the mask and positions."""
    layouts, _, score_at = case
    if all(len(l.response_ids) == 1 for l in layouts):
        return
    # inputs that cannot show a difference: a sample made of one repeated token id (every token
    # has the same q/k/v), or a sample with two identical responses (a later response then sees an
    # exact copy of itself earlier, and attention over duplicated keys equals attention over one)
    assume(all(len(set(l.prefix_ids + sum(l.response_ids, []) + l.separator_ids)) > 1
               and len(set(map(tuple, l.response_ids))) == len(l.response_ids)
               for l in layouts if len(l.response_ids) > 1))
    ind = pack(layouts, "independent", score_at=score_at)
    joint = pack(layouts, "joint", score_at=score_at)
    sgl = pack(layouts, "single", score_at=score_at)
    later = ind.score_response > 0  # responses with an earlier sibling
    out_ind = attend(ind)[ind.score_positions][later]
    out_joint = attend(joint)[joint.score_positions][later]
    out_sgl = attend(sgl)[sgl.score_positions][later]
    out_nomask = attend(ind, mask="causal")[ind.score_positions][later]
    assert torch.equal(joint.input_ids, ind.input_ids)  # same stream, different mask / positions
    assert (out_joint - out_ind).abs().amax(-1).amax(-1).min() > 1e-9
    assert (out_nomask - out_sgl).abs().amax(-1).amax(-1).min() > 1e-9


def test_packed_metadata_accepted_by_public_op():
    """The public op's validation accepts the packed metadata (segment ids non-decreasing per
    sequence, int32 offsets), and its CPU backend agrees with single scoring too."""
    layouts = [SampleLayout([1, 2, 3], [[4, 5], [6], [7, 8, 9]], [10, 11], 1, sample_id="x"),
               SampleLayout([], [[20, 21], [22]], [10, 11], 0),
               SampleLayout([5], [[30]], [], 0)]
    ind, sgl = pack(layouts, "independent"), pack(layouts, "single")
    for backend in ("reference", "cpu"):
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
    layouts, mode, score_at = case
    batch = pack(layouts, mode, score_at=score_at)
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
    layouts, mode, score_at = case
    sizes = [sample_num_tokens(l, mode, score_at) for l in layouts]
    too_big = [i for i, n in enumerate(sizes) if n > max_tokens]
    if too_big and oversize == "error":
        with pytest.raises(ValueError, match=rf"^sample {too_big[0]}\b.*max_tokens={max_tokens}"):
            pack_micro_batches(layouts, mode, max_tokens, score_at=score_at, oversize=oversize)
        return
    batches = pack_micro_batches(layouts, mode, max_tokens, score_at=score_at, oversize=oversize)
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
        sub = pack([layouts[i] for i in b.sample_indices], mode, score_at=score_at, sample_indices=b.sample_indices)
        assert torch.equal(sub.input_ids, b.input_ids) and torch.equal(sub.score_positions, b.score_positions)
        assert sub.sample_indices == b.sample_indices
    # merge back: scores built from (original sample, response) come back in the original order
    per_batch = [torch.tensor([_score_of(b.sample_indices[s], r)
                               for s, r in zip(b.score_sample.tolist(), b.score_response.tolist())])
                 for b in batches]
    merged = merge_scores(batches, per_batch)
    assert merged == [[_score_of(i, r) for r in range(len(l.response_ids))] for i, l in enumerate(layouts)]
    # already split per batch works too
    assert merge_scores(batches, [split_scores(s, b.group_offsets) for b, s in zip(batches, per_batch)]) == merged


def test_micro_batch_policy_examples():
    l3 = SampleLayout([1], [[2], [3]], [4], 0)              # 4 tokens joint
    big = SampleLayout([1] * 10, [[2]], [], 0, sample_id="big")  # 11 tokens joint
    batches = pack_micro_batches([l3, l3, l3, big, l3], "joint", 8, oversize="own_batch")
    assert [b.sample_indices for b in batches] == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match=r"sample 3 \(sample_id='big'\) has 11 tokens"):
        pack_micro_batches([l3, l3, l3, big, l3], "joint", 8)
    # the budget counts the mode's tokens: single repeats the prefix
    assert sample_num_tokens(l3, "single") == 4 and sample_num_tokens(l3, "single", "separator") == 6
    assert [b.sample_indices for b in pack_micro_batches([l3] * 3, "single", 4)] == [[0], [1], [2]]
    assert [b.sample_indices for b in pack_micro_batches([l3] * 5, "joint", 100, max_samples=2)] == [[0, 1], [2, 3], [4]]
    assert pack_micro_batches([], "joint", 8) == []
    with pytest.raises(ValueError, match="max_tokens"):
        pack_micro_batches([l3], "joint", 0)
    with pytest.raises(ValueError, match="oversize"):
        pack_micro_batches([l3], "joint", 8, oversize="drop")


def test_merge_scores_errors():
    l = SampleLayout([1], [[2], [3]], [4], 0)
    batches = pack_micro_batches([l, l, l], "joint", 4)
    scores = [torch.zeros(2)] * 3
    assert merge_scores(batches, scores) == [[0.0, 0.0]] * 3
    with pytest.raises(ValueError, match=r"no scores for samples \[3\]"):
        merge_scores(batches, scores, num_samples=4)
    with pytest.raises(ValueError, match="more than one batch"):
        merge_scores(batches + batches[:1], scores + scores[:1])
    with pytest.raises(ValueError, match="number of scores"):
        merge_scores(batches, [torch.zeros(3)] * 3)
    with pytest.raises(ValueError, match="3 batches but 2"):
        merge_scores(batches, scores[:2])
    with pytest.raises(ValueError, match="group_offsets"):
        split_scores(torch.zeros(3), torch.tensor([0, 2]))


# --------------------------------------------------------------------------------------------------
# Bad inputs: the error names the sample and the problem
# --------------------------------------------------------------------------------------------------

GOOD = SampleLayout([1, 2], [[3, 4], [5]], [6, 7], 1)

BAD = {
    "no responses": (dict(response_ids=[]), "last", r"has no responses"),
    "empty response": (dict(response_ids=[[3], []]), "last", r"response 1 is empty"),
    "empty separator, N > 1": (dict(separator_ids=[]), "last", r"separator_ids is empty.*2 responses"),
    "empty separator, score at it": (dict(response_ids=[[3]], separator_ids=[]), "separator",
                                     r"separator_ids is empty.*score_at='separator'"),
    "separator_index too big": (dict(separator_index=2), "last", r"separator_index=2 is out of range"),
    "separator_index negative": (dict(separator_index=-1), "last", r"separator_index=-1 is out of range"),
    "separator_index not int": (dict(separator_index=1.0), "last", r"separator_index must be an int"),
    "negative prefix id": (dict(prefix_ids=[1, -3]), "last", r"prefix_ids\[1\] = -3 is a negative token id"),
    "negative response id": (dict(response_ids=[[3], [5, -1]]), "last",
                             r"response_ids\[1\]\[1\] = -1 is a negative token id"),
    "float id": (dict(response_ids=[[3.0], [5]]), "last", r"response_ids\[0\]\[0\] = 3.0 is not an integer"),
    "str id": (dict(separator_ids=[6, "x"]), "last", r"separator_ids\[1\] = 'x' is not an integer"),
    "float tensor ids": (dict(prefix_ids=torch.tensor([1.0, 2.0])), "last", r"prefix_ids must hold integer"),
    "negative tensor id": (dict(prefix_ids=torch.tensor([1, -2])), "last", r"prefix_ids\[1\] = -2 is a negative"),
    "response not a list": (dict(response_ids=[3, 4]), "last", r"response_ids\[0\] must be a list"),
    "prefix_positions too short": (dict(prefix_positions=torch.arange(1)), "last",
                                   r"prefix_positions has 1 positions but the prefix has 2"),
    "prefix_positions rows too short": (dict(prefix_positions=torch.zeros(3, 3, dtype=torch.long)), "last",
                                        r"prefix_positions has 3 positions but the prefix has 2"),
    "prefix_positions 3-D": (dict(prefix_positions=torch.zeros(1, 3, 2, dtype=torch.long)), "last",
                             r"prefix_positions must be \[P\] or \[K, P\]"),
    "prefix_positions float": (dict(prefix_positions=torch.zeros(2)), "last", r"prefix_positions must hold integers"),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("sample_id", [None, "prompt-7"])
def test_bad_layouts_name_the_sample(name, sample_id):
    changes, score_at, problem = BAD[name]
    bad = dataclasses.replace(GOOD, sample_id=sample_id, **changes)
    layouts = [GOOD, GOOD, bad, GOOD]
    where = r"sample 2" + (r" \(sample_id='prompt-7'\)" if sample_id else "") + ": "
    for call in (lambda: pack(layouts, "joint", score_at=score_at),
                 lambda: pack_micro_batches(layouts, "independent", 1000, score_at=score_at)):
        with pytest.raises(ValueError, match="^" + where + ".*" + problem):
            call()
    with pytest.raises(ValueError, match=problem):
        sample_num_tokens(bad, "single", score_at)
    # with caller indices, the error names the caller's index
    with pytest.raises(ValueError, match=r"^sample 12\b"):
        pack(layouts, score_at=score_at, sample_indices=[10, 11, 12, 13])


def test_valid_edge_cases():
    # N == 1 needs no separator with score_at="last"; separator_index is then not used
    one = SampleLayout([], [[9]], [], 5)
    for mode in MODES:
        b = pack([one], mode)
        assert b.input_ids.tolist() == [9] and b.score_positions.tolist() == [0]
        assert b.position_ids.tolist() == [0] and b.max_seqlen == 1
    # token ids may come as tensors or numpy-like integers
    t = SampleLayout(torch.tensor([1, 2]), [torch.tensor([3]), [4]], torch.tensor([5]), 0)
    assert pack([t]).input_ids.tolist() == [1, 2, 3, 5, 4]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        pack([GOOD], "pairwise")
    with pytest.raises(ValueError, match="score_at must be one of"):
        pack([GOOD], score_at="first")
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
