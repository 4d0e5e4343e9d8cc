"""The built-in synthetic multimodal preference task: questions about tiny images and videos whose
answers can be checked from the pixels.

``python -m mrrm.demo --seed S --n N --out DIR [--families colour count ...]`` writes a fresh split:
``DIR/data.jsonl`` in the published schema, with ``DIR/images/*.png`` and ``DIR/videos/*.mp4``
(paths in the JSONL are relative to DIR). Everything is a pure function of the seed: the same seed
gives a byte-identical JSONL, pixel-identical PNGs and videos that decode to identical frames.

Families (one question each; the prompt wording never reveals the answer)

=========  ==========================================================  ==========================
family     what the pixels show                                         vocabulary (the answers)
=========  ==========================================================  ==========================
colour     one shape of one palette colour                              red orange yellow green
                                                                        cyan blue purple pink
shape      one large shape                                              circle ring square
                                                                        triangle star cross
position   one small shape in one cell of a 3x3 grid                    top left, top, top right,
                                                                        left, center, right,
                                                                        bottom left, bottom,
                                                                        bottom right
count      1..6 small shapes, each in its own cell of the 3x3 grid      one two three four five six
motion     a video (8 frames, 4 fps) of one shape moving in a straight  up down left right
           line
=========  ==========================================================  ==========================

Rankings are graded by a per-family distance d(candidate, correct), d = 0 only for the correct
answer, and given as competition ranks: rank = 1 + (number of candidates strictly closer), so the
correct answer has rank 1, equal distances tie, and a nearer miss always ranks above a farther one.

- colour:   circular distance between the colours' nominal hues (degrees): red 0, orange 30,
            yellow 60, green 120, cyan 180, blue 230, purple 275, pink 325.
- shape:    0 same shape, 1 same group, 2 other group; groups: round {circle, ring},
            polygon {square, triangle}, spiky {star, cross}.
- position: squared distance between grid cells (edge neighbour 1, diagonal 2, two cells 4, ...,
            opposite corner 8).
- count:    |difference|.
- motion:   0 same, 1 perpendicular, 2 opposite.

Why it needs the pixels: the correct answer is uniform over its family's vocabulary, the other
candidates are a uniformly random subset of the rest of that vocabulary, and the order is a
uniformly random permutation. So the candidate set, the answers' lengths and the correct answer's
slot carry no information about which candidate is right; a model without the media is at chance
(1 / n_responses). Answers are bare phrases ("red", "top left", "three") so no wording differs
between right and wrong answers.

Mild variation so that the task is not memorised: background grey level (and light noise on half of
the images), colour jitter of +-12 per channel, size and position jitter. Shapes are drawn without
anti-aliasing and without rotation, large enough to survive the tiny model's 64x64 images with
8-pixel patches (colour >= 18 px, shape 22-30 px, position and motion 14-18 px, count 12-15 px).

Python use::

    from mrrm.train import demo
    path = demo.generate(2000, seed=0, out_dir="demo_train")      # -> demo_train/data.jsonl
    sample, media = demo.make_sample(np.random.default_rng(0), "count")
    in_memory = {**sample, **media}    # {"image": PIL.Image} or {"video": [PIL.Image, ...]}

A sample from `make_sample` has no media key; `generate` adds ``"image": "images/<id>.png"`` or
``"video": "videos/<id>.mp4"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mrrm._io import WriteError, writing

__all__ = [
    "FAMILIES",
    "VOCAB",
    "PALETTE",
    "HUES",
    "SHAPE_GROUPS",
    "GRID_CELLS",
    "DIRECTIONS",
    "VIDEO_FPS",
    "answer_distance",
    "competition_ranks",
    "make_sample",
    "sample_rng",
    "generate",
    "write_video",
    "summarize",
    "main",
]

FAMILIES = ("colour", "shape", "position", "count", "motion")
_ALIASES = {"color": "colour", "colours": "colour", "colors": "colour", "shapes": "shape",
            "positions": "position", "counts": "count", "direction": "motion", "motions": "motion"}

# Colours: well separated in RGB and hue, all saturated, so none is close to the grey background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 30),
    "green": (40, 180, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 70, 220),
    "purple": (140, 50, 200),
    "pink": (240, 80, 170),
}
HUES: dict[str, float] = {"red": 0, "orange": 30, "yellow": 60, "green": 120, "cyan": 180, "blue": 230,
                          "purple": 275, "pink": 325}
SHAPES = ("circle", "ring", "square", "triangle", "star", "cross")
SHAPE_GROUPS: dict[str, str] = {"circle": "round", "ring": "round", "square": "polygon", "triangle": "polygon",
                                "star": "spiky", "cross": "spiky"}
# 3x3 grid, row-major; (row, col) of each name.
GRID_CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
# Image-coordinate unit steps (dx, dy); y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
VIDEO_FPS = 4

VOCAB: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "shape": SHAPES,
    "position": tuple(GRID_CELLS),
    "count": COUNT_WORDS,
    "motion": tuple(DIRECTIONS),
}

PROMPTS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What is the colour of the shape in the image?",
               "Which colour is the object shown?", "What colour is the object in the picture?"),
    "shape": ("What shape is shown?", "Which shape is in the image?", "What is the shape in the picture?",
              "What kind of shape does the image show?"),
    "position": ("Where is the shape?", "Where in the image is the shape?",
                 "In which part of the picture is the object?", "Where is the object shown?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?",
              "How many objects does the picture show?", "Count the shapes in the image."),
    "motion": ("Which way does the shape move?", "In which direction does the shape move in the video?",
               "Where does the object move?", "What direction is the object moving in the video?"),
}


# --------------------------------------------------------------------------------------------------
# Answers: distances and graded rankings
# --------------------------------------------------------------------------------------------------


def answer_distance(family: str, answer: str, correct: str) -> float:
    """How wrong `answer` is when `correct` is right (0 only for the correct answer); see the module doc."""
    family = _family(family)
    vocab = VOCAB[family]
    if answer not in vocab or correct not in vocab:
        raise ValueError(f"{family}: answers must be in {vocab}, got {answer!r} and {correct!r}")
    if family == "colour":
        d = abs(HUES[answer] - HUES[correct]) % 360
        return float(min(d, 360 - d))
    if family == "shape":
        if answer == correct:
            return 0.0
        return 1.0 if SHAPE_GROUPS[answer] == SHAPE_GROUPS[correct] else 2.0
    if family == "position":
        (r1, c1), (r2, c2) = GRID_CELLS[answer], GRID_CELLS[correct]
        return float((r1 - r2) ** 2 + (c1 - c2) ** 2)
    if family == "count":
        return float(abs(COUNT_WORDS.index(answer) - COUNT_WORDS.index(correct)))
    (x1, y1), (x2, y2) = DIRECTIONS[answer], DIRECTIONS[correct]
    return float(1 - (x1 * x2 + y1 * y2))  # cos 0 -> 0, perpendicular -> 1, opposite -> 2


def competition_ranks(distances: Sequence[float]) -> list[int]:
    """1 + the number of strictly smaller distances, for each entry: ties share a rank."""
    return [1 + sum(other < d for other in distances) for d in distances]


def _family(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: choose from {', '.join(FAMILIES)}")
    return key


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _jitter_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.array(PALETTE[name], dtype=np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))


def _background(rng: np.random.Generator, size: int, *, noisy: bool) -> np.ndarray:
    grey = int(rng.integers(70, 191))
    canvas = np.full((size, size, 3), grey, dtype=np.int16)
    if noisy:
        canvas += rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)  # grey noise, same on all channels
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    # Five points, inner radius 0.45 R: fat enough to stay one blob with visible tips at ~20 px.
    pts = []
    for k in range(10):
        r = radius if k % 2 == 0 else 0.45 * radius
        angle = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: int,
                colour: tuple[int, int, int]) -> None:
    """A `shape` whose bounding box is about size x size, centred on (cx, cy)."""
    x0, y0 = round(cx - size / 2), round(cy - size / 2)
    x1, y1 = x0 + size - 1, y0 + size - 1  # PIL boxes include both ends
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=colour, width=max(3, round(size / 4)))
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "star":
        radius = size / 2
        # The star's bounding box is 1.81 R tall from its top tip: put its box centre at (cx, cy).
        top = cy - 1.809 * radius / 2
        draw.polygon(_star_points(cx, top + radius, radius), fill=colour)
    elif shape == "cross":
        arm = max(3, round(size / 3))
        a0 = round(cx - arm / 2)
        b0 = round(cy - arm / 2)
        draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=colour)
        draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _render(background: np.ndarray, items: Iterable[tuple[str, float, float, int, tuple[int, int, int]]]) -> Image.Image:
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for shape, cx, cy, size, colour in items:
        _draw_shape(draw, shape, cx, cy, size, colour)
    return image


def _cell_centre(cell: tuple[int, int], image_size: int) -> tuple[float, float]:
    step = image_size / 3
    row, col = cell
    return (col + 0.5) * step, (row + 0.5) * step


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` of the split with `seed` (independent of every other sample)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x6D72726D]))


def _media(rng: np.random.Generator, family: str, answer: str, image_size: int, video_frames: int):
    s = image_size / 64  # all geometry is designed at 64 px and scales with the image
    px = lambda v: max(1, round(v * s))  # noqa: E731
    if family == "motion":
        bg = _background(rng, image_size, noisy=False)  # flat: noise costs bits and blurs in the codec
        shape, colour = _choice(rng, SHAPES), _jitter_colour(rng, _choice(rng, VOCAB["colour"]))
        size = int(rng.integers(px(14), px(18) + 1))
        dx, dy = DIRECTIONS[answer]
        travel = float(rng.uniform(24, 32)) * s
        margin = size / 2 + px(2)
        start = float(rng.uniform(margin, image_size - margin - travel))  # along the motion axis
        cross = float(rng.uniform(margin, image_size - margin))  # across it
        frames = []
        for t in range(video_frames):
            along = start + travel * t / max(1, video_frames - 1)
            if dx < 0 or dy < 0:  # left, up: coordinates shrink, so mirror the path
                along = image_size - along
            cx, cy = (along, cross) if dx else (cross, along)
            frames.append(_render(bg, [(shape, cx, cy, size, colour)]))
        return {"video": frames}

    noisy = bool(rng.integers(2))
    bg = _background(rng, image_size, noisy=noisy)
    centre = image_size / 2
    if family == "colour":
        size = int(rng.integers(px(18), px(28) + 1))
        cx, cy = centre + rng.uniform(-10, 10) * s, centre + rng.uniform(-10, 10) * s
        items = [(_choice(rng, SHAPES), cx, cy, size, _jitter_colour(rng, answer))]
    elif family == "shape":
        size = int(rng.integers(px(22), px(30) + 1))
        cx, cy = centre + rng.uniform(-6, 6) * s, centre + rng.uniform(-6, 6) * s
        items = [(answer, cx, cy, size, _jitter_colour(rng, _choice(rng, VOCAB["colour"])))]
    elif family == "position":
        size = int(rng.integers(px(14), px(18) + 1))
        cx, cy = _cell_centre(GRID_CELLS[answer], image_size)
        cx, cy = cx + rng.uniform(-3, 3) * s, cy + rng.uniform(-3, 3) * s
        items = [(_choice(rng, SHAPES), cx, cy, size, _jitter_colour(rng, _choice(rng, VOCAB["colour"])))]
    elif family == "count":
        n = COUNT_WORDS.index(answer) + 1
        cells = rng.permutation(9)[:n]
        items = []
        for cell in cells:
            cx, cy = _cell_centre(divmod(int(cell), 3), image_size)
            size = int(rng.integers(px(12), px(15) + 1))
            cx, cy = cx + rng.uniform(-1.5, 1.5) * s, cy + rng.uniform(-1.5, 1.5) * s
            items.append((_choice(rng, SHAPES), cx, cy, size, _jitter_colour(rng, _choice(rng, VOCAB["colour"]))))
    else:
        raise ValueError(f"unknown family {family!r}")
    return {"image": _render(bg, items)}


def make_sample(rng: np.random.Generator | int, family: str, *, sample_id: str | None = None, n_responses: int = 4,
                image_size: int = 64, video_frames: int = 8) -> tuple[dict, dict]:
    """One sample of `family`: (sample, media).

    sample: ``{"id", "family", "prompt", "responses", "rankings"}`` (no media key); media:
    ``{"image": PIL.Image}`` or ``{"video": [PIL.Image, ...]}``. ``{**sample, **media}`` is an
    in-memory sample in the published schema. `rng` is a numpy Generator (or an int seed).
    """
    family = _family(family)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    vocab = VOCAB[family]
    if not 2 <= n_responses <= len(vocab):
        raise ValueError(f"n_responses must be in [2, {len(vocab)}] for family {family!r} "
                         f"(its vocabulary has {len(vocab)} answers), got {n_responses}")
    if image_size < 32 or image_size % 2:
        raise ValueError(f"image_size must be an even number >= 32, got {image_size}")
    if video_frames < 2:
        raise ValueError(f"video_frames must be >= 2, got {video_frames}")

    # The correct answer is uniform over the vocabulary, the distractors a uniform subset of the
    # rest, the order a uniform permutation: nothing but the media tells which one is right.
    correct = _choice(rng, vocab)
    others = [a for a in vocab if a != correct]
    distractors = [others[i] for i in rng.choice(len(others), size=n_responses - 1, replace=False)]
    responses = [correct] + distractors
    responses = [responses[i] for i in rng.permutation(n_responses)]
    rankings = competition_ranks([answer_distance(family, r, correct) for r in responses])
    prompt = _choice(rng, PROMPTS[family])
    media = _media(rng, family, correct, image_size, video_frames)
    sample = {"id": sample_id if sample_id is not None else f"{family}-{int(rng.integers(1 << 31)):010d}",
              "family": family, "prompt": prompt, "responses": responses, "rankings": rankings}
    return sample, media


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _rgb_to_yuv420p(frame: Image.Image) -> np.ndarray:
    """RGB -> planar YUV 4:2:0 (BT.601, limited range: what decoders assume for untagged SD video),
    as the [H * 3/2, W] array PyAV takes. Done here in numpy rather than by swscale inside the
    encoder, whose conversion was seen to change an encoded byte now and then between runs; only
    elementwise float operations, so every value is the same whatever the memory layout."""
    rgb = np.asarray(frame, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def half(plane: np.ndarray) -> np.ndarray:
        # the 2x2 average as elementwise adds in a fixed order: numpy's reductions (.mean) sum in an
        # order that can depend on the array's memory alignment, which flipped a rounding (and so an
        # encoded video) now and then between runs of the same command
        return (((plane[0::2, 0::2] + plane[0::2, 1::2]) + plane[1::2, 0::2]) + plane[1::2, 1::2]) / 4

    planes = np.concatenate([y.reshape(-1), half(cb).reshape(-1), half(cr).reshape(-1)])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = VIDEO_FPS) -> None:
    """H.264 mp4, lossless (qp 0: High 4:4:4 Predictive, yuv420p; no B-frames, one thread, bit-exact
    muxing): a decoder returns exactly the YUV frames given, whatever choices the encoder makes. At
    crf 12 the encoded pixels followed the encoder's choices, and those changed for about one clip in
    2,000 now and then between runs of the same command, in the training process and in a fresh
    interpreter alike (the cause inside libx264/PyAV was not found), so two training runs could see
    different data."""
    import av

    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"video frames need even sides for yuv420p, got {width}x{height}")
    with av.open(os.fspath(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"qp": "0", "preset": "veryfast", "threads": "1", "bframes": "0"}
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(frame), format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _resolve_families(families: Iterable[str] | str | None) -> tuple[str, ...]:
    if families is None:
        return FAMILIES
    if isinstance(families, str):
        families = [f for f in families.replace(",", " ").split() if f]
    chosen = tuple(dict.fromkeys(_family(f) for f in families))
    if not chosen:
        raise ValueError("families: at least one family is needed")
    return chosen


def generate(n: int, seed: int, out_dir: str | os.PathLike, *, families: Iterable[str] | str | None = None,
             n_responses: int = 4, image_size: int = 64, video_frames: int = 8) -> Path:
    """Write `n` samples (families round-robin) to ``out_dir/data.jsonl`` with their media under
    ``out_dir/images`` and ``out_dir/videos``; return the JSONL's path. Sample i depends only on
    (seed, i) and the arguments."""
    chosen = _resolve_families(families)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for family in chosen:  # fail before writing anything
        if not 2 <= n_responses <= len(VOCAB[family]):
            raise ValueError(f"n_responses must be in [2, {len(VOCAB[family])}] for family {family!r}, "
                             f"got {n_responses}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if "motion" in chosen:
        (out / "videos").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))
    lines = []
    for i in range(n):
        family = chosen[i % len(chosen)]
        sample_id = f"s{seed}-{i:0{width}d}-{family}"
        sample, media = make_sample(sample_rng(seed, i), family, sample_id=sample_id, n_responses=n_responses,
                                    image_size=image_size, video_frames=video_frames)
        if "image" in media:
            rel = f"images/{sample_id}.png"
            media["image"].save(out / rel, format="PNG", optimize=False)
            sample["image"] = rel
        else:
            rel = f"videos/{sample_id}.mp4"
            write_video(media["video"], out / rel)
            sample["video"] = rel
        lines.append(json.dumps(sample, ensure_ascii=False))
    path = out / "data.jsonl"
    tmp = out / f".data.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def generate_in_subprocess(n: int, seed: int, out_dir: str | os.PathLike) -> Path:
    """`generate(n, seed, out_dir)` run by `python -m mrrm.demo` in a fresh interpreter; returns the
    JSONL's path. Training uses this: with the earlier lossy clips, generating inside a process that
    had set up accelerate and transformers encoded 1-3 of 2,000 clips differently in 2 of 5 runs, a
    fresh interpreter in none of 8 generation runs, yet one clip differed in a later training run's
    fresh-interpreter generation. The clips are lossless now (write_video), so the decoded frames
    are the same either way; the training process stays free of the encoder's memory."""
    import subprocess

    cmd = [sys.executable, "-m", "mrrm.demo", "--seed", str(seed), "--n", str(n), "--out", os.fspath(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        if last[0].startswith("mrrm.demo: "):  # its own one-line error (e.g. a full disk)
            raise RuntimeError(f"demo data generation failed: {last[0][len('mrrm.demo: '):]}")
        raise RuntimeError(f"demo data generation failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return Path(out_dir) / "data.jsonl"


def summarize(path: str | os.PathLike) -> list[str]:
    """One line per family of a generated JSONL: samples, media kind and the correct-answer counts."""
    per_family: dict[str, Counter] = {}
    kinds: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            sample = json.loads(line)
            family = sample["family"]
            correct = sample["responses"][sample["rankings"].index(1)]
            per_family.setdefault(family, Counter())[correct] += 1
            kinds[family] = "videos" if "video" in sample else "images"
    lines = []
    for family in (f for f in FAMILIES if f in per_family):
        counts = per_family[family]
        answers = " ".join(f"{a.replace(' ', '_')}={counts[a]}" for a in VOCAB[family] if counts[a])
        lines.append(f"{family:<9} {sum(counts.values()):>6} {kinds[family]:<7} answers: {answers}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrrm demo",
                                     description="Write a split of the synthetic multimodal preference task.")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    parser.add_argument("--out", required=True, help="output directory (data.jsonl, images/, videos/)")
    parser.add_argument("--families", nargs="+", default=None,
                        help=f"families to generate, round-robin (default all: {' '.join(FAMILIES)})")
    parser.add_argument("--n-responses", type=int, default=4, help="candidates per prompt (default 4)")
    parser.add_argument("--image-size", type=int, default=64, help="image and video side in pixels (default 64)")
    parser.add_argument("--video-frames", type=int, default=8, help=f"frames per video at {VIDEO_FPS} fps (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        with writing(args.out):
            try:
                path = generate(args.n, args.seed, args.out, families=args.families, n_responses=args.n_responses,
                                image_size=args.image_size, video_frames=args.video_frames)
            except ValueError as e:
                parser.error(str(e))
    except WriteError as e:  # a full disk: one line naming the folder, not a traceback
        print(f"mrrm.demo: {e}", file=sys.stderr)
        return 1
    for line in summarize(path):
        print(line)
    print(f"wrote {args.n} samples to {path} in {time.perf_counter() - start:.1f} s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
