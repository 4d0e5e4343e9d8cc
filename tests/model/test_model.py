"""RewardModel tests on tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Molmo2 backbones built from configs.

The oracle for every score is a plain transformers forward of a separate backbone holding the same
weights (eager attention, one sample at a time, no packing, the backbone's own rope index) with the
value head applied as an ordinary nn.Sequential. (Checkpoints the authors' code wrote: test_reference.py.)

Tolerances (fp32 on CPU): scores are O(1) (value head weights N(0, 0.5)); packed vs reference
and independent vs single agree to ~1e-6 in practice, asserted at ATOL = 1e-5 absolute. Loads
of a saved checkpoint replay the same weights through the same code, asserted at 1e-6.
"""
from __future__ import annotations

import copy
import math
import os
import time

import pytest
import torch
from model_fixtures import (
    FAMILIES,
    HEAD_DIM,
    build_family,
    build_processor,
    frame_list,
    max_abs_diff,
    randomize_head,
    reference_scores,
    rgb_image,
    sample_token_layout,
    write_mp4,
)

import mrrm
from mrrm.data.encoding import RESP_SEP, BatchError
from mrrm.model import tiny
from mrrm.model.parts import RewardModelConfig
from mrrm.model.reward_model import RewardModel

ATOL = 1e-5          # packed / reference, independent / single, permutation averages (fp32)
ATOL_RELOAD = 1e-6   # the same weights loaded back
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


# -- fixtures ---------------------------------------------------------------------------------------



@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, families):
    return families(request.param)


@pytest.fixture(scope="module")
def qwen2(families):
    return families("qwen2_vl")


@pytest.fixture(scope="module")
def mp4_path(tmp_path_factory):
    """8 frames of 32x32 at 4 fps (2 s): mrrm.data.media samples 4 frames at 2 fps."""
    pytest.importorskip("av")
    return str(write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=8, fps=4, size=32))


@pytest.fixture(scope="module")
def mixed_batch(mp4_path):
    """Images, a frame-list video, an mp4 read through mrrm.data.media, text only; N = 1..8."""
    return [
        {"prompt": "What is shown?", "image": rgb_image(1), "responses": ["a cat", "a dog", "a red car"]},
        {"prompt": "Say hi.", "responses": ["hello there"]},
        {"prompt": "What moves?", "video": frame_list(2, n=4), "id": "frames",
         "responses": ["up", "it moves down", "left", "it stays still"]},
        {"prompt": "Describe the video.", "video": mp4_path, "id": "mp4", "responses": ["dots", "a blue square"]},
        {"prompt": "Which part of the picture?", "image": rgb_image(3),
         "responses": [f"answer {i}: the {w} one" for i, w in enumerate(
             ["left", "right", "top", "bottom", "red", "green", "big", "small"])]},
        {"prompt": "Count to three.", "responses": ["one two three", "three", "one", "two", "1 2 3"]},
        {"prompt": "What is in the image and the video?", "image": rgb_image(5), "video": frame_list(6, n=6),
         "responses": ["a tree", "a house near the water"]},
    ]


def for_family(batch, family):
    """The batch a family can take: Molmo2 takes images or one video per sample, not both."""
    if family != "molmo2":
        return batch
    return [s for s in batch if not ("image" in s and "video" in s)]


class ForwardCounter:
    """Counts RewardModel forward passes (micro-batches) and records each one's packed batch."""

    def __init__(self, model, monkeypatch):
        self.batches = []
        original = model.hidden_states

        def hidden_states(inputs):
            self.batches.append(inputs.packed)
            return original(inputs)
        monkeypatch.setattr(model, "hidden_states", hidden_states)


def assert_close(got, want, atol, what=""):
    diff = max_abs_diff(got, want)
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:g}\n got  {got}\n want {want}"


# -- 1. packed joint scores == the plain transformers forward, one sample at a time --------------

