"""FLOPs of one scoring pass: an analytic cost model, and a FlopCounterMode count to check it against.

    scoring_flops(config, mode, n, prompt_tokens=P, response_tokens=R, vision=...) -> dict
    ratio(config, n, ..., numerator="single", denominator="joint") -> float
    count_flops(config, mode, n, ...) -> dict          (torch.utils.flop_counter, meta device)
    python -m mrrm.flops --config qwen3_vl_4b --n 4 --image [--count]

What one scoring pass costs, for a prompt with V vision tokens (after the spatial merge), P other
prompt tokens (chat template, question), N responses of R_i tokens and separators of s tokens
(s = 3 for mrrm's "\\n\\n<|resp_sep|>\\n\\n"); Pt = V + P is the shared prefix:

    mode          text tokens                    sequences (attention)              vision encoder
    single        N*Pt + sum R_i                 N causal sequences [Pt + R_i]      N times
    joint         Pt + sum R_i + (N-1)*s         1 causal sequence                  once
    independent   Pt + sum R_i                   1 sequence, shared-prefix mask     once

(R_i counts what follows the prefix for response i, e.g. the chat template's closing tokens; with
score_at="separator" every response carries its separator: +s per response in every mode.)
This is exactly how mrrm runs the modes (mrrm.data.packing + mrrm.data.encoding.attach_media): `single` packs
N sequences and re-encodes the image for each, `joint` and `independent` are one stream.

Components (a multiply-add is 2 FLOPs; biases, norms, activations, rotary and softmax are not
counted, as FlopCounterMode does not count them; the counter's counts leave out the rotary-embedding
modules, which older transformers computes with a matmul: `rotary_flops`):
- vision: patch embedding (Conv3d: 2 * patches * C*tp*p*p * W), per block qkv + proj
  (2 * 4W^2 per patch) and MLP (2 * 3*W*I gated [Qwen2.5-VL] or 2 * 2*W*I [Qwen2-VL, Qwen3-VL]),
  block attention 4 * W * sum(segment^2) over its segments (one per frame for full-attention
  blocks; Qwen2.5-VL's windowed blocks use window_size windows), the patch merger
  (2 * merged * (4W*4W + 4W*out)) and Qwen3-VL's deepstack mergers (same shape, one per index).
- text, per layer: q/k/v/o and the gated MLP, 2 * (H*Hq*d + 2*H*Hkv*d + Hq*d*H + 3*H*I) per
  token; attention 4 * Hq * d per (query, key) pair (QK^T and PV; GQA repeats K/V per query head).
- value head on the M = N score rows only: 2 * N * (H*D + D).
- hybrid text models (Qwen3.5: Gated DeltaNet layers between full-attention layers): a full-attention
  layer as above, its q_proj twice as wide (the output gate); a linear-attention layer's projections
  in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj and the gated MLP, 2 * (H*(2Kd + Vd) + H*Vd
  + 2*H*HV + Vd*H + 3*H*I) per token (Kd = Hk*dk key width, Vd = HV*dv value width), counted in
  text_linear; its sequence mixing (`text_recurrent`, part of text_attention) is the depthwise
  causal conv (2 * W * (2Kd + Vd) per token) plus the gated delta rule. The delta rule's "dense"
  count is the chunked algorithm mrrm's torch path runs (mrrm.ops.linear_attention.chunk_gated_delta_rule,
  chunks of C = 64): per value head and chunk 4*C^2*dk + 2*C^2*dv + 6*C*dk*dv, over each phase's
  segments padded to its longest (joint: one sequence; single: N sequences; independent: the prefix,
  then the N responses from its state); "useful" is the recurrence's own work, 6 * HV * dk * dv per
  token (read, write and query of the [dk, dv] state).

Attention conventions (`convention=`):
- "dense": every sequence's full L x L square, masked or not. This is what FlopCounterMode reports
  for mrrm's executed path, which it can see only through the pure-torch reference attention
  (mrrm.ops.oracle.varlen_attention: one [L, L] matmul pair per packed sequence, mask applied
  afterwards) or SDPA (charged as the full square, a causal mask does not halve it). For
  `independent` the one packed sequence is charged in full (it lacks only the joint stream's separators).
  `ratio(..., convention="dense")` is the ratio the counter measures (bench_perf/test_flops.py).
- "useful": only visible (query, key) pairs: L(L+1)/2 per causal sequence; for the shared-prefix
  mask Pt(Pt+1)/2 + sum_i (r_i*Pt + r_i(r_i+1)/2). mrrm's Triton kernel skips fully masked
  blocks (the causal upper triangle, other responses' blocks), so its work is this count plus
  partial diagonal blocks. `ratio(..., convention="useful")` is the honest compute ratio of that path.
Vision attention is bidirectional within each segment: dense == useful there.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import numbers
import os
from dataclasses import dataclass, field

from mrrm._args import doc_epilog
from mrrm.common import MODES, check_choice, check_int

CONVENTIONS = ("dense", "useful")
SCORE_AT = ("last", "separator")
SEPARATOR_TOKENS = 3          # "\n\n<|resp_sep|>\n\n" with Qwen's tokenizer: "\n\n", <|resp_sep|>, "\n\n"
VALUE_HEAD_HIDDEN = 1024      # the paper's head: Linear(H, 1024) -> SiLU -> Linear(1024, 1)
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
DELTA_RULE_CHUNK = 64         # chunk size of mrrm's torch delta rule (linear_attention.chunk_gated_delta_rule)

# The published configs (config.json of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen3-VL-4B-Instruct),
# written out so nothing is downloaded. Token ids are Qwen's; they do not affect FLOPs.
_QWEN_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653)
ARCHITECTURES = {
    "qwen2_5_vl_3b": dict(
        model_type="qwen2_5_vl",
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, hidden_act="silu",
                         max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048,
                           tokens_per_second=2),
        tie_word_embeddings=True, **_QWEN_TOKEN_IDS),
    "qwen3_vl_4b": dict(
        model_type="qwen3_vl",
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                         max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True, "rope_theta": 5000000.0}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                           hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304,
                           deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True, **_QWEN_TOKEN_IDS),
    # transformers' Qwen3_5Config defaults (its docstring: "Qwen3.5-9B style"), the vision tower's
    # output width set to the text width; the published config.json is not available offline.
    "qwen3_5_9b": dict(
        model_type="qwen3_5",
        text_config=dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=256, hidden_act="silu",
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                      for i in range(32)],
                         linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                         linear_num_key_heads=16, linear_num_value_heads=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                          "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304),
        image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054),
}


# --------------------------------------------------------------------------------------------------
# Backbone widths
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSpec:
    """The language model's widths. MLP: gated (gate, up, down), as Qwen2/Qwen2.5/Qwen3/LLaMA.
    Hybrid models (Qwen3.5): num_linear_layers of the num_layers are Gated DeltaNet layers (linear_*
    widths, conv kernel linear_conv_kernel); the others are full attention with an output gate
    (attn_output_gate: q_proj is twice as wide)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_linear_layers: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    attn_output_gate: bool = False

    @property
    def num_full_layers(self) -> int:
        return self.num_layers - self.num_linear_layers


