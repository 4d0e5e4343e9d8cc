"""What the FLOPs tests share (tests/eval/test_flops.py, tests/model/test_qwen35.py): the sample shapes, an
encoded sample with its responses separated as mrrm.flops models them, and FlopCounterMode over a real
forward."""
from __future__ import annotations

import dataclasses

import torch
from model_fixtures import HEAD_DIM, frame_list, rgb_image
from torch.utils.flop_counter import FlopCounterMode

from mrrm.data.encoding import SEPARATOR_TEXT
from mrrm.eval import flops

SAMPLES = {
    # 80 x 48 pixels -> 10 x 6 patches of 8 -> 5 x 3 tokens: Qwen2.5-VL's 2 x 2 windows end partial
    "image": {"prompt": "What is shown here?", "image": rgb_image(1, (80, 48)),
              "responses": ["a cat", "a dog on the left", "a red car near the big tree"]},
    "video": {"prompt": "What moves?", "video": frame_list(2, n=4),
              "responses": ["up", "it moves down", "left", "it stays still"]},
}


def _separated(model, enc):
    """The sample's real prefix (media, template) with its responses joined by the separator's
    tokens: the structure mrrm.flops models (the authors' joint turn tokenizes the responses with
    their neighbours, so its length is not a function of the response lengths alone)."""
    sep = model.tokenizer(SEPARATOR_TEXT, add_special_tokens=False)["input_ids"]
    layout = dataclasses.replace(enc.layout, separator_ids=sep, joint_ids=None, joint_score_offsets=None,
                                 response_starts=None, joint_starts=None)
    return dataclasses.replace(enc, layout=layout, text=None)


def _shape_of(model, enc):
    """The scoring_flops keyword arguments describing an encoded sample (separated by `_separated`)."""
    grids = [g for t in (enc.image_grid_thw, enc.video_grid_thw) if t is not None for g in t.tolist()]
    merge = model.backbone.config.vision_config.spatial_merge_size
    vision_tokens = sum(t * h * w for t, h, w in grids) // merge ** 2
    lay = enc.layout
    return dict(prompt_tokens=len(lay.prefix_ids) - vision_tokens, response_tokens=[len(r) for r in lay.response_ids],
                vision=grids, separator_tokens=len(lay.separator_ids), head_hidden=HEAD_DIM)


def _count_real(model, enc, mode, monkeypatch) -> dict:
    """FlopCounterMode over the real model's forward in `mode`: total and the part inside the vision tower."""
    monkeypatch.setenv("MRRM_OPS", "torch")
    (inputs,) = list(model.micro_batches([enc], mode, 1 << 20))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    per_module = counter.get_flop_counts()
    vision = [sum(ops.values()) for name, ops in per_module.items() if name.endswith(".visual")]
    # rotary embeddings are outside the cost model; transformers 5.15 and older compute their angles
    # with a matmul the counter sees (flops.rotary_flops), later versions element-wise
    rotary, _ = flops.rotary_flops(counter)
    return {"total": int(counter.get_total_flops()) - rotary, "vision": int(sum(vision)),
            "sequences": inputs.packed.num_sequences, "tokens": inputs.packed.num_tokens}