def test_packed_joint_equals_plain_transformers(fam, mixed_batch, monkeypatch):
    mixed_batch = for_family(mixed_batch, fam.family)
    want = [reference_scores(fam, s) for s in mixed_batch]
    assert [len(w) for w in want] == [len(s["responses"]) for s in mixed_batch]
    # non-vacuous: the responses of a sample score differently, well above the tolerance
    assert max(max(w) - min(w) for w in want if len(w) > 1) > 100 * ATOL

    # the packed path, with text and vision attention served by mrrm.ops.varlen_attention
    assert fam.model.packed
    masks = []
    real_attention = mrrm.ops.varlen_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("mask"))
        return real_attention(*args, **kwargs)
    monkeypatch.setattr(mrrm.ops, "varlen_attention", spy)

    counter = ForwardCounter(fam.model, monkeypatch)
    sizes = [fam.model.encoder.encode(s, i).num_tokens for i, s in enumerate(mixed_batch)]

    got = fam.model.score(mixed_batch)  # default budget: every sample in one packed pass
    # (Molmo2 takes images or videos in one forward: its video samples get a pass of their own)
    passes = 2 if fam.family == "molmo2" else 1
    assert len(counter.batches) == passes and sum(b.num_samples for b in counter.batches) == len(mixed_batch)
    assert_close(got, want, ATOL, f"{fam.family} one micro-batch")
    # Molmo2's vision crops keep their own attention; its text attention gets the media blocks
    assert set(masks) == ({"causal"} if fam.family == "molmo2" else {"causal", "bidirectional"}), set(masks)

    # a budget that fits about two samples: several micro-batches, some holding several samples
    counter.batches.clear()
    budget = 2 * sorted(sizes)[len(sizes) // 2]
    got_small = fam.model.score(mixed_batch, max_batch_tokens=budget)
    per_batch = [b.num_samples for b in counter.batches]
    assert 1 < len(per_batch) < len(mixed_batch) and max(per_batch) >= 2, (per_batch, sizes, budget)
    assert sum(per_batch) == len(mixed_batch)
    assert_close(got_small, want, ATOL, f"{fam.family} budget {budget}")

    # a budget below every sample: each sample alone (oversize samples get their own micro-batch)
    counter.batches.clear()
    got_one = fam.model.score(mixed_batch, max_batch_tokens=1)
    assert [b.num_samples for b in counter.batches] == [1] * len(mixed_batch)
    assert_close(got_one, want, ATOL, f"{fam.family} one sample per micro-batch")


@pytest.mark.parametrize("how", ["pil", "paths"])
def test_several_images_in_one_sample(qwen2, how, tmp_path):
    """`images` as a list (of PIL images, of paths): every image gets its own slots, scores match."""
    images = [rgb_image(61), rgb_image(62, (48, 64))]
    if how == "paths":
        paths = [tmp_path / f"im{i}.png" for i in range(2)]
        for im, p in zip(images, paths):
            im.save(p)
        images = [str(p) for p in paths]
    sample = {"prompt": "Compare the two pictures.", "images": images, "responses": ["the left", "the right", "both"]}
    enc = qwen2.model.encoder.encode(sample)
    assert enc.image_grid_thw.shape[0] == 2
    assert_close(qwen2.model.score([sample, {"prompt": "Hi.", "responses": ["hey", "yo"]}])[:1],
                 [reference_scores(qwen2, sample)], ATOL, f"two images ({how})")


def test_single_sample_dict_and_mp4_read_through_media(qwen2, mixed_batch):
    """A bare dict is one sample; the mp4 sample goes through mrrm.data.media (4 frames sampled)."""
    mp4_sample = mixed_batch[3]
    enc = qwen2.model.encoder.encode(mp4_sample)
    t, h, w = enc.video_grid_thw[0].tolist()
    assert t == 2 and h * w > 0  # 4 sampled frames / temporal patch 2
    inputs = next(qwen2.model.micro_batches([enc], "joint", None))
    video_slots = inputs.packed.input_ids == qwen2.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int(video_slots.sum()) == t * h * w // 4  # merge 2x2
    assert inputs.mm_token_type_ids[video_slots].eq(2).all() and inputs.mm_token_type_ids[~video_slots].eq(0).all()
    got = qwen2.model.score(mp4_sample)
    assert len(got) == 1
    assert_close(got, [reference_scores(qwen2, mp4_sample)], ATOL, "bare dict")


# -- 2. independent == single; permutation equivariance; joint != independent --------------------

def test_independent_equals_single_and_is_order_free(fam, mixed_batch):
    mixed_batch = for_family(mixed_batch, fam.family)
    model = fam.model
    ind = model.score(mixed_batch, mode="independent")
    single = model.score(mixed_batch, mode="single")
    assert_close(ind, single, ATOL, f"{fam.family} independent vs single")
    # a single-response sample scores the same in every mode
    joint = model.score(mixed_batch, mode="joint")
    assert_close([joint[1]], [single[1]], ATOL, "N=1 joint vs single")

    # independent scores follow the responses when they are permuted
    sample = mixed_batch[4]  # N = 8, an image
    n = len(sample["responses"])
    g = torch.Generator().manual_seed(3)
    perms = [list(reversed(range(n))), torch.randperm(n, generator=g).tolist()]
    permuted = [dict(sample, responses=[sample["responses"][p] for p in perm]) for perm in perms]
    got = model.score(permuted, mode="independent")
    base = model.score(sample, mode="independent")[0]
    for perm, scores in zip(perms, got):
        assert_close([scores], [[base[p] for p in perm]], ATOL, f"permutation {perm}")

    # joint is not independent: later responses see the earlier ones, and every response but the
    # last is read at its separator's newlines instead of the template's closing tokens
    # (the last response is read at the sequence's last token in both; in a random tiny model its
    # dependence on the earlier responses can be as small as 1e-5, so only the others are held to it)
    for j, i in zip(joint, ind):
        if len(j) > 1:
            assert min(abs(a - b) for a, b in zip(j[:-1], i[:-1])) > 10 * ATOL, (j, i)


def test_one_vision_call_per_pass_equals_the_backbone_s_own_calls(fam, mixed_batch):
    """one_vision_call (ZeRO-3's mode, mrrm.train.sharding): every pass calls the vision tower exactly once
    (images and videos together; a dummy image in a pass without media), and scores AND gradients
    equal the backbone's own calls (one per media kind, none without media)."""
    if fam.family == "molmo2":
        pytest.skip("Molmo2 takes images or videos per pass, and sharding refuses ZeRO-3 for it")
    assert_one_vision_call_matches(fam.model, mixed_batch)


def test_one_vision_call_on_qwen3_5(tokenizer, mixed_batch):
    """The same on the hybrid Qwen3.5 (its Gated DeltaNet layers read the same packing)."""
    assert_one_vision_call_matches(build_family("qwen3_5", tokenizer, seed=4).model, mixed_batch)


def assert_one_vision_call_matches(model, batch):
    base = mrrm.model.unwrap(model.backbone)
    calls = []
    hook = base.visual.register_forward_hook(lambda *a: calls.append(1))
    encoded, _ = model.encoder.encode_all(batch)
    text_only = [e for s, e in zip(batch, encoded) if "image" not in s and "video" not in s]

    def run(units, one):
        model.one_vision_call = one
        model.zero_grad(set_to_none=True)
        calls.clear()
        passes, scores = 0, []
        for inputs in model.micro_batches(units, "joint", 160):
            out = model(inputs)
            (out * torch.linspace(-1, 1, out.numel())).sum().backward()
            scores.append(out.detach())
            passes += 1
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat(scores), grads, passes, len(calls)

    try:
        for units in (encoded, text_only):
            s0, g0, passes, calls0 = run(units, False)
            s1, g1, passes1, calls1 = run(units, True)
            assert passes1 == passes and calls1 == passes and calls0 != passes
            torch.testing.assert_close(s1, s0, rtol=0, atol=ATOL)
            vision = {n for n in g1 if ".visual." in n or n.startswith("visual.") or "backbone.visual" in n}
            assert vision and set(g1) == set(g0) | vision  # the dummy pass: zero gradients, not none
            for n, g in g1.items():
                torch.testing.assert_close(g, g0.get(n, torch.zeros_like(g)), rtol=1e-5, atol=1e-6, msg=n)
    finally:
        hook.remove()
        model.one_vision_call = False
        model.zero_grad(set_to_none=True)


def test_reorder_equals_encoding_the_reordered_sample(fam, mixed_batch):
    """Encoder.reorder (training's response shuffle, permutations=k) re-tokenizes the joint turn: the
    layout equals encoding the sample with its responses in that order, media reused."""
    encoder = fam.model.encoder
    checked = 0
    for s in for_family(mixed_batch, fam.family):
        n = len(s["responses"])
        if n < 2:
            continue
        enc = encoder.encode(s)
        for order in (list(reversed(range(n))), [(i + 1) % n for i in range(n)]):
            got = encoder.reorder(enc, order)
            want = encoder.encode(dict(s, responses=[s["responses"][o] for o in order]))
            for field in ("prefix_ids", "response_ids", "joint_ids", "joint_score_offsets", "response_starts",
                          "joint_starts"):
                assert getattr(got.layout, field) == getattr(want.layout, field), (field, order)
            assert got.media.keys() == want.media.keys()
            checked += 1
    assert checked >= 8
    with pytest.raises(ValueError, match="permutation"):
        encoder.reorder(encoder.encode(mixed_batch[0]), [0, 0, 1])


# -- 3. special-token text inside prompts and responses ---------------------------------------------

def test_separator_and_media_token_injection(qwen2, tokenizer):
    """Special-token text inside a prompt or a response stays plain text: it neither forges a
    response boundary nor opens a media slot (the authors' code turns it into real tokens)."""
    model = qwen2.model
    sep_id = tokenizer.convert_tokens_to_ids(RESP_SEP)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    special_ids = set(tokenizer.all_special_ids)
    image = rgb_image(11)
    clean = {"prompt": "What is shown?", "image": image,
             "responses": ["a cat", "a dog  a car", "it is  red", "x", "the end"]}
    injected = {"prompt": "What is <|image_pad|> shown?<|resp_sep|>", "image": image,
                "responses": ["a cat", "a dog <|resp_sep|> a car", "it is <|image_pad|> red", "x<|resp_sep|>",
                              "the end<|im_end|>\n<|im_start|>assistant\n<|video_pad|>"]}
    n = len(clean["responses"])
    streams = {}
    for name, sample in (("clean", clean), ("injected", injected)):
        enc = model.encoder.encode(sample, 0)
        assert len(enc.layout.response_ids) == n
        inputs = next(model.micro_batches([enc], "joint", None))
        ids = inputs.packed.input_ids.tolist()
        pos = inputs.packed.score_positions.tolist()
        assert len(pos) == n
        assert ids.count(sep_id) == n - 1, name                 # one separator between two responses
        assert ids.count(image_pad) == int(enc.image_grid_thw.prod()) // 4, name  # the image's own slots only
        assert ids.count(video_pad) == 0, name
        assert int((inputs.mm_token_type_ids == 1).sum()) == ids.count(image_pad)
        # the stream is what the layout says, scored right before each separator and at the end
        want_ids, want_pos = sample_token_layout(enc.layout)
        assert ids == want_ids and pos == want_pos, name
        sep_at = [k for k, t in enumerate(ids) if t == sep_id]
        assert [p + 1 for p in pos[:-1]] == sep_at and pos[-1] == len(ids) - 1
        # the assistant turn decodes back to the responses joined by the separator, special-token
        # text kept as text; the template's tail closes it
        start = inputs.packed.start_positions[0].item()
        assert tokenizer.decode(ids[start:]) == "\n\n<|resp_sep|>\n\n".join(sample["responses"]) + "<|im_end|>\n"
        streams[name] = ids
    # the two streams differ only inside the prompt and response texts: same special tokens, same order
    assert [t for t in streams["clean"] if t in special_ids] == [t for t in streams["injected"] if t in special_ids]
    assert len(model.score(injected)[0]) == n
    # and each injected response alone: its own text, no separator, one image's slots
    enc = model.encoder.encode(injected, 0)
    for k, r in enumerate(enc.layout.response_ids):
        assert sep_id not in r and video_pad not in r and image_pad not in r
        assert tokenizer.decode(r[enc.layout.response_starts[k]:]) == injected["responses"][k] + "<|im_end|>\n"


def _injected_media_samples(tokenizer):
    """An image and a video sample whose prompt and responses hold the tokenizer's special-token text."""
    specials = [t for t in tokenizer.all_special_tokens if t != RESP_SEP] + [RESP_SEP]
    prompt = "What is " + " ".join(specials) + " shown?" + specials[0]
    responses = ["a cat", "a dog " + specials[-2] + " a car", "x" + RESP_SEP, specials[1] + "the end"]
    return [{"prompt": prompt, "image": rgb_image(12), "responses": responses},
            {"prompt": prompt, "video": frame_list(13, n=4), "responses": responses}]


def test_special_token_text_in_media_samples_without_processor_sanitizing(fam):
    """Processors without sanitize_control_tokens (transformers 5.20 and older): special-token text in a
    media sample's prompt reaches the processor as stand-ins whose plain-text ids replace them, which
    gives exactly the ids of the processors' own sanitizing where they have it."""
    import transformers

    from mrrm.data.encoding import processor_sanitizes_control_tokens

    if not processor_sanitizes_control_tokens():
        pytest.skip(f"transformers {transformers.__version__}'s processors cannot sanitize: nothing to compare "
                    "with (test_separator_and_media_token_injection checks this path's streams there)")
    encoder = copy.copy(fam.model.encoder)
    encoder._processor_sanitizes = False
    for sample in _injected_media_samples(fam.tokenizer):
        want = fam.model.encoder.encode(sample, 0).layout
        got = encoder.encode(sample, 0).layout
        assert got.prefix_ids == want.prefix_ids and got.joint_ids == want.joint_ids
        assert got.response_ids == want.response_ids


def test_qwen3_vl_video_has_no_wrapper_around_its_frames(families):
    """Qwen3-VL wraps each frame in its own vision block (after its timestamp); the template's block
    around the video is collapsed, as transformers 4.57 and 5.25 do (5.10-5.20's processor keeps it:
    mrrm collapses it then). Collapsing by hand gives the same ids where the processor already does."""
    fam = families("qwen3_vl")
    sample = {"prompt": "Which way?", "video": frame_list(14, n=4), "responses": ["left", "right"]}
    encoder = copy.copy(fam.model.encoder)
    ids = encoder.encode(sample, 0).layout.prefix_ids
    start = fam.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert not encoder._nested_vision_start(ids) and ids.count(start) == 2  # 4 frames: 2 temporal patches
    assert fam.tokenizer.decode(ids[ids.index(start) - 1:ids.index(start)]).endswith(">")  # a timestamp first
    encoder._collapse_video_wrapper = True
    assert encoder.encode(sample, 0).layout.prefix_ids == ids


# -- 4. permutations=k: the mean over k cyclic orders ----------------------------------------------

def rotated(sample, shift):
    n = len(sample["responses"])
    order = [(i + shift) % n for i in range(n)]
    return dict(sample, responses=[sample["responses"][o] for o in order]), order


@pytest.fixture(scope="module")
def rotations(qwen2):
    """A batch (N = 4, 3, 1, 5) and, per sample, the reference joint scores of every cyclic order,
    un-rotated: per_shift[b][shift][i] is response i's score when the responses start at `shift`."""
    batch = [
        {"prompt": "What is shown?", "image": rgb_image(21), "responses": ["a cat", "a dog", "a car", "a tree"]},
        {"prompt": "Pick one.", "responses": ["red", "green", "blue"]},
        {"prompt": "Say hi.", "responses": ["hello"]},
        {"prompt": "Count.", "video": frame_list(22, n=4), "responses": ["one", "two", "three", "four", "five"]},
    ]
    per_shift = []
    for s in batch:
        n = len(s["responses"])
        table = {}
        for shift in range(n):
            rot, order = rotated(s, shift)
            scores = reference_scores(qwen2, rot)
            table[shift] = [scores[order.index(i)] for i in range(n)]
        per_shift.append(table)
    return batch, per_shift


# Evenly spaced shifts round(j * N / k), j < k (k capped at N). Where j * N / k ends in .5 either
# rounding is "evenly spaced", so both candidates are accepted.
@pytest.mark.parametrize("k,shifts_by_n", [
    (2, {1: [[0]], 3: [[0, 1], [0, 2]], 4: [[0, 2]], 5: [[0, 2], [0, 3]]}),
    (3, {1: [[0]], 3: [[0, 1, 2]], 4: [[0, 1, 3]], 5: [[0, 2, 3]]}),
    (8, {1: [[0]], 3: [[0, 1, 2]], 4: [[0, 1, 2, 3]], 5: [[0, 1, 2, 3, 4]]}),  # k capped at N
])
def test_permutations_average_cyclic_orders(qwen2, rotations, k, shifts_by_n, monkeypatch):
    model = qwen2.model
    batch, per_shift = rotations
    candidates = []  # per sample: the hand-computed means for each acceptable set of shifts
    for s, table in zip(batch, per_shift):
        n = len(s["responses"])
        candidates.append([[sum(table[sh][i] for sh in shifts) / len(shifts) for i in range(n)]
                           for shifts in shifts_by_n[n]])

    def check(got, what):
        assert len(got) == len(batch)
        for b, (g, cands) in enumerate(zip(got, candidates)):
            diffs = [max_abs_diff([g], [c]) for c in cands]
            assert min(diffs) <= ATOL, f"{what}: sample {b}: {g} vs any of {cands} (diffs {diffs})"

    got = model.score(batch, permutations=k)
    check(got, f"permutations={k}")
    # the rotated copies split over several micro-batches give the same means
    counter = ForwardCounter(model, monkeypatch)
    got_small = model.score(batch, permutations=k, max_batch_tokens=60)
    assert len(counter.batches) > 2
    check(got_small, f"permutations={k}, micro-batches")
    assert_close(got_small, got, ATOL, "micro-batches vs one batch")
    # non-vacuous: averaging over orders changes the joint scores
    assert max_abs_diff(got, model.score(batch)) > 100 * ATOL


def test_permutations_one_is_joint(qwen2, mixed_batch):
    model = qwen2.model
    assert model.score(mixed_batch, permutations=1) == model.score(mixed_batch)
    with pytest.raises(ValueError, match="permutations"):
        model.score(mixed_batch, permutations=0)


# -- 5. save_pretrained / from_pretrained / mrrm.load --------------------------------------------

@pytest.mark.slow
def test_score_with_encoding_workers(qwen2, mixed_batch):
    """workers=N encodes in worker processes: the same scores; errors='skip' gives None in a bad
    sample's place (chunks scored while the next encode), errors='raise' one BatchError naming every
    bad sample before any compute; a running EncodePool can be reused across calls."""
    from mrrm.data.pipeline import EncodePool

    model = qwen2.model
    want = model.score(mixed_batch)
    got = model.score(mixed_batch, workers=2)
    assert_close(got, want, 1e-6, "workers=2")
    bad = list(mixed_batch)
    bad[2] = dict(bad[2], responses=[])
    bad[5] = dict(bad[5], image="/nonexistent/img.png", id="lost")
    with pytest.raises(BatchError) as info:
        model.score(bad, workers=2)
    assert [e.index for e in info.value.errors] == [2, 5] and info.value.errors[1].sample_id == "lost"
    pool = EncodePool(model.encoder, 2)
    try:
        skipped = mrrm.score(bad, model, errors="skip", workers=pool)
        assert skipped[2] is None and skipped[5] is None
        assert_close([s for i, s in enumerate(skipped) if i not in (2, 5)],
                     [s for i, s in enumerate(want) if i not in (2, 5)], 1e-6, "skip")
        assert_close(model.score(mixed_batch[:2], workers=pool), want[:2], 1e-6, "reused pool")
    finally:
        pool.close()
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        model.score(mixed_batch, workers=-1)


def test_save_load_round_trip_full_backbone(fam, mixed_batch, tmp_path):
    model = fam.model
    batch = [mixed_batch[0], mixed_batch[2], mixed_batch[5]]  # image, frame-list video, text
    want = model.score(batch)
    ckpt = str(tmp_path / "ckpt")
    model.save_pretrained(ckpt)
    assert os.path.isdir(os.path.join(ckpt, "backbone")) and not os.path.exists(os.path.join(ckpt, "adapter"))
    for loaded in (RewardModel.from_pretrained(ckpt), mrrm.load(ckpt)):
        assert type(mrrm_backbone(loaded)).__name__ == type(mrrm_backbone(model)).__name__
        assert loaded.config.value_head_hidden_dim == HEAD_DIM and loaded.head_scale == model.head_scale
        assert not loaded.training
        assert_close(loaded.score(batch), want, ATOL_RELOAD, f"{fam.family} reload")
        assert_close(loaded.score(batch, mode="independent"), model.score(batch, mode="independent"),
                     ATOL_RELOAD, "reload independent")
    assert mrrm.load(ckpt, mode="independent").config.mode == "independent"


def test_load_with_dtype(qwen2, mixed_batch, tmp_path):
    """from_pretrained(dtype=...) casts the model and the media: bf16 stays near fp32, fp64 equal."""
    batch = [mixed_batch[0], mixed_batch[2], mixed_batch[5]]
    want = qwen2.model.score(batch)
    ckpt = str(tmp_path / "ckpt")
    qwen2.model.save_pretrained(ckpt)
    for dtype, atol in ((torch.float64, ATOL), (torch.bfloat16, 5e-2)):
        loaded = RewardModel.from_pretrained(ckpt, dtype=dtype)
        assert loaded.dtype == dtype and next(loaded.backbone.parameters()).dtype == dtype
        got = loaded.score(batch)
        assert all(isinstance(x, float) for g in got for x in g)
        assert_close(got, want, atol, f"dtype {dtype}")


def test_score_edge_cases(qwen2, mixed_batch):
    model = qwen2.model
    assert model.score([]) == []
    want = model.score(mixed_batch[0])
    model.train()
    try:
        assert model.score(mixed_batch[0]) == want  # scored in eval mode ...
        assert model.training                       # ... and the caller's mode restored
    finally:
        model.eval()
    with pytest.raises(ValueError, match="mode"):
        model.score(mixed_batch[0], mode="pairwise")


def mrrm_backbone(model):
    get = getattr(model.backbone, "get_base_model", None)
    return get() if callable(get) else model.backbone


def randomize_lora(peft_model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                touched += 1
    assert touched > 0
    return peft_model


def test_save_load_round_trip_lora(tokenizer, mixed_batch, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    cfg = tiny.build_config("qwen2_vl", tokenizer=tokenizer)
    torch.manual_seed(5)
    base_dir = str(tmp_path / "base")
    tiny.build_backbone(cfg).save_pretrained(base_dir)
    proc = build_processor("qwen2_vl", tokenizer)

    lora = peft.get_peft_model(AutoModel.from_pretrained(base_dir),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    randomize_lora(lora, seed=1)
    assert any("language_model" in n and "lora_A" in n for n, _ in lora.named_parameters())
    assert not any("visual" in n and "lora_" in n for n, _ in lora.named_parameters())
    model = RewardModel(lora, tokenizer, proc, RewardModelConfig(value_head_hidden_dim=HEAD_DIM, base_model=base_dir))
    randomize_head(model.value_head, seed=2)
    model.eval()
    batch = [mixed_batch[0], mixed_batch[2], mixed_batch[5]]
    want = model.score(batch)

    # non-vacuous: the adapter changes the scores of the base model with the same head
    plain = RewardModel(AutoModel.from_pretrained(base_dir), tokenizer, proc,
                        RewardModelConfig(value_head_hidden_dim=HEAD_DIM), value_head=model.value_head).eval()
    assert max_abs_diff(plain.score(batch), want) > 100 * ATOL

    ckpt = str(tmp_path / "ckpt")
    model.save_pretrained(ckpt)
    assert os.path.exists(os.path.join(ckpt, "adapter", "adapter_config.json"))
    assert not os.path.exists(os.path.join(ckpt, "backbone"))
    for loaded in (RewardModel.from_pretrained(ckpt), mrrm.load(ckpt)):
        assert loaded.config.base_model == base_dir
        assert_close(loaded.score(batch), want, ATOL_RELOAD, "LoRA reload")

    # a LoRA backbone cannot be saved without naming its base
    model.config.base_model = None
    with pytest.raises(ValueError, match="base_model"):
        model.save_pretrained(str(tmp_path / "nobase"))


# -- 7. bad input --------------------------------------------------------------------------------

def test_bad_samples_raise_or_skip(qwen2, mixed_batch, tmp_path, monkeypatch):
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 4)
    good = {
        0: {"prompt": "What is shown?", "image": rgb_image(31), "responses": ["a cat", "a dog"]},
        3: {"prompt": "Say hi.", "responses": ["hello", "hi", "hey"]},
        9: {"prompt": "What moves?", "video": frame_list(32, n=4), "id": "ok-video", "responses": ["up", "down"]},
    }
    model = qwen2.model
    limit = max(model.encoder.encode(s).num_tokens for s in good.values()) + 8
    bad = {
        1: {"responses": ["a", "b"], "id": "no-prompt"},
        2: {"prompt": "Empty list?", "responses": []},
        4: {"prompt": "Empty answer?", "responses": ["fine", ""], "id": 44},
        5: {"prompt": "Corrupt image?", "image": b"\x89PNG\r\n\x1a\n not really a png", "responses": ["a"]},
        6: {"prompt": "Missing image?", "image": str(tmp_path / "missing.png"), "responses": ["a"], "id": "miss"},
        7: {"prompt": "Broken video?", "video": str(broken_video), "responses": ["a", "b"]},
        8: {"prompt": "Too long?", "responses": ["one two three " * limit, "short"], "id": "long"},
        10: {"prompt": "Extreme aspect ratio?", "image": rgb_image(33, (2, 600)), "responses": ["a"]},
    }
    batch = [good.get(i) or bad[i] for i in range(11)]
    limited = RewardModel(model.backbone, qwen2.tokenizer, qwen2.processor,
                          RewardModelConfig(value_head_hidden_dim=HEAD_DIM, max_length=limit),
                          value_head=model.value_head).eval()
    counter = ForwardCounter(limited, monkeypatch)

    with pytest.raises(BatchError) as info:
        limited.score(batch)
    assert counter.batches == []  # validation happens before any compute
    err = info.value
    assert [e.index for e in err.errors] == sorted(bad)
    lines = str(err).splitlines()[1:]
    assert len(lines) == len(bad)
    for line, i in zip(lines, sorted(bad)):
        sid = bad[i].get("id")
        prefix = f"sample {i}" + (f" (id={sid!r})" if sid is not None else "") + ":"
        assert line.strip().startswith(prefix), (line, prefix)
    msg = str(err)
    for reason in ("prompt", "responses", "response 1 is empty", "missing.png", "broken.mp4", "max_length",
                   "processor"):
        assert reason in msg, reason

    got = limited.score(batch, errors="skip")
    assert [i for i, g in enumerate(got) if g is None] == sorted(bad)
    want = limited.score([good[i] for i in sorted(good)])
    assert_close([got[i] for i in sorted(good)], want, 0.0, "skip vs the good samples alone")
    assert_close(want, [reference_scores(qwen2, good[i]) for i in sorted(good)], ATOL, "good samples")
    assert limited.score([bad[1], bad[2]], errors="skip") == [None, None]
    with pytest.raises(ValueError, match="errors"):
        limited.score(batch, errors="ignore")


# -- 8. the public entry points with the built-in default ----------------------------------------

def test_mrrm_score_with_builtin_default():
    from mrrm.model import api

    out = mrrm.score({"prompt": "What is shown?", "image": rgb_image(41), "responses": ["a cat", "a dog", "a car"]})
    assert isinstance(out, list) and len(out) == 1 and len(out[0]) == 3
    assert all(isinstance(x, float) and math.isfinite(x) for x in out[0])
    default = mrrm.load()
    assert mrrm.load() is default  # cached
    assert isinstance(default, RewardModel) and not default.training
    if not os.path.exists(os.path.join(api.DEFAULT_MODEL_DIR, "mrrm_config.json")):
        text = default.config.description.lower()
        assert "random" in text and "untrained" in text, default.config.description
    # the same call through the model gives the same scores
    assert default.score({"prompt": "What is shown?", "image": rgb_image(41),
                          "responses": ["a cat", "a dog", "a car"]}) == out


# -- 9. backends ---------------------------------------------------------------------------------

def test_reference_ops_match_cpu_backends(fam, mixed_batch, monkeypatch):
    from mrrm.ops import choose_backend

    batch = [mixed_batch[0], mixed_batch[2], mixed_batch[5]]
    monkeypatch.delenv("MRRM_OPS", raising=False)
    cpu = torch.device("cpu")
    assert choose_backend("varlen_attention", cpu) == "cpu" and choose_backend("gather_value_head", cpu) == "cpu"
    default = {m: fam.model.score(batch, mode=m) for m in ("joint", "independent")}
    monkeypatch.setenv("MRRM_OPS", "torch")
    assert choose_backend("varlen_attention", cpu) == "torch"
    for m in ("joint", "independent"):
        assert_close(fam.model.score(batch, mode=m), default[m], ATOL, f"{fam.family} reference vs cpu, {m}")


def test_triton_interpreter_backend(qwen2, monkeypatch):
    pytest.importorskip("triton")
    from mrrm.ops._dispatch import triton_interpret

    if not triton_interpret():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)")
    sample = {"prompt": "What is shown?", "image": rgb_image(51), "responses": ["a cat", "a dog on a mat"]}
    want = {m: reference_scores(qwen2, sample) if m == "joint" else qwen2.model.score(sample, mode=m)[0]
            for m in ("joint", "independent")}
    monkeypatch.setenv("MRRM_OPS", "triton")
    start = time.perf_counter()
    for m in ("joint", "independent"):  # causal, shared_prefix and the vision tower's bidirectional mask
        assert_close(qwen2.model.score(sample, mode=m), [want[m]], ATOL, f"triton {m}")
    assert time.perf_counter() - start < 60  # the interpreter takes ~1 s here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_match_cpu(qwen2):
    """On a GPU (auto backends: Triton attention and head), fp32 scores match the CPU ones. (No mp4
    here: the GPU machine has no PyAV to write one.)"""
    batch = [{"prompt": "What is shown?", "image": rgb_image(1), "responses": ["a cat", "a dog", "a red car"]},
             {"prompt": "What moves?", "video": frame_list(2, n=4), "id": "frames",
              "responses": ["up", "it moves down", "left", "it stays still"]},
             {"prompt": "Count to three.", "responses": ["one two three", "three", "one", "two", "1 2 3"]}]
    want = {m: qwen2.model.score(batch, mode=m) for m in ("joint", "independent")}
    gpu = copy.deepcopy(qwen2.model).to("cuda")
    for m in ("joint", "independent"):
        # Triton's fp32 dots may use TF32: a looser bound than the CPU-only comparisons
        assert_close(gpu.score(batch, mode=m), want[m], 2e-3, f"cuda {m}")


@pytest.mark.parametrize("damaged", ["value_head.safetensors", "backbone/model.safetensors", "mrrm_config.json"])
def test_damaged_checkpoint_file_is_named(tmp_path, damaged):
    from mrrm.model.api import build_default_model

    build_default_model().save_pretrained(tmp_path)
    f = tmp_path / damaged
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    with pytest.raises(ValueError, match=str(f if damaged != "backbone/model.safetensors" else tmp_path / "backbone")):
        RewardModel.from_pretrained(str(tmp_path))
