"""Shared builders for the model tests: tiny Qwen-VL reward models, an independent reference
scorer (plain transformers forward, eager attention, one sample at a time) and small media.

Everything is built offline from configs (mrrm.model.tiny); nothing touches the hub.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrrm.model import tiny
from mrrm.model.parts import RewardModelConfig, head_linears
from mrrm.model.reward_model import RewardModel

FAMILIES = tiny.FAMILIES
HIDDEN = 64  # tiny.build_config's default hidden size
HEAD_DIM = 32
HEAD_STD = 0.5  # large enough that score differences are far above fp32 rounding


def build_processor(family: str, tokenizer):
    return tiny.build_processor(family, tokenizer)


def randomize_head(head: torch.nn.Module, std: float = HEAD_STD, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in head_linears(head):
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


def require_native(family: str, load=None) -> None:
    """Go on where the installed transformers has `family` natively (Molmo2 from 5.20). Where it does
    not: `load()` (loading one of its checkpoints), when given, must be the clear error naming the
    version it needs and the installed one; then the test skips, for that real absence."""
    import transformers

    from mrrm.model.parts import NATIVE_SINCE

    need = NATIVE_SINCE.get(family)
    if need is None or hasattr(transformers, need[0]):
        return
    if load is not None:
        with pytest.raises(ImportError, match=rf"needs transformers >= {need[1]}.*installed {transformers.__version__}"):
            load()
    pytest.skip(f"native {family} needs transformers >= {need[1]} (installed {transformers.__version__})")


def build_family(family: str, tokenizer=None, seed: int = 0, **config_kw) -> TinyFamily:
    tok = tokenizer or tiny.build_tokenizer(family=family)
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


def sample_token_layout(layout):
    """(input_ids, score positions) of one sample's joint stream, read off its layout: the prefix,
    the joint body, and the body's score offsets (the authors' positions)."""
    ids = list(layout.prefix_ids) + list(layout.joint_ids)
    P = len(layout.prefix_ids)
    return ids, [P + o for o in layout.joint_score_offsets]


@torch.no_grad()
def reference_scores(fam: TinyFamily, sample: dict, model: RewardModel | None = None) -> list[float]:
    """Joint scores of one sample from the plain transformers forward: no packing, eager attention,
    the backbone computes its own (m)rope index and masks (Molmo2: its media tokens' bidirectional
    block); the value head applied as a plain module."""
    model = model or fam.model
    enc = model.encoder.encode(sample, 0)
    ids, positions = sample_token_layout(enc.layout)
    input_ids = torch.tensor([ids])
    types = model.encoder.token_types(input_ids)
    kw = dict(enc.media)
    if kw:
        kw["mm_token_type_ids"] = types
    hidden = fam.reference(input_ids=input_ids, use_cache=False, **kw).last_hidden_state[0]
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