@dataclass(frozen=True)
class VisionSpec:
    """A Qwen-VL vision tower. window_size (pixels) > 0: blocks not in fullatt_block_indexes attend
    within windows (Qwen2.5-VL); 0: every block attends over each whole frame."""

    family: str
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden_size: int
    gated_mlp: bool = False
    window_size: int = 0
    fullatt_block_indexes: tuple = ()
    deepstack_visual_indexes: tuple = ()

    @property
    def merged_patch(self) -> int:
        """Pixels per side of one vision token after the spatial merge."""
        return self.patch_size * self.spatial_merge_size

    @property
    def num_full_blocks(self) -> int:
        if self.window_size <= 0:
            return self.depth
        return len({i for i in self.fullatt_block_indexes if 0 <= i < self.depth})


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    text: TextSpec
    vision: VisionSpec | None = None


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _text_spec(tc, where: str) -> TextSpec:
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if _get(tc, key) is None:
            raise ValueError(f"{where}: the text config has no {key!r}")
    if _get(tc, "num_experts") or _get(tc, "num_local_experts"):
        raise ValueError(f"{where}: mixture-of-experts language models are not modelled (dense MLP only)")
    H = check_int(f"{where}: hidden_size", _get(tc, "hidden_size"))
    heads = check_int(f"{where}: num_attention_heads", _get(tc, "num_attention_heads"))
    kv = _get(tc, "num_key_value_heads") or heads
    kv = check_int(f"{where}: num_key_value_heads", kv)
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    head_dim = _get(tc, "head_dim") or H // heads
    layers = check_int(f"{where}: num_hidden_layers", _get(tc, "num_hidden_layers"))
    return TextSpec(H, layers, heads, kv, check_int(f"{where}: head_dim", head_dim),
                    check_int(f"{where}: intermediate_size", _get(tc, "intermediate_size")),
                    **_linear_attention_widths(tc, layers, where))


