"""mrrm.demo: the synthetic multimodal preference task.

Checks that a split is deterministic, in the published schema, readable through mrrm.data.media, that
its answers can be read back from the pixels by simple hand-written decoders (so a model can learn
them), that nothing but the pixels tells the right answer (slot, length, candidate set), and that
the rankings are graded (a near miss above a wild miss).
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ndimage = pytest.importorskip("scipy.ndimage")
pytest.importorskip("av")

from mrrm.data.media import load_image, load_video  # noqa: E402
from mrrm.train import demo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N_SPLIT = 500  # 100 per family


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_split")
    start = time.perf_counter()
    path = demo.generate(N_SPLIT, seed=3, out_dir=out)
    elapsed = time.perf_counter() - start
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return path, rows, elapsed


def correct_answer(sample: dict) -> str:
    return sample["responses"][sample["rankings"].index(1)]


def pixels(sample: dict, base_dir: Path) -> np.ndarray:
    """[H, W, 3] for an image, [F, H, W, 3] for a video, read through mrrm.data.media as a user would."""
    if "image" in sample:
        return np.asarray(load_image(sample["image"], base_dir=base_dir))
    return load_video(sample["video"], base_dir=base_dir).frames.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------------
# Hand-written pixel decoders: know the task's conventions, not its code.
# --------------------------------------------------------------------------------------------------


def foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels that differ from the (median) background colour by more than 40 in some channel."""
    rgb = rgb.astype(np.int32)
    background = np.median(rgb.reshape(-1, 3), axis=0)
    return np.abs(rgb - background).max(axis=2) > 40


def decode_colour(rgb):
    mask = foreground(rgb)
    inner = ndimage.binary_erosion(mask)  # drop edge pixels (mixed with the background)
    mask = inner if inner.sum() >= 10 else mask
    mean = rgb[mask].astype(float).mean(axis=0)
    return min(demo.PALETTE, key=lambda name: np.linalg.norm(mean - np.array(demo.PALETTE[name])))


def decode_shape(rgb):
    labels, n = ndimage.label(foreground(rgb))
    sizes = ndimage.sum(labels > 0, labels, range(1, n + 1))
    mask = labels == 1 + int(np.argmax(sizes))
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    area = box.sum()
    fill = area / box.size  # square 1, circle pi/4, cross 5/9, triangle 1/2, star ~0.4
    if ndimage.binary_fill_holes(box).sum() - area > 0.1 * area:
        return "ring"
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    if box[-1].mean() > 0.7:  # a full-width base
        return "triangle"
    if box[0].mean() < 0.2:  # a single tip at the top
        return "star"
    return "cross"  # a bar a third wide at the top and the bottom


