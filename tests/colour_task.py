"""The colour task the training tests share (tests/train/test_train.py, tests/core/test_integrity.py): plain
images whose colour the tiny model learns in a few steps."""
import json
import os

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30)}


def _write_colour_task(d, n=32, seed=0):
    """A task the tiny model learns in a few steps: the colour of a plain image (graded ranks)."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    lines = []
    for i in range(n):
        c = list(COLOURS)[i % 4]
        Image.new("RGB", (64, 64), COLOURS[c]).save(os.path.join(d, f"img{i}.png"))
        resp = list(COLOURS)
        rng.shuffle(resp)
        ranks = [1 if r == c else (2 if r == "yellow" else 3) for r in resp]
        if c == "yellow":
            ranks = [1 if r == c else 2 for r in resp]
        lines.append({"id": f"s{i}", "prompt": "What colour is the image?", "image": f"img{i}.png",
                      "responses": resp, "rankings": ranks, "family": "colour"})
    path = os.path.join(d, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return path