def _linear_attention_widths(tc, layers: int, where: str) -> dict:
    """TextSpec's hybrid fields from a text config whose layer_types hold "linear_attention" (Qwen3.5's
    Gated DeltaNet); {} for a plain transformer."""
    types = list(_get(tc, "layer_types", None) or [])[:layers]
    linear = sum(t == "linear_attention" for t in types)
    if not linear:
        return {}
    unknown = sorted(set(types) - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{where}: layer types {unknown} are not modelled (linear_attention, full_attention)")
    keys = {"linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
            "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
            "linear_conv_kernel": "linear_conv_kernel_dim"}
    out = {"num_linear_layers": linear, "attn_output_gate": True}
    for field_name, key in keys.items():
        if _get(tc, key) is None:
            raise ValueError(f"{where}: a text config with linear_attention layers needs {key!r}")
        out[field_name] = check_int(f"{where}: {key}", _get(tc, key))
    if out["linear_num_value_heads"] % out["linear_num_key_heads"]:
        raise ValueError(f"{where}: linear_num_value_heads ({out['linear_num_value_heads']}) must be a multiple of "
                         f"linear_num_key_heads ({out['linear_num_key_heads']})")
    return out


def _vision_spec(family: str, vc, text_hidden: int, where: str) -> VisionSpec:
    def req(key, default=None):
        v = _get(vc, key, default)
        if v is None:
            raise ValueError(f"{where}: the vision config has no {key!r}")
        return check_int(f"{where}: vision {key}", v)

    common = dict(family=family, depth=req("depth"), num_heads=req("num_heads"), patch_size=req("patch_size"),
                  temporal_patch_size=req("temporal_patch_size", 2), in_channels=req("in_channels", 3),
                  spatial_merge_size=req("spatial_merge_size", 2))
    if family == "qwen2_vl":
        width = req("embed_dim")
        ratio = _get(vc, "mlp_ratio", 4)
        spec = VisionSpec(hidden_size=width, intermediate_size=int(width * ratio),
                          out_hidden_size=req("hidden_size", text_hidden), **common)
    elif family == "qwen2_5_vl":
        spec = VisionSpec(hidden_size=req("hidden_size"), intermediate_size=req("intermediate_size"),
                          out_hidden_size=req("out_hidden_size", text_hidden), gated_mlp=True,
                          window_size=check_int(f"{where}: vision window_size", _get(vc, "window_size", 0), minimum=0),
                          fullatt_block_indexes=tuple(int(i) for i in _get(vc, "fullatt_block_indexes", ()) or ()),
                          **common)
    elif family in ("qwen3_vl", "qwen3_5"):  # Qwen3.5's tower is Qwen3-VL's without deepstack mergers
        spec = VisionSpec(hidden_size=req("hidden_size"), intermediate_size=req("intermediate_size"),
                          out_hidden_size=req("out_hidden_size", text_hidden),
                          deepstack_visual_indexes=tuple(
                              int(i) for i in _get(vc, "deepstack_visual_indexes", ()) or ()),
                          **common)
    else:
        raise ValueError(f"{where}: vision family {family!r} is not modelled; supported: {VISION_FAMILIES}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"{where}: vision hidden_size {spec.hidden_size} is not a multiple of "
                         f"num_heads {spec.num_heads}")
    if spec.window_size and spec.window_size % spec.merged_patch:
        raise ValueError(f"{where}: vision window_size {spec.window_size} is not a multiple of patch_size * "
                         f"spatial_merge_size ({spec.merged_patch})")
    return spec


def backbone_config(name: str):
    """The transformers config object of a named architecture (ARCHITECTURES), built offline."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return _transformers_config(ARCHITECTURES[name], name)


def _transformers_config(d: dict, where: str):
    from transformers import AutoConfig

    d = copy.deepcopy(d)
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:  # an unknown model type or a rejected field, attributed to the caller's dict
        raise ValueError(f"{where}: transformers could not build a {model_type!r} config: {e}") from e


def backbone_spec(config) -> BackboneSpec:
    """The widths the cost model needs, from: a BackboneSpec; a name in ARCHITECTURES; a transformers
    config (Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3_5Config, or a dense text LM config such as
    Qwen2Config / Qwen3Config / LlamaConfig); a dict with "model_type" (a transformers config as a
    dict); or a plain dict of widths {"hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim"?, "intermediate_size", "vision_config"?: {..., "family"}}."""
    if isinstance(config, BackboneSpec):
        return config
    if isinstance(config, str):
        if config not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {config!r}; known: {sorted(ARCHITECTURES)}")
        return backbone_spec(backbone_config(config))
    if isinstance(config, dict):
        if "model_type" in config:
            return backbone_spec(_transformers_config(config, "config dict"))
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "intermediate_size", "vocab_size", "vision_config", "name"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config dict: unknown keys {unknown}; expected some of {sorted(known)}")
        text = _text_spec(config, "config dict")
        vc = config.get("vision_config")
        vision = None
        if vc is not None:
            if not isinstance(vc, dict) or "family" not in vc:
                raise ValueError(f"config dict: vision_config must be a dict with a 'family' in {VISION_FAMILIES}")
            vision = _vision_spec(vc["family"], vc, text.hidden_size, "config dict")
        return BackboneSpec(str(config.get("name", "custom")), text, vision)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"config must be a transformers config, a dict, a BackboneSpec or one of "
                         f"{sorted(ARCHITECTURES)}; got {type(config).__name__}")
    vc = getattr(config, "vision_config", None)
    if vc is None:
        return BackboneSpec(model_type, _text_spec(getattr(config, "text_config", config), model_type))
    if model_type not in VISION_FAMILIES:
        raise ValueError(f"{model_type}: only the vision towers of {VISION_FAMILIES} are modelled")
    text = _text_spec(getattr(config, "text_config", config), model_type)
    return BackboneSpec(model_type, text, _vision_spec(model_type, vc, text.hidden_size, model_type))


# --------------------------------------------------------------------------------------------------
# Vision inputs: patch grids (t, h, w)
# --------------------------------------------------------------------------------------------------


def _near_square(tokens: int) -> tuple[int, int]:
    """(a, b) with a * b == tokens, a <= b, a as large as possible."""
    a = int(math.isqrt(tokens))
    while tokens % a:
        a -= 1
    return a, tokens // a


def image_grid(tokens: int, config) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of one image that gives `tokens` vision tokens after the spatial merge,
    as near square as the factors of `tokens` allow (1,200 -> 30 x 40 tokens -> (1, 60, 80) patches).
    An image is one temporal patch (the processor repeats it temporal_patch_size times)."""
    vision = _vision_of(config, "image_grid")
    tokens = check_int("tokens", tokens)
    a, b = _near_square(tokens)
    m = vision.spatial_merge_size
    return (1, a * m, b * m)


def video_grid(frames: int, tokens_per_frame: int, config) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of a video of `frames` frames and `tokens_per_frame` vision tokens per
    frame on average: frames are grouped temporal_patch_size at a time (t = frames / tp), each group
    holding tp * tokens_per_frame tokens (16 frames x 90 -> t = 8 groups of 12 x 15 tokens)."""
    vision = _vision_of(config, "video_grid")
    frames = check_int("frames", frames)
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    tp = vision.temporal_patch_size
    if frames % tp:
        raise ValueError(f"frames={frames} must be a multiple of the temporal patch size {tp}")
    a, b = _near_square(tokens_per_frame * tp)
    m = vision.spatial_merge_size
    return (frames // tp, a * m, b * m)


def _vision_of(config, who):
    spec = backbone_spec(config)
    if spec.vision is None:
        raise ValueError(f"{who}: {spec.name} has no vision tower")
    return spec.vision


def _grids(vision, spec: BackboneSpec) -> list[tuple[int, int, int]]:
    """Normalise `vision` (None, an int token count, a (t, h, w) grid, a list of grids, or a [k, 3]
    tensor such as image_grid_thw) to a list of validated patch grids."""
    if hasattr(vision, "tolist"):  # a tensor [3] or [k, 3] (image_grid_thw)
        vision = vision.tolist()
    if vision is None or (isinstance(vision, (list, tuple)) and len(vision) == 0):
        return []
    if spec.vision is None:
        raise ValueError(f"vision={vision!r} given, but {spec.name} is a text-only backbone")
    if isinstance(vision, numbers.Integral) and not isinstance(vision, bool):
        if vision == 0:
            return []
        return [image_grid(int(vision), spec)]
    if not isinstance(vision, (list, tuple)):
        raise ValueError("vision must be None, a token count, a (t, h, w) patch grid or a list of grids; "
                         f"got {vision!r}")
    if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in vision):
        vision = [vision]
    m = spec.vision.spatial_merge_size
    out = []
    for i, g in enumerate(vision):
        if not isinstance(g, (list, tuple)) or len(g) != 3:
            raise ValueError(f"vision grid {i} must be (t, h, w) patches, got {g!r}")
        t, h, w = (check_int(f"vision grid {i} {k}", x) for k, x in zip("thw", g))
        if h % m or w % m:
            raise ValueError(f"vision grid {i} = {tuple(g)}: h and w must be multiples of spatial_merge_size {m}")
        out.append((t, h, w))
    return out


# --------------------------------------------------------------------------------------------------
# The analytic model
# --------------------------------------------------------------------------------------------------


def _tri(x: int) -> int:
    return x * (x + 1) // 2


def _chunks(n: int, size: int) -> list[int]:
    """n split into runs of `size`, the last one partial (Qwen2.5-VL's window partition)."""
    return [size] * (n // size) + ([n % size] if n % size else [])


def vision_flops(config, grids) -> dict:
    """FLOPs of one vision-encoder call over `grids` (as scoring_flops' `vision`), by component:
    vision_patch_embed, vision_linear, vision_attention, vision_merger, vision; vision_patches and
    vision_tokens (after the merge)."""
    spec = backbone_spec(config)
    grids = _grids(grids, spec)
    v = spec.vision
    out = dict(vision_patch_embed=0, vision_linear=0, vision_attention=0, vision_merger=0, vision_patches=0,
               vision_tokens=0)
    if not grids:
        out["vision"] = 0
        return out
    W, I, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    mlp_mats = 3 if v.gated_mlp else 2
    win = v.window_size // v.merged_patch if v.window_size else 0
    n_full = v.num_full_blocks
    for t, h, w in grids:
        patches = t * h * w
        merged = patches // (m * m)
        out["vision_patches"] += patches
        out["vision_tokens"] += merged
        out["vision_patch_embed"] += 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * W
        out["vision_linear"] += v.depth * 2 * patches * (4 * W * W + mlp_mats * W * I)
        full_pairs = t * (h * w) ** 2  # bidirectional attention within each frame (temporal group)
        attn = n_full * full_pairs
        if v.depth > n_full:  # windowed blocks: windows of win x win merged tokens, per frame
            rows = sum(a * a for a in _chunks(h // m, win))
            cols = sum(b * b for b in _chunks(w // m, win))
            attn += (v.depth - n_full) * t * rows * cols * m ** 4
        out["vision_attention"] += 4 * W * attn
        wide = m * m * W
        mergers = 1 + len(v.deepstack_visual_indexes)
        out["vision_merger"] += mergers * 2 * merged * (wide * wide + wide * v.out_hidden_size)
    out["vision"] = out["vision_patch_embed"] + out["vision_linear"] + out["vision_attention"] + out["vision_merger"]
    return out


def _sequences(mode, prefix, responses, sep, score_at):
    """The attention structure of one sample: [(kind, prefix_len, [segment lengths])]: kind 'causal'
    (one causal sequence of prefix + segments) or 'shared' (shared-prefix mask)."""
    n = len(responses)
    tail = sep if score_at == "separator" else 0
    if mode == "single":
        return [("causal", prefix, [r + tail]) for r in responses]
    if mode == "independent":  # each response alone after the prefix: no separators between them
        return [("shared", prefix, [r + tail for r in responses])] if n else []
    segs = [r + sep for r in responses]
    if score_at == "last":
        segs[-1] -= sep
    return [("causal", prefix, segs)] if n else []


def _attention_pairs(structure, convention):
    pairs = 0
    for kind, prefix, segs in structure:
        L = prefix + sum(segs)
        if convention == "dense":
            pairs += L * L
        elif kind == "causal":
            pairs += _tri(L)
        else:
            pairs += _tri(prefix) + sum(r * prefix + _tri(r) for r in segs)
    return pairs


def _check_shape(n, prompt_tokens, response_tokens, separator_tokens, score_at):
    n = check_int("n", n)
    prompt_tokens = check_int("prompt_tokens", prompt_tokens, minimum=0)
    separator_tokens = check_int("separator_tokens", separator_tokens, minimum=0)
    check_choice("score_at", score_at, SCORE_AT)
    if isinstance(response_tokens, (list, tuple)):
        if len(response_tokens) != n:
            raise ValueError(f"response_tokens has {len(response_tokens)} lengths for n={n} responses")
        responses = [check_int(f"response_tokens[{i}]", r) for i, r in enumerate(response_tokens)]
    else:
        responses = [check_int("response_tokens", response_tokens)] * n
    if score_at == "separator" and separator_tokens == 0:
        raise ValueError("score_at='separator' needs separator_tokens >= 1 (the score is read at the separator)")
    return n, prompt_tokens, responses, separator_tokens


def _vision_grids(vision, vision_tokens, spec) -> list[tuple[int, int, int]]:
    """The prompt's patch grids from either vision= (grids or a token count) or vision_tokens=V."""
    if vision_tokens is not None:
        if vision is not None:
            raise ValueError("give the vision input once: vision= (grids or a token count) or vision_tokens=")
        vision = check_int("vision_tokens", vision_tokens, minimum=0)
    return _grids(vision, spec)


def scoring_flops(config, mode: str, n: int, *, prompt_tokens: int, response_tokens, vision=None,
                  vision_tokens: int | None = None, separator_tokens: int = SEPARATOR_TOKENS,
                  score_at: str = "last", convention: str = "dense", head_hidden: int = VALUE_HEAD_HIDDEN) -> dict:
    """FLOPs of scoring one prompt with `n` responses in `mode`, by component.

    config: see backbone_spec (a transformers config, an ARCHITECTURES name, a dict, a BackboneSpec).
    prompt_tokens: prefix tokens other than vision tokens (chat template, question, media delimiters).
    response_tokens: one length for all n responses, or a list of n lengths.
    vision: the prompt's media as patch grids: a (t, h, w) grid, a list of grids, a [k, 3] tensor
      (image_grid_thw / video_grid_thw), or an int V (one image of V merged tokens, grid from
      image_grid). vision_tokens=V is the same as vision=V.
    separator_tokens: tokens of the separator between responses (3 for mrrm's default).
    score_at: "last" (the paper: no separator after the last response, none in `single`) or
      "separator" (every response is followed by its separator).
    convention: "dense" (what FlopCounterMode counts) or "useful" (visible pairs only); see the
      module docstring.
    Returns a dict of exact integers: vision_* (patch_embed, linear, attention, merger; patches,
    tokens, passes), vision, text_linear, text_attention, text, value_head, total, and the token
    counts (text_tokens, sequences, prefix_tokens) plus the arguments.
    """
    check_choice("mode", mode, MODES)
    check_choice("convention", convention, CONVENTIONS)
    spec = backbone_spec(config)
    grids = _vision_grids(vision, vision_tokens, spec)
    n, P, responses, sep = _check_shape(n, prompt_tokens, response_tokens, separator_tokens, score_at)
    head_hidden = check_int("head_hidden", head_hidden)

    one = vision_flops(spec, grids) if spec.vision is not None else {"vision": 0, "vision_tokens": 0}
    passes = n if mode == "single" else 1
    out = {"arch": spec.name, "mode": mode, "convention": convention, "n": n, "prompt_tokens": P,
           "response_tokens": responses, "separator_tokens": sep, "score_at": score_at}
    for k, v in one.items():
        out[k] = v * passes if k not in ("vision_tokens", "vision_patches") else v
    out["vision_passes"] = passes if grids else 0
    prefix = one["vision_tokens"] + P
    structure = _sequences(mode, prefix, responses, sep, score_at)
    tokens = sum(pre + sum(segs) for _, pre, segs in structure)
    t = spec.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    H = t.hidden_size
    q_out = 2 * q if t.attn_output_gate else q  # Qwen3.5's q_proj also produces the output gate
    per_token = 2 * (H * q_out + 2 * H * kv + q * H + 3 * H * t.intermediate_size)  # q, k, v, o; gate, up, down
    out["prefix_tokens"] = prefix
    out["text_tokens"] = tokens
    out["sequences"] = len(structure)
    out["text_linear"] = t.num_full_layers * per_token * tokens + t.num_linear_layers * _linear_layer_per_token(t) * tokens
    out["text_recurrent"] = t.num_linear_layers * _recurrent_mixing(t, structure, tokens, convention)
    out["text_attention"] = t.num_full_layers * 4 * q * _attention_pairs(structure, convention) + out["text_recurrent"]
    out["text"] = out["text_linear"] + out["text_attention"]
    out["value_head"] = 2 * n * (t.hidden_size * head_hidden + head_hidden)
    out["total"] = out["vision"] + out["text"] + out["value_head"]
    return out


def _linear_layer_per_token(t: TextSpec) -> int:
    """Projection and MLP FLOPs of one Gated DeltaNet layer per token: in_proj_qkv, in_proj_z,
    in_proj_a, in_proj_b, out_proj; gate, up, down."""
    H = t.hidden_size
    Kd, Vd = t.linear_num_key_heads * t.linear_key_head_dim, t.linear_num_value_heads * t.linear_value_head_dim
    return 2 * (H * (2 * Kd + Vd) + H * Vd + 2 * H * t.linear_num_value_heads + Vd * H + 3 * H * t.intermediate_size)


def _recurrent_phases(structure) -> list[list[int]]:
    """The segment lengths of each phase mrrm's linear-attention path runs (mrrm.ops.linear_attention):
    the roots (whole causal sequences; prefixes; responses of a shared sequence without prefix),
    then the children (responses started from their prefix's state)."""
    roots, children = [], []
    for kind, prefix, segs in structure:
        if kind == "causal" or (prefix and len(segs) == 1):  # a lone response continues its prefix
            roots.append(prefix + sum(segs))
        elif prefix:
            roots.append(prefix)
            children += segs
        else:
            roots += segs
    return [p for p in (roots, children) if p]


def _recurrent_mixing(t: TextSpec, structure, tokens: int, convention: str) -> int:
    """One Gated DeltaNet layer's conv and delta rule FLOPs (see the module docstring)."""
    HV, dk, dv = t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    conv = 2 * t.linear_conv_kernel * (2 * t.linear_num_key_heads * dk + HV * dv) * tokens
    if convention == "useful":
        return conv + 6 * HV * dk * dv * tokens
    C = DELTA_RULE_CHUNK
    per_chunk = 4 * C * C * dk + 2 * C * C * dv + 6 * C * dk * dv
    delta = sum(len(phase) * -(-max(phase) // C) for phase in _recurrent_phases(structure)) * HV * per_chunk
    return conv + delta


def ratio(config, n: int, *, numerator: str = "single", denominator: str = "joint", **shape) -> float:
    """scoring_flops(numerator)["total"] / scoring_flops(denominator)["total"] for the same shapes
    (keyword arguments as scoring_flops: prompt_tokens, response_tokens, vision, convention, ...).
    The default single/joint ratio is the "N x" claim: it tends to N when the shared prefix
    (vision + prompt) dominates; when the responses dominate it falls to ~1 while the linear layers
    dominate, and below 1 (towards 1/N) once joint's attention across N long responses dominates.
    single/independent with convention="useful" tends to 1 there instead."""
    num = scoring_flops(config, numerator, n, **shape)["total"]
    den = scoring_flops(config, denominator, n, **shape)["total"]
    return num / den


# --------------------------------------------------------------------------------------------------
# The counter: FlopCounterMode on the real modules, meta device, reduced depth
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_ops():
    """mrrm's ops dispatch meta tensors to the pure-torch reference (the only backend meta tensors can
    pass through); pin that choice for the count even if MRRM_OPS names another backend."""
    old = os.environ.get("MRRM_OPS")
    os.environ["MRRM_OPS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MRRM_OPS", None)
        else:
            os.environ["MRRM_OPS"] = old


@dataclass
class _Reduced:
    """A backbone built on the meta device at its real widths, with one block of each kind."""

    model: object
    spec: BackboneSpec
    text_layers_real: int
    text_layer_kinds: list = field(default_factory=list)   # kind of each built text layer (hybrids)
    text_layer_counts: dict = field(default_factory=dict)  # real number of text layers of each kind
    block_kinds: list = field(default_factory=list)   # kind of each built vision block
    block_counts: dict = field(default_factory=dict)  # real number of blocks of each kind
    vision_counts: dict = field(default_factory=dict)  # (grids, copies) -> counted vision FLOPs


_REDUCED_CACHE: dict = {}


def _reduced_backbone(config) -> _Reduced:
    import torch
    from transformers import AutoModel

    from mrrm.model.reward_model import use_mrrm_attention  # torch only for the measured count: the analytic one imports none

    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key in _REDUCED_CACHE:
        return _REDUCED_CACHE[key]
    spec = backbone_spec(config)
    cfg = copy.deepcopy(config)
    # a config taken from a live RewardModel carries mrrm's attention names, which transformers
    # refuses at build time ("flash" in the vision name); build plain, then route through mrrm
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None and hasattr(c, "_attn_implementation_internal"):
            c._attn_implementation_internal = None
    tc = getattr(cfg, "text_config", cfg)
    text_kinds, text_counts = [], {}
    if spec.text.num_linear_layers:  # a hybrid: one layer of each kind, each scaled by its real count
        text_kinds = ["linear_attention", "full_attention"]
        text_counts = {"linear_attention": spec.text.num_linear_layers, "full_attention": spec.text.num_full_layers}
        text_kinds = [k for k in text_kinds if text_counts[k]]
        tc.layer_types = list(text_kinds)
    elif getattr(tc, "layer_types", None) is not None:
        tc.layer_types = list(tc.layer_types[:1])
    tc.num_hidden_layers = max(1, len(text_kinds))
    kinds, counts = [], {}
    v = spec.vision
    if v is not None:
        vc = cfg.vision_config
        if v.family == "qwen2_5_vl":
            n_full = v.num_full_blocks
            counts = {k: c for k, c in (("window", v.depth - n_full), ("full", n_full)) if c}
            kinds = list(counts)
            vc.fullatt_block_indexes = [i for i, k in enumerate(kinds) if k == "full"]
        else:
            ds = len(v.deepstack_visual_indexes)
            kinds = ["full"] * max(1, ds)  # one built block per deepstack merger, so each merger runs once
            counts = {"full": v.depth}
            if v.family == "qwen3_vl":
                vc.deepstack_visual_indexes = list(range(ds))
        vc.depth = len(kinds)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    model.eval()
    if v is not None or getattr(model, "_supports_attention_backend", False):
        use_mrrm_attention(model)
    reduced = _Reduced(model, spec, spec.text.num_layers, text_kinds, text_counts, kinds, counts)
    if len(_REDUCED_CACHE) >= 4:
        _REDUCED_CACHE.pop(next(iter(_REDUCED_CACHE)))
    _REDUCED_CACHE[key] = reduced
    return reduced


def _module_flops(counter, suffix: str) -> tuple[int, int]:
    """(all FLOPs, attention bmm FLOPs) of the module whose FlopCounterMode name ends in `suffix`."""
    import torch

    hits = [(name, ops) for name, ops in counter.get_flop_counts().items() if name.endswith(suffix)]
    if len(hits) != 1:
        raise RuntimeError(f"FlopCounterMode: expected one module named *{suffix}, found {[h[0] for h in hits]}")
    ops = hits[0][1]
    return int(sum(ops.values())), int(ops.get(torch.ops.aten.bmm, 0))


def _global(counter) -> tuple[int, int]:
    """(all FLOPs, attention bmm FLOPs) of the whole count, rotary embeddings left out (`rotary_flops`)."""
    import torch

    ops = counter.get_flop_counts().get("Global", {})
    rotary, rotary_bmm = rotary_flops(counter)
    return int(sum(ops.values())) - rotary, int(ops.get(torch.ops.aten.bmm, 0)) - rotary_bmm


def rotary_flops(counter) -> tuple[int, int]:
    """(all FLOPs, bmm FLOPs) that a FlopCounterMode count holds inside rotary-embedding modules (a
    module whose own name starts with "rotary"). The cost model leaves rotary out (it is element-wise:
    positions times inverse frequencies); transformers 5.15 and older compute those angles as a batched
    matmul, which the counter sees, later versions as a broadcast multiply, which it does not. Taking
    them out of every count makes the count the same on every version."""
    import torch

    total = bmm = 0
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if parts[-1].startswith("rotary") and not any(p.startswith("rotary") for p in parts[:-1]):
            total += int(sum(ops.values()))
            bmm += int(ops.get(torch.ops.aten.bmm, 0))
    return total, bmm


def _count_vision(reduced: _Reduced, grids, copies: int) -> dict:
    """Counted FLOPs of one vision-tower call over `copies` copies of `grids` (what mrrm runs: single
    mode re-encodes the media once per sequence), scaled from the reduced depth to the real one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import vision_utils as vu

    key = (tuple(grids), copies)
    if key in reduced.vision_counts:  # the same call again (joint and independent share it): same count
        return dict(reduced.vision_counts[key])
    v = reduced.spec.vision
    visual = reduced.model.visual
    grid = torch.tensor([g for _ in range(copies) for g in grids], dtype=torch.int64)
    patches = int(grid.prod(-1).sum())
    width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    meta = torch.device("meta")
    # Index inputs are computed on the CPU (they need values) and passed in precomputed, as the
    # vision utilities allow; the cu_seqlens stay on the CPU (mrrm's attention reads them).
    kw = dict(cu_seqlens=vu.get_vision_cu_seqlens(grid),
              position_ids=vu.get_vision_position_ids(grid, v.spatial_merge_size).to(meta))
    if v.family == "qwen2_5_vl":
        window_index, cu_window = vu.get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
        kw.update(window_index=window_index.to(meta), cu_window_seqlens=cu_window)
    if v.family in ("qwen3_vl", "qwen3_5") and hasattr(vu, "get_vision_interpolation_indices_and_weights"):
        idx, wts = vu.get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=v.spatial_merge_size)
        kw.update(interp_indices=idx.to(meta), interp_weights=wts.to(meta))
    elif v.family in ("qwen3_vl", "qwen3_5"):  # transformers 5.10: the bilinear helper, its own names
        idx, wts = vu.get_vision_bilinear_indices_and_weights(grid, visual.num_grid_per_side, v.spatial_merge_size)
        kw.update(bilinear_indices=idx.to(meta), bilinear_weights=wts.to(meta))
    pixels = torch.empty(patches, width, device=meta)
    with reference_ops(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        visual(pixels, grid_thw=grid, **kw)
    total, bmm = _global(counter)
    for i in range(len(reduced.block_kinds)):
        t_i, b_i = _module_flops(counter, f".blocks.{i}")
        total, bmm = total - t_i, bmm - b_i
    for kind, count in reduced.block_counts.items():
        t_i, b_i = _module_flops(counter, f".blocks.{reduced.block_kinds.index(kind)}")
        total, bmm = total + count * t_i, bmm + count * b_i
    reduced.vision_counts[key] = {"vision": total, "vision_attention": bmm}
    return dict(reduced.vision_counts[key])


def count_flops(config, mode: str, n: int, *, prompt_tokens: int, response_tokens, vision=None,
                vision_tokens: int | None = None, separator_tokens: int = SEPARATOR_TOKENS, score_at: str = "last",
                head_hidden: int = VALUE_HEAD_HIDDEN) -> dict:
    """FLOPs of the same scoring pass as scoring_flops, counted by torch.utils.flop_counter.FlopCounterMode.

    The backbone (a transformers config of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, or an ARCHITECTURES
    name) is built on the meta device at its real widths with one text layer and one vision block
    of each kind (windowed / full; one per deepstack merger), its attention routed through mrrm
    (mrrm.model.use_mrrm_attention); the count of a layer is scaled by the real depth (layers of
    one kind are identical). The token layout comes from mrrm.data.packing.pack in `mode`; the vision
    tower runs once per sequence in `single` mode and once otherwise; the value head runs through
    mrrm.ops.gather_value_head on the score positions. Parts are called as mrrm's forward calls
    them: model.visual(...), model.language_model(inputs_embeds=..., mrrm_varlen=...) - the
    placeholder scatter between them (and Qwen3-VL's deepstack additions) are element-wise, 0 FLOPs.
    Attention is charged dense (the "dense" convention of scoring_flops).
    Returns vision, vision_attention, text, text_attention, text_linear, value_head, total.
    """
    check_choice("mode", mode, MODES)
    config = _buildable_config(config)
    spec = backbone_spec(config)
    grids = _vision_grids(vision, vision_tokens, spec)
    n, P, responses, sep = _check_shape(n, prompt_tokens, response_tokens, separator_tokens, score_at)
    if n > 1 and sep == 0:
        raise ValueError("mrrm packing separates responses: separator_tokens must be >= 1 when n > 1")
    head_hidden = check_int("head_hidden", head_hidden)
    reduced = _reduced_backbone(config)
    out = {"vision": 0, "vision_attention": 0}
    if grids:
        out.update(_count_vision(reduced, grids, n if mode == "single" else 1))

    V = vision_flops(spec, grids)["vision_tokens"] if grids else 0
    pb = _synthetic_batch(mode, V + P, responses, sep, score_at)
    hidden, text = _count_text(reduced, pb)
    out.update(text)
    out["value_head"] = _count_value_head(hidden, pb, spec.text.hidden_size, head_hidden)
    out["total"] = out["vision"] + out["text"] + out["value_head"]
    out.update(arch=spec.name, mode=mode, n=n, text_tokens=pb.num_tokens, sequences=pb.num_sequences)
    return out


def _buildable_config(config):
    """The transformers config count_flops builds its model from (an ARCHITECTURES name is built)."""
    if isinstance(config, str):
        config = backbone_config(config)
    if not hasattr(config, "to_dict") or getattr(config, "model_type", None) is None:
        raise ValueError("count_flops needs a transformers config (or an ARCHITECTURES name) to build the model")
    return config


def _synthetic_batch(mode: str, prefix_tokens: int, responses: list[int], sep: int, score_at: str):
    """mrrm's packing of one sample of these lengths in `mode` (token ids are irrelevant to FLOPs)."""
    from mrrm.data.packing import SampleLayout, pack  # torch only for the measured count: the analytic one imports none

    n = len(responses)
    if score_at == "separator":  # every response followed by its separator, alone and joined
        alone = [[1] * r + [2] * sep for r in responses]
        ends = [sum(len(a) for a in alone[:i + 1]) - 1 for i in range(n)]
        layout = SampleLayout(prefix_ids=[0] * prefix_tokens, response_ids=alone, joint_ids=sum(alone, []),
                              joint_score_offsets=ends)
    else:
        layout = SampleLayout(prefix_ids=[0] * prefix_tokens, response_ids=[[1] * r for r in responses],
                              separator_ids=[2] * sep)
    return pack([layout], mode)


def _count_text(reduced: _Reduced, pb):
    """(last hidden state [T, H] on meta, counted text FLOPs) of the language model over the packed
    batch `pb`, the one built layer's count scaled to the real depth."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mrrm.model.reward_model import VarlenMeta  # torch only for the measured count: the analytic one imports none

    meta = torch.device("meta")
    T = pb.num_tokens
    # cu_seqlens stay on the CPU (the reference attention loops over them); segment ids go to meta in
    # every mode so the reference builds its [L, L] masks on meta (masks are 0 FLOPs either way).
    varlen = VarlenMeta(pb.cu_seqlens, pb.max_seqlen, pb.mask, pb.segment_ids.to(meta))
    if reduced.text_layer_kinds:  # the linear layers' plan, from the host copy (mrrm.model.qwen35.plan_for)
        from mrrm.ops.linear_attention import recurrent_plan  # torch only for the measured count: the analytic one imports none

        varlen.recurrent_plan = recurrent_plan(pb.cu_seqlens, pb.mask, pb.segment_ids)
    embeds = torch.empty(1, T, reduced.spec.text.hidden_size, device=meta)
    positions = torch.zeros(3, 1, T, dtype=torch.int64, device=meta)
    lm = reduced.model.language_model if hasattr(reduced.model, "language_model") else reduced.model
    lm_kwargs = _lm_kwargs(reduced.spec, positions)
    with reference_ops(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        hidden = lm(inputs_embeds=embeds, use_cache=False, mrrm_varlen=varlen, **lm_kwargs).last_hidden_state[0]
    text_total, text_bmm = _global(counter)
    kinds = reduced.text_layer_kinds or ["any"]
    counts = reduced.text_layer_counts or {"any": reduced.text_layers_real}
    for i in range(len(kinds)):  # the built layers out, each kind back at its real count
        layer_total, layer_bmm = _module_flops(counter, f".layers.{i}")
        text_total += (counts[kinds[i]] - 1) * layer_total
        text_bmm += (counts[kinds[i]] - 1) * layer_bmm
    out = {"text": text_total, "text_attention": text_bmm}
    out["text_linear"] = out["text"] - out["text_attention"]
    return hidden, out


def _lm_kwargs(spec: BackboneSpec, positions) -> dict:
    """Position ids and mask arguments of the language model call; positions: [3, 1, T] (mrope)."""
    if spec.vision is not None:
        return dict(position_ids=positions, attention_mask=None)
    # A text LM detects packed sequences from its 1-D position ids before asking for a mask, which
    # needs values; hand it the (empty) per-layer-type mask mapping mrrm's mask function would
    # produce anyway (mrrm attention reads the packing from mrrm_varlen, never a mask).
    return dict(position_ids=positions[0], attention_mask={"full_attention": None, "sliding_attention": None})


def _count_value_head(hidden, pb, H: int, head_hidden: int) -> int:
    """Counted FLOPs of mrrm's value head, Linear(H, head_hidden) -> SiLU -> Linear(head_hidden, 1),
    on the score positions of `pb` in `hidden` [T, H]."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mrrm import ops  # torch only for the measured count: the analytic one imports none
    from mrrm.model.parts import build_value_head  # torch only for the measured count: the analytic one imports none

    meta = torch.device("meta")
    with meta:
        head = build_value_head(H, "mlp", head_hidden)
    with reference_ops(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        ops.gather_value_head(hidden, pb.score_positions.to(meta), head[0].weight, head[0].bias, head[2].weight,
                              head[2].bias, scale=1.0 / math.sqrt(H), backend="torch", check_inputs=False)
    return _global(counter)[0]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f}"


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    config = _cli_config(p, a.config)
    try:
        vision = _cli_vision(a, config)
        rows, counted = _cli_flops(a, config, vision)
    except ValueError as e:
        p.error(str(e))
    if a.json:
        print(json.dumps({"analytic": rows, "counted": counted}, indent=2))
        return 0
    _print_table(a, config, vision, rows, counted)
    _print_ratios(rows, counted)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrrm flops", description=(
        "FLOPs of one scoring pass (single / joint / independent) from mrrm's analytic model; "
        "--count also counts them with torch's FlopCounterMode on the meta device."),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc_epilog(__doc__, "What one scoring pass"))
    p.add_argument("--config", default="qwen3_vl_4b",
                   help=f"one of {sorted(ARCHITECTURES)} or a path to a transformers config.json (default qwen3_vl_4b)")
    p.add_argument("--n", type=int, default=4, help="responses per prompt (default 4)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", action="store_true", help="an image prompt of --vision-tokens tokens (default: text)")
    media.add_argument("--video", action="store_true",
                       help="a video prompt of --frames x --tokens-per-frame (default: text)")
    p.add_argument("--vision-tokens", type=int, default=1200,
                   help="--image: vision tokens of the image, after the spatial merge (default 1200)")
    p.add_argument("--frames", type=int, default=16, help="--video: frames (default 16)")
    p.add_argument("--tokens-per-frame", type=int, default=90,
                   help="--video: vision tokens per frame, after the spatial merge (default 90)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prefix tokens besides vision tokens (default 64)")
    p.add_argument("--response-tokens", type=int, default=256, help="tokens of each response (default 256)")
    p.add_argument("--separator-tokens", type=int, default=SEPARATOR_TOKENS,
                   help=f"tokens of the separator between responses (default {SEPARATOR_TOKENS})")
    p.add_argument("--head-hidden", type=int, default=VALUE_HEAD_HIDDEN,
                   help=f"hidden width of the value head (default {VALUE_HEAD_HIDDEN})")
    p.add_argument("--count", action="store_true", help="also count with FlopCounterMode (meta device)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    return p


def _cli_config(p: argparse.ArgumentParser, config: str):
    """--config: an ARCHITECTURES name or a config.json path -> a transformers config."""
    if config in ARCHITECTURES:
        return backbone_config(config)
    if not os.path.exists(config):
        p.error(f"--config {config!r}: not one of {sorted(ARCHITECTURES)} and not a file")
    try:
        with open(config) as f:
            return _transformers_config(json.load(f), config)
    except (ValueError, KeyError, OSError) as e:  # bad JSON, no or unknown model_type, unreadable
        p.error(f"--config {config!r}: not a usable transformers config.json ({type(e).__name__}: {str(e)[:200]})")


def _cli_vision(a: argparse.Namespace, config):
    """The prompt's media as scoring_flops' `vision`: [one image grid], [one video grid] or None."""
    if a.image:
        return [image_grid(a.vision_tokens, config)]
    if a.video:
        return [video_grid(a.frames, a.tokens_per_frame, config)]
    return None


def _cli_flops(a: argparse.Namespace, config, vision):
    """(analytic results {convention: {mode: dict}}, counted results {mode: dict} or None without --count)."""
    shape = dict(prompt_tokens=a.prompt_tokens, response_tokens=a.response_tokens, vision=vision,
                 separator_tokens=a.separator_tokens, head_hidden=a.head_hidden)
    rows = {}
    for conv in CONVENTIONS:
        rows[conv] = {m: scoring_flops(config, m, a.n, convention=conv, **shape) for m in MODES}
    counted = {m: count_flops(config, m, a.n, **shape) for m in MODES} if a.count else None
    return rows, counted


def _print_table(a: argparse.Namespace, config, vision, rows: dict, counted: dict | None) -> None:
    """One line on the shapes, then one row per mode: tokens and FLOPs by component."""
    d = rows["dense"]
    print(f"{backbone_spec(config).name}: N={a.n}, vision grids {vision or 'none'} "
          f"({d['joint']['vision_tokens']} vision tokens), P={a.prompt_tokens}, R={a.response_tokens}")
    head = f"{'mode':<12} {'tokens':>8} {'vision':>13} {'text linear':>13} {'attn dense':>13} {'attn useful':>13} " \
           f"{'total dense':>13} {'total useful':>13}" + (f" {'counted':>13}" if counted else "")
    print(head)
    for m in MODES:
        r, u = d[m], rows["useful"][m]
        line = (f"{m:<12} {r['text_tokens']:>8} {_fmt(r['vision']):>13} {_fmt(r['text_linear']):>13} "
                f"{_fmt(r['text_attention']):>13} {_fmt(u['text_attention']):>13} {_fmt(r['total']):>13} "
                f"{_fmt(u['total']):>13}")
        if counted:
            line += f" {_fmt(counted[m]['total']):>13}"
        print(line)


def _print_ratios(rows: dict, counted: dict | None) -> None:
    """single/joint and single/independent total FLOPs, per convention and counted."""
    for conv in CONVENTIONS:
        r = rows[conv]
        print(f"ratio single/joint ({conv}): {r['single']['total'] / r['joint']['total']:.3f}   "
              f"single/independent ({conv}): {r['single']['total'] / r['independent']['total']:.3f}")
    if counted:
        print(f"ratio single/joint (counted): {counted['single']['total'] / counted['joint']['total']:.3f}   "
              f"single/independent (counted): {counted['single']['total'] / counted['independent']['total']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