def decode_position(rgb):
    ys, xs = np.nonzero(foreground(rgb))
    h, w = rgb.shape[:2]
    cell = (min(2, int(ys.mean() * 3 // h)), min(2, int(xs.mean() * 3 // w)))
    return {v: k for k, v in demo.GRID_CELLS.items()}[cell]


def decode_count(rgb):
    labels, n = ndimage.label(foreground(rgb))
    sizes = np.asarray(ndimage.sum(labels > 0, labels, range(1, n + 1)))
    return demo.COUNT_WORDS[int((sizes >= 20).sum()) - 1]


def centroid_shift(frames):
    first, last = (np.argwhere(foreground(f)).mean(axis=0) for f in (frames[0], frames[-1]))
    dy, dx = last - first
    return dx, dy


def decode_motion(frames):
    dx, dy = centroid_shift(frames)
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


DECODERS = {"colour": decode_colour, "shape": decode_shape, "position": decode_position, "count": decode_count,
            "motion": decode_motion}


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


def media_pixels(out: Path, rows: list[dict]) -> list[np.ndarray]:
    return [pixels(r, out) for r in rows]


def test_same_seed_same_split_different_seed_different(tmp_path):
    n = 40  # 8 per family, 8 videos
    a = demo.generate(n, seed=11, out_dir=tmp_path / "a")
    b = demo.generate(n, seed=11, out_dir=tmp_path / "b")
    c = demo.generate(n, seed=12, out_dir=tmp_path / "c")
    assert a.read_bytes() == b.read_bytes()  # byte-identical JSONL
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in b.read_text().splitlines()]
    assert rows_a == rows_b and len(rows_a) == n
    for pa, pb in zip(media_pixels(a.parent, rows_a), media_pixels(b.parent, rows_b)):
        assert np.array_equal(pa, pb)  # PNG pixels, and decoded video frames, identical
    assert sum("video" in r for r in rows_a) == n // 5

    rows_c = [json.loads(line) for line in c.read_text().splitlines()]
    assert a.read_bytes() != c.read_bytes()
    assert [r["responses"] for r in rows_a] != [r["responses"] for r in rows_c]
    same = sum(np.array_equal(pa, pc) for pa, pc in zip(media_pixels(a.parent, rows_a), media_pixels(c.parent, rows_c)))
    assert same == 0


@pytest.mark.slow
def test_generate_in_subprocess_writes_the_same_split(tmp_path):
    """What training generates (in a fresh interpreter) is the split generate() writes: the same JSONL
    bytes, the same files, the same pixels and decoded frames."""
    a = demo.generate(20, seed=11, out_dir=tmp_path / "a")
    b = demo.generate_in_subprocess(20, 11, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert len(files) == 21 and files == sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    for pa, pb in zip(media_pixels(a.parent, rows), media_pixels(b.parent, rows)):
        assert np.array_equal(pa, pb)  # PNG pixels and decoded video frames
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        demo.generate_in_subprocess(-1, 0, tmp_path / "bad")


def test_videos_are_lossless(tmp_path):
    """A decoder returns exactly the frames written (as YUV 4:2:0), so the data a training run sees
    cannot follow the encoder's choices."""
    import av

    _, media = demo.make_sample(demo.sample_rng(0, 9804), "motion")
    demo.write_video(media["video"], tmp_path / "clip.mp4")
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    assert len(decoded) == len(media["video"]) == 8
    for frame, got in zip(media["video"], decoded):
        assert np.array_equal(got, demo._rgb_to_yuv420p(frame))


def test_make_sample_is_a_function_of_its_rng():
    for family in demo.FAMILIES:
        s1, m1 = demo.make_sample(demo.sample_rng(5, 17), family)
        s2, m2 = demo.make_sample(demo.sample_rng(5, 17), family)
        assert s1 == s2
        key = "image" if family != "motion" else "video"
        assert set(m1) == {key}
        frames1 = m1[key] if key == "video" else [m1[key]]
        frames2 = m2[key] if key == "video" else [m2[key]]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(frames1, frames2))
    # An int seed works too.
    assert demo.make_sample(4, "count")[0] == demo.make_sample(4, "count")[0]


# --------------------------------------------------------------------------------------------------
# Schema and media
# --------------------------------------------------------------------------------------------------


def test_schema_and_media(split):
    path, rows, _ = split
    base = path.parent
    assert len(rows) == N_SPLIT
    assert len({r["id"] for r in rows}) == N_SPLIT
    per_family = collections.Counter(r["family"] for r in rows)
    assert set(per_family) == set(demo.FAMILIES)
    assert max(per_family.values()) - min(per_family.values()) <= 1  # balanced
    for r in rows:
        family = r["family"]
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        responses, rankings = r["responses"], r["rankings"]
        assert len(responses) == 4 and len(set(responses)) == 4
        assert all(isinstance(x, str) and x in demo.VOCAB[family] for x in responses)
        assert len(rankings) == len(responses)
        assert all(isinstance(x, int) and 1 <= x <= len(responses) for x in rankings)
        assert rankings.count(1) == 1
        media_keys = {"image", "video"} & set(r)
        assert media_keys == ({"video"} if family == "motion" else {"image"})
        rel = r[media_keys.pop()]
        assert not Path(rel).is_absolute() and (base / rel).is_file()
    # Every media file loads through mrrm.data.media (the users' loader) at the intended size.
    for r in rows:
        x = pixels(r, base)
        if "image" in r:
            assert x.shape == (64, 64, 3)
        else:
            assert x.ndim == 4 and x.shape[0] >= 4 and x.shape[1:] == (64, 64, 3)
    clip = load_video(next(r for r in rows if "video" in r)["video"], base_dir=base)
    assert clip.source_num_frames == 8 and clip.source_fps == pytest.approx(demo.VIDEO_FPS)


def test_prompt_does_not_reveal_the_answer(split):
    _, rows, _ = split
    for r in rows:
        prompt = r["prompt"].lower()
        for answer in demo.VOCAB[r["family"]]:
            assert not re.search(rf"\b{re.escape(answer)}\b", prompt), (r["prompt"], answer)
    # The prompt wording is independent of the answer: every family uses several wordings, and
    # the same wordings for every answer.
    by_family = collections.defaultdict(set)
    for r in rows:
        by_family[r["family"]].add(r["prompt"])
    assert all(len(p) >= 2 for p in by_family.values())


def test_in_memory_samples_load_through_media():
    for family in demo.FAMILIES:
        sample, media = demo.make_sample(np.random.default_rng(1), family)
        assert "image" not in sample and "video" not in sample
        in_memory = {**sample, **media}
        if family == "motion":
            frames = in_memory["video"]
            assert len(frames) == 8 and all(isinstance(f, Image.Image) and f.size == (64, 64) for f in frames)
            clip = load_video(frames, frames_fps=demo.VIDEO_FPS)
            assert clip.frames.shape == (8, 3, 64, 64)
            assert decode_motion(clip.frames.permute(0, 2, 3, 1).numpy()) == correct_answer(sample)
        else:
            image = load_image(in_memory["image"])
            assert image.size == (64, 64) and image.mode == "RGB"
            assert DECODERS[family](np.asarray(image)) == correct_answer(sample)


def test_options(tmp_path):
    path = demo.generate(8, seed=2, out_dir=tmp_path, families=["count", "colour"], n_responses=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["family"] for r in rows] == ["count", "colour"] * 4
    assert all(len(set(r["responses"])) == 6 and r["rankings"].count(1) == 1 for r in rows)
    assert not (tmp_path / "videos").exists()
    sample, media = demo.make_sample(np.random.default_rng(0), "motion", image_size=96, video_frames=6)
    assert len(media["video"]) == 6 and media["video"][0].size == (96, 96)
    assert demo.make_sample(0, "color")[0]["family"] == "colour"  # alias
    with pytest.raises(ValueError, match="motion"):
        demo.generate(5, seed=0, out_dir=tmp_path / "x", n_responses=5)  # only 4 directions
    with pytest.raises(ValueError, match="unknown family"):
        demo.make_sample(0, "texture")
    with pytest.raises(ValueError, match="image_size"):
        demo.make_sample(0, "shape", image_size=33)


# --------------------------------------------------------------------------------------------------
# The answers are in the pixels
# --------------------------------------------------------------------------------------------------


def test_answers_are_readable_from_pixels(split):
    path, rows, _ = split
    hits = collections.defaultdict(list)
    for r in rows:
        hits[r["family"]].append(DECODERS[r["family"]](pixels(r, path.parent)) == correct_answer(r))
    accuracy = {family: float(np.mean(v)) for family, v in hits.items()}
    assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_decoded_videos_still_show_the_motion(split):
    """After H.264 and the users' loader (2 fps sampling: 4 of the 8 frames), the shape has moved
    far along its direction and barely across it."""
    path, rows, _ = split
    for r in (r for r in rows if "video" in r):
        frames = pixels(r, path.parent)
        assert frames.shape[0] == 4
        dx, dy = centroid_shift(frames)
        ux, uy = demo.DIRECTIONS[correct_answer(r)]
        along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
        assert along >= 15 and across <= 3, (r["id"], dx, dy)


# --------------------------------------------------------------------------------------------------
# Only the pixels tell: slot, length and candidate set carry no signal
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_samples():
    """1,000 in-memory samples (200 per family), no files."""
    return [demo.make_sample(demo.sample_rng(21, i), demo.FAMILIES[i % 5])[0] for i in range(1000)]


def chi_square(counts, expected):
    return sum((c - expected) ** 2 / expected for c in counts)


def test_correct_slot_is_uniform(many_samples):
    rows = many_samples[:400]
    slots = collections.Counter(r["rankings"].index(1) for r in rows)
    # 3 degrees of freedom: P(chi2 > 16.27) = 0.001
    assert chi_square([slots[k] for k in range(4)], len(rows) / 4) < 16.27, slots
    for family in demo.FAMILIES:  # and per family, over the 1,000
        fam = [r for r in many_samples if r["family"] == family]
        slots = collections.Counter(r["rankings"].index(1) for r in fam)
        assert chi_square([slots[k] for k in range(4)], len(fam) / 4) < 16.27, (family, slots)


def test_text_only_heuristics_stay_at_chance(many_samples):
    """Strategies that see the candidates but not the pixels pick the right answer ~25% of the time."""

    def centre_of_set(r):  # the candidate nearest to all others (a leak if distractors were near misses)
        fam, resp = r["family"], r["responses"]
        return min(resp, key=lambda a: sum(demo.answer_distance(fam, a, b) for b in resp))

    fit, held_out = many_samples[:500], many_samples[500:]
    answer_counts = collections.Counter((r["family"], correct_answer(r)) for r in fit)  # learnt on one half
    strategies = {
        "first": lambda r: r["responses"][0],
        "longest": lambda r: max(r["responses"], key=len),
        "shortest": lambda r: min(r["responses"], key=len),
        "alphabetical": lambda r: min(r["responses"]),
        "centre of the set": centre_of_set,
        "most frequent answer": lambda r: max(r["responses"], key=lambda a: answer_counts[(r["family"], a)]),
    }
    for name, pick in strategies.items():
        accuracy = np.mean([pick(r) == correct_answer(r) for r in held_out])
        assert accuracy <= 0.33, (name, accuracy)  # chance 0.25; 500 samples: sd 0.019

    # The correct answer's length is distributed like the distractors'.
    correct_len = [len(correct_answer(r)) for r in many_samples]
    other_len = [len(a) for r in many_samples for a, k in zip(r["responses"], r["rankings"]) if k != 1]
    assert abs(np.mean(correct_len) - np.mean(other_len)) < 0.3


def test_correct_answer_is_uniform_over_the_vocabulary(many_samples):
    for family in demo.FAMILIES:
        fam = [r for r in many_samples if r["family"] == family]
        counts = collections.Counter(correct_answer(r) for r in fam)
        vocab = demo.VOCAB[family]
        assert set(counts) == set(vocab)
        # df = len(vocab) - 1 <= 8: P(chi2 > 26.1) < 0.001
        assert chi_square([counts[a] for a in vocab], len(fam) / len(vocab)) < 26.1, (family, counts)


# --------------------------------------------------------------------------------------------------
# Graded rankings
# --------------------------------------------------------------------------------------------------

# The rules written out independently of the module: how far each wrong answer is from the right one.
HUE = {"red": 0, "orange": 30, "yellow": 60, "green": 120, "cyan": 180, "blue": 230, "purple": 275, "pink": 325}
GROUP = {"circle": 0, "ring": 0, "square": 1, "triangle": 1, "star": 2, "cross": 2}
CELL = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
        "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
NUMBER = {w: i + 1 for i, w in enumerate(["one", "two", "three", "four", "five", "six"])}
AXIS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


def expected_distance(family, a, correct):
    if family == "colour":
        d = abs(HUE[a] - HUE[correct])
        return min(d, 360 - d)
    if family == "shape":
        return 0 if a == correct else (1 if GROUP[a] == GROUP[correct] else 2)
    if family == "position":
        return (CELL[a][0] - CELL[correct][0]) ** 2 + (CELL[a][1] - CELL[correct][1]) ** 2
    if family == "count":
        return abs(NUMBER[a] - NUMBER[correct])
    return 1 - (AXIS[a][0] * AXIS[correct][0] + AXIS[a][1] * AXIS[correct][1])


def test_rankings_follow_the_graded_distance(many_samples, split):
    for r in many_samples + split[1]:
        correct = correct_answer(r)
        d = [expected_distance(r["family"], a, correct) for a in r["responses"]]
        for i in range(len(d)):
            for j in range(len(d)):
                if d[i] < d[j]:
                    assert r["rankings"][i] < r["rankings"][j], r
                elif d[i] == d[j]:
                    assert r["rankings"][i] == r["rankings"][j], r


@pytest.mark.parametrize("family, correct, near, far", [
    ("count", "three", "two", "six"),        # off by one above off by three
    ("count", "one", "two", "four"),
    ("colour", "red", "orange", "cyan"),     # near in hue above far
    ("colour", "blue", "purple", "yellow"),
    ("position", "top left", "top", "bottom right"),  # adjacent above opposite
    ("position", "left", "center", "right"),
    ("motion", "up", "left", "down"),        # perpendicular above opposite
    ("motion", "right", "down", "left"),
    ("shape", "circle", "ring", "square"),   # same group above other group
    ("shape", "star", "cross", "triangle"),
])
def test_near_miss_ranks_above_wild_miss(family, correct, near, far):
    others = [a for a in demo.VOCAB[family] if a not in (correct, near, far)]
    responses = [far, others[0], correct, near]
    ranks = demo.competition_ranks([demo.answer_distance(family, a, correct) for a in responses])
    assert ranks[2] == 1
    assert ranks[3] < ranks[0]
    assert demo.answer_distance(family, near, correct) < demo.answer_distance(family, far, correct)


def test_competition_ranks_with_ties():
    assert demo.competition_ranks([0, 1, 1, 3]) == [1, 2, 2, 4]
    assert demo.competition_ranks([2, 0, 2, 2]) == [2, 1, 2, 2]
    # Count: off by one ranks 2, off by three ranks 4 (when off-by-one appears twice).
    words = ["three", "two", "four", "six"]
    assert demo.competition_ranks([demo.answer_distance("count", w, "three") for w in words]) == [1, 2, 2, 4]


# --------------------------------------------------------------------------------------------------
# Speed and the command line
# --------------------------------------------------------------------------------------------------


def test_generation_is_fast(split):
    # ~1 s here for 500 samples; 2,000 take ~2-4 s on 2 cores. Generous bound for loaded machines.
    assert split[2] < 20


@pytest.mark.slow
def test_cli_writes_a_split_and_prints_a_summary(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "mrrm.demo", "--seed", "5", "--n", "12", "--out", str(out),
                           "--families", "colour", "motion", "count"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["colour", "count", "motion"]  # in FAMILIES order
    assert all(line.split()[1] == "4" for line in lines[:3])
    assert "12 samples" in lines[-1]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == ["colour", "motion", "count"] * 4
    assert rows == [json.loads(line) for line in demo.generate(12, 5, tmp_path / "api",
                                                               families=["colour", "motion", "count"])
                    .read_text().splitlines()]

    bad = subprocess.run([sys.executable, "-m", "mrrm.demo", "--n", "3", "--out", str(tmp_path / "bad"),
                          "--families", "texture"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown family" in bad.stderr
