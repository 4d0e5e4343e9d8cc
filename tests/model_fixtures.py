"""Shared builders for the model tests: tiny Qwen-VL reward models, an independent reference
scorer (plain transformers forward, eager attention, one sample at a time) and small media.

Everything is built offline from configs (mrrm.tiny); nothing touches the hub.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrrm import tiny
from mrrm.model import RewardModel, RewardModelConfig

FAMILIES = tiny.FAMILIES
HIDDEN = 64  # tiny.build_config's default hidden size
HEAD_DIM = 32
HEAD_STD = 0.5  # large enough that score differences are far above fp32 rounding


def processor_class(family: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    return {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[family]


def build_processor(family: str, tokenizer):
    image, video = tiny.build_processors(family)
    return processor_class(family)(image_processor=image, tokenizer=tokenizer, video_processor=video)


def randomize_head(head: torch.nn.Sequential, std: float = HEAD_STD, seed: int = 0) -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (head[0], head[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return head


@dataclass
class TinyFamily:
    """One family's tiny reward model plus what a test needs to rebuild or check it."""

    family: str
    config: object          # the backbone config as built (not mutated by RewardModel)
    tokenizer: object
    processor: object
    model: RewardModel      # mrrm attention, packed
    reference: torch.nn.Module  # a separate backbone with the same weights, eager attention


def build_family(family: str, tokenizer=None, seed: int = 0, **config_kw) -> TinyFamily:
    tok = tokenizer or tiny.build_tokenizer()
    cfg = tiny.build_config(family, tokenizer=tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = tiny.build_backbone(cfg)
    proc = build_processor(family, tok)
    model = RewardModel(backbone, tok, proc, RewardModelConfig(value_head_hidden_dim=HEAD_DIM, **config_kw))
    randomize_head(model.value_head, seed=seed)
    model.eval()
    ref = tiny.build_backbone(cfg)
    ref.load_state_dict(backbone.state_dict())
    ref.set_attn_implementation("eager")
    ref.eval()
    return TinyFamily(family, cfg, tok, proc, model, ref)


def sample_token_layout(layout, score_at: str = "last"):
    """(input_ids, score positions) of one sample's joint stream, built by hand from its layout
    (independent of mrrm.packing): prefix, r1, sep, r2, ..., rN; response i scored at its last token
    (score_at="last"), or at the <|resp_sep|> token that follows it (score_at="separator", which
    also closes rN with a separator)."""
    ids = list(layout.prefix_ids)
    positions = []
    n = len(layout.response_ids)
    for i, r in enumerate(layout.response_ids):
        ids += list(r)
        if score_at == "last":
            positions.append(len(ids) - 1)
        if i < n - 1 or score_at == "separator":
            if score_at == "separator":
                positions.append(len(ids) + layout.separator_index)
            ids += list(layout.separator_ids)
    return ids, positions


@torch.no_grad()
def reference_scores(fam: TinyFamily, sample: dict, model: RewardModel | None = None,
                     score_at: str = "last") -> list[float]:
    """Joint scores of one sample from the plain transformers forward: no packing, eager attention,
    the backbone computes its own (m)rope index; the value head applied as a plain nn.Sequential."""
    model = model or fam.model
    enc = model.encoder.encode(sample, 0)
    ids, positions = sample_token_layout(enc.layout, score_at)
    input_ids = torch.tensor([ids])
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == fam.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    types[input_ids == fam.tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
    kw = {}
    if enc.pixel_values is not None:
        kw.update(pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
    if enc.pixel_values_videos is not None:
        kw.update(pixel_values_videos=enc.pixel_values_videos, video_grid_thw=enc.video_grid_thw)
    if enc.second_per_grid_ts is not None:
        kw["second_per_grid_ts"] = enc.second_per_grid_ts
    hidden = fam.reference(input_ids=input_ids, mm_token_type_ids=types, use_cache=False, **kw).last_hidden_state[0]
    head = model.value_head
    return (head(hidden[positions]).squeeze(-1) / math.sqrt(HIDDEN)).tolist()


# -- media --------------------------------------------------------------------------------------

def rgb_image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def frame_list(seed: int, n: int = 4, size: int = 32) -> list[Image.Image]:
    return [rgb_image(seed * 100 + i, (size, size)) for i in range(n)]


def write_mp4(path: Path, num_frames: int = 8, fps: int = 4, size: int = 32) -> Path:
    """An H.264 mp4 written with PyAV (lossless, so the decoded pixels are the drawn ones)."""
    import av

    rng = np.random.default_rng(7)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two list[list[float]] of one shape (asserted)."""
    assert len(a) == len(b), (len(a), len(b))
    worst = 0.0
    for x, y in zip(a, b):
        assert (x is None) == (y is None), (x, y)
        if x is None:
            continue
        assert len(x) == len(y), (x, y)
        worst = max([worst] + [abs(p - q) for p, q in zip(x, y)])
    return worst
