"""mrrm.flops: the analytic cost model against FlopCounterMode, its inputs, and its limits.

The oracle is torch.utils.flop_counter.FlopCounterMode on the REAL tiny reward models (every layer,
real CPU tensors, a real image or video through the processor, mrrm's packing and forward) with the
ops pinned to the pure-torch reference (torch's CPU flash kernel behind SDPA is counted as 0, the
reference's matmuls are counted). The analytic model must agree exactly (integers), and so must
mrrm.flops.count_flops, which counts a reduced-depth copy on the meta device and scales it.
"""
from __future__ import annotations

import pytest
import torch
from flops_counting import SAMPLES, _count_real, _separated, _shape_of
from torch.utils.flop_counter import FlopCounterMode

from mrrm.eval import flops
from mrrm.eval.flops import backbone_spec, count_flops, image_grid, ratio, scoring_flops, video_grid
from mrrm.model.tiny import QWEN_FAMILIES


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", QWEN_FAMILIES)  # mrrm.flops models the Qwen-VL towers
def test_analytic_equals_counter_on_full_tiny_model(families, family, kind, monkeypatch):
    fam = families(family)
    model = fam.model
    enc = _separated(model, model.encoder.encode(SAMPLES[kind], 0))
    shape = _shape_of(model, enc)
    n = len(shape["response_tokens"])
    for mode in flops.MODES:
        real = _count_real(model, enc, mode, monkeypatch)
        analytic = scoring_flops(model.backbone.config, mode, n, **shape)
        assert analytic["text_tokens"] == real["tokens"] and analytic["sequences"] == real["sequences"]
        assert analytic["vision"] == real["vision"], (mode, analytic["vision"], real["vision"])
        assert analytic["total"] == real["total"], (mode, analytic["total"], real["total"])
        meta = count_flops(model.backbone.config, mode, n, **shape)  # reduced depth on meta, scaled
        for key in ("vision", "vision_attention", "text", "text_attention", "text_linear", "value_head", "total"):
            assert meta[key] == analytic[key], (mode, key, meta[key], analytic[key])
    # the vision tower runs once per sequence in single mode, once otherwise
    one = scoring_flops(model.backbone.config, "joint", n, **shape)["vision"]
    assert scoring_flops(model.backbone.config, "single", n, **shape)["vision"] == n * one > 0


def test_independent_useful_counts_only_visible_pairs():
    """The useful convention counts the shared-prefix mask's visible pairs: checked against the mask
    mrrm.ops.oracle builds for the packed stream."""
    from mrrm.data.packing import SampleLayout, pack
    from mrrm.ops.oracle import attention_mask_dense

    cfg = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128}
    resp = [3, 5, 2]
    for mode in flops.MODES:
        pb = pack([SampleLayout([0] * 7, [[1] * r for r in resp], [2, 2])], mode)
        visible = 0
        bounds = pb.cu_seqlens.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            visible += int(attention_mask_dense(lo, hi, pb.mask, pb.segment_ids).sum())
        got = scoring_flops(cfg, mode, 3, prompt_tokens=7, response_tokens=resp, separator_tokens=2,
                            convention="useful")["text_attention"]
        assert got == 4 * 64 * visible, (mode, got, visible)
        dense = scoring_flops(cfg, mode, 3, prompt_tokens=7, response_tokens=resp, separator_tokens=2)
        assert dense["text_attention"] == 4 * 64 * sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("grid", [(1, 60, 80), (1, 62, 46), (8, 24, 30), (3, 8, 14), (1, 16, 16)])
def test_window_partition_matches_transformers(grid):
    """Qwen2.5-VL's windowed attention: sum of squared window sizes from the analytic partition equals
    the one transformers' get_vision_window_index produces."""
    from transformers.vision_utils import get_vision_window_index

    spec = backbone_spec("qwen2_5_vl_3b")
    v = spec.vision
    _, cu = get_vision_window_index(torch.tensor([grid]), v.spatial_merge_size, v.window_size, v.patch_size)
    sizes = (cu[1:] - cu[:-1]).tolist()
    want = sum(s * s for s in sizes)
    attention = flops.vision_flops(spec, [grid])["vision_attention"]
    t, h, w = grid
    full = v.num_full_blocks * t * (h * w) ** 2
    assert attention == 4 * v.hidden_size * (full + (v.depth - v.num_full_blocks) * want)


def test_named_architectures():
    q3 = backbone_spec("qwen3_vl_4b")
    assert (q3.text.hidden_size, q3.text.num_layers, q3.text.num_heads, q3.text.num_kv_heads, q3.text.head_dim,
            q3.text.intermediate_size) == (2560, 36, 32, 8, 128, 9728)
    assert (q3.vision.depth, q3.vision.hidden_size, q3.vision.intermediate_size, q3.vision.num_heads,
            q3.vision.patch_size, q3.vision.out_hidden_size, q3.vision.deepstack_visual_indexes) == \
        (24, 1024, 4096, 16, 16, 2560, (5, 11, 17))
    q25 = backbone_spec(flops.backbone_config("qwen2_5_vl_3b"))
    assert (q25.text.hidden_size, q25.text.num_layers, q25.text.num_heads, q25.text.num_kv_heads,
            q25.text.intermediate_size) == (2048, 36, 16, 2, 11008)
    assert (q25.vision.depth, q25.vision.hidden_size, q25.vision.intermediate_size, q25.vision.window_size,
            q25.vision.fullatt_block_indexes, q25.vision.out_hidden_size, q25.vision.num_full_blocks) == \
        (32, 1280, 3420, 112, (7, 15, 23, 31), 2048, 4)
    # one Qwen3-VL-4B text layer on an L-token sequence, as measured with FlopCounterMode on the meta
    # device: 201,850,880 * L + 16,384 * L^2
    widths = {"hidden_size": 2560, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 9728}
    for L in (1, 777, 4096):
        got = scoring_flops(widths, "joint", 1, prompt_tokens=L - 1, response_tokens=1, head_hidden=1)
        assert got["text"] == 201_850_880 * L + 16_384 * L * L
    assert image_grid(1200, "qwen3_vl_4b") == (1, 60, 80)
    assert image_grid(1200, "qwen2_5_vl_3b") == (1, 60, 80)
    assert video_grid(16, 90, "qwen3_vl_4b") == (8, 24, 30)
    assert scoring_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=10, response_tokens=5,
                         vision=video_grid(16, 90, "qwen3_vl_4b"))["vision_tokens"] == 1440
    # vision_tokens=V is one image of V tokens
    a = scoring_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=10, response_tokens=5, vision_tokens=1200)
    b = scoring_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=10, response_tokens=5, vision=[(1, 60, 80)])
    assert a["total"] == b["total"]
    # an image_grid_thw tensor works as the vision input; an empty one is no media
    c = scoring_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=10, response_tokens=5, vision=torch.tensor([[1, 60, 80]]))
    assert c["total"] == a["total"]
    d = scoring_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=10, response_tokens=5,
                      vision=torch.empty(0, 3, dtype=torch.int64))
    assert d["vision"] == 0 and d["prefix_tokens"] == 10


@pytest.mark.parametrize("arch", sorted(flops.ARCHITECTURES))
def test_count_flops_real_width_matches_analytic(arch):
    """The meta-device count at the real widths (reduced depth, scaled) on a small image case."""
    shape = dict(prompt_tokens=40, response_tokens=[16, 9], vision=[(1, 16, 24)])
    for mode in flops.MODES:
        counted = count_flops(arch, mode, 2, **shape)
        analytic = scoring_flops(arch, mode, 2, **shape)
        assert counted["total"] == analytic["total"], (arch, mode)


def test_ratio_limits():
    """single/joint -> N when the shared prefix dominates; with long responses the text linear part
    tends to 1, single/independent (useful) tends to 1, and dense single/joint falls to ~1/N
    (joint attention over N responses grows with N^2)."""
    arch = "qwen3_vl_4b"
    for n in (2, 4, 16):
        big_prefix = dict(prompt_tokens=200_000, response_tokens=1, vision=[(1, 60, 80)])
        for conv in flops.CONVENTIONS:
            for den in ("joint", "independent"):
                r = ratio(arch, n, denominator=den, convention=conv, **big_prefix)
                assert n * 0.99 < r <= n, (n, conv, den, r)
        long = dict(prompt_tokens=0, response_tokens=1_000_000, separator_tokens=3)
        ru = ratio(arch, n, denominator="independent", convention="useful", **long)
        assert 0.99 < ru <= 1.0, (n, ru)
        single = scoring_flops(arch, "single", n, **long)
        joint = scoring_flops(arch, "joint", n, **long)
        assert 0.99 < single["text_linear"] / joint["text_linear"] <= 1.0
        rd = ratio(arch, n, **long)
        assert abs(rd * n - 1) < 0.02, (n, rd)
        # nothing to share (no image, no prompt): joint costs a little MORE than single (separator
        # tokens, attention across responses), ratio just under 1
        short = ratio(arch, n, prompt_tokens=0, response_tokens=64)
        assert 0.8 < short < 1.0, (n, short)
    # ratio is monotone in the prefix: more shared work, more savings
    rs = [ratio(arch, 8, prompt_tokens=p, response_tokens=256) for p in (0, 500, 5_000, 50_000)]
    assert rs == sorted(rs)
    # N = 1: all three modes are the same pass
    one = {m: scoring_flops(arch, m, 1, prompt_tokens=50, response_tokens=30, vision=1200)["total"] for m in flops.MODES}
    assert len(set(one.values())) == 1


def test_score_at_separator_adds_separators():
    cfg = "qwen2_5_vl_3b"
    last = scoring_flops(cfg, "joint", 3, prompt_tokens=5, response_tokens=4, separator_tokens=3)
    sep = scoring_flops(cfg, "joint", 3, prompt_tokens=5, response_tokens=4, separator_tokens=3, score_at="separator")
    assert (last["text_tokens"], sep["text_tokens"]) == (5 + 12 + 6, 5 + 12 + 9)
    single = scoring_flops(cfg, "single", 3, prompt_tokens=5, response_tokens=4, score_at="separator")
    assert single["text_tokens"] == 3 * (5 + 4 + 3)
    # independent: every response alone after the prefix, no separators between them
    ind = scoring_flops(cfg, "independent", 3, prompt_tokens=5, response_tokens=4, separator_tokens=3)
    assert ind["text_tokens"] == 5 + 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="both"), "mode must be one of"),
    (dict(n=0), "n must be an int >= 1"),
    (dict(n=True), "n must be an int"),
    (dict(n=2.0), "n must be an int"),
    (dict(response_tokens=[4, 5]), "2 lengths for n=3"),
    (dict(response_tokens=[4, 0, 5]), r"response_tokens\[1\] must be an int >= 1"),
    (dict(response_tokens="long"), "response_tokens must be an int"),
    (dict(prompt_tokens=-1), "prompt_tokens must be an int >= 0"),
    (dict(separator_tokens=-3), "separator_tokens must be an int >= 0"),
    (dict(convention="half"), "convention must be one of"),
    (dict(score_at="middle"), "score_at must be one of"),
    (dict(score_at="separator", separator_tokens=0), "needs separator_tokens >= 1"),
    (dict(vision=[(1, 61, 80)]), "multiples of spatial_merge_size"),
    (dict(vision=[(1, 60)]), r"must be \(t, h, w\)"),
    (dict(vision="cat.png"), "vision must be None"),
    (dict(vision=(1, 60, 80), vision_tokens=1200), "give the vision input once"),
    (dict(head_hidden=0), "head_hidden must be an int >= 1"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(config="qwen3_vl_4b", mode="joint", n=3, prompt_tokens=10, response_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scoring_flops(args.pop("config"), args.pop("mode"), args.pop("n"), **args)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown architecture 'qwen9'"):
        scoring_flops("qwen9", "joint", 2, prompt_tokens=1, response_tokens=1)
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        backbone_spec({"hidden_size": 64, "layers": 2})
    with pytest.raises(ValueError, match="has no 'intermediate_size'"):
        backbone_spec({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        backbone_spec({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 3, "intermediate_size": 8})
    with pytest.raises(ValueError, match="text-only backbone"):
        scoring_flops({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8},
                      "joint", 2, prompt_tokens=1, response_tokens=1, vision=16)
    with pytest.raises(ValueError, match="must be a transformers config"):
        backbone_spec(3.5)
    with pytest.raises(ValueError, match="frames=15 must be a multiple"):
        video_grid(15, 90, "qwen3_vl_4b")
    with pytest.raises(ValueError, match="count_flops needs a transformers config"):
        count_flops({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8},
                    "joint", 2, prompt_tokens=1, response_tokens=1)
    with pytest.raises(ValueError, match="separator_tokens must be >= 1 when n > 1"):
        count_flops("qwen3_vl_4b", "joint", 2, prompt_tokens=1, response_tokens=1, separator_tokens=0)
    from transformers import Qwen2MoeConfig

    with pytest.raises(ValueError, match="mixture-of-experts"):
        backbone_spec(Qwen2MoeConfig(num_hidden_layers=1))


def test_text_only_config_object():
    """A dense text LM config (e.g. Qwen3Config) works as a backbone without a vision tower."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=96, vocab_size=100)
    for mode in flops.MODES:
        a = scoring_flops(cfg, mode, 3, prompt_tokens=20, response_tokens=[3, 4, 5], head_hidden=8)
        c = count_flops(cfg, mode, 3, prompt_tokens=20, response_tokens=[3, 4, 5], head_hidden=8)
        assert a["vision"] == 0 and a["total"] == c["total"], (mode, a["total"], c["total"])


def test_cli_prints_the_table(capsys):
    assert flops.main(["--config", "qwen3_vl_4b", "--n", "4", "--image"]) == 0
    out = capsys.readouterr().out
    assert "1200 vision tokens" in out
    for mode in flops.MODES:
        assert mode in out
    r = ratio("qwen3_vl_4b", 4, prompt_tokens=64, response_tokens=256, vision=[(1, 60, 80)])
    assert f"ratio single/joint (dense): {r:.3f}" in out
    with pytest.raises(SystemExit):
        flops.main(["--config", "nope"])
    with pytest.raises(SystemExit):
        flops.main(["--config", "qwen3_vl_4b", "--video", "--frames", "15"])


@pytest.mark.parametrize("content", ["{not json", '{"hidden_size": 8}', '{"model_type": "no_such_model"}'])
def test_cli_bad_config_file_is_a_usage_error(tmp_path, capsys, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        flops.main(["--config", str(path)])
    assert e.value.code == 2
    assert "not a usable transformers config.json" in capsys.readouterr().err


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_compiled_ops_are_counted_as_their_reference():
    """FlopCounterMode cannot see inside mrrm's custom ops (the CPU and Triton backends); their registered
    formulas count what the pure-torch reference's matmuls count, so a count over the path a run takes
    (the CPU default here) is whole: attention as every sequence's full square (the dense convention),
    the value head's two matmuls on the M rows. Backwards: attention 2.5x its forward (torch's count for
    SDPA: the scores recomputed), the head 2 * M * (2HD + 2D) with the hidden gradient."""
    from mrrm import ops

    torch.manual_seed(0)
    T, Hq, Hkv, D, cu = 40, 4, 2, 8, torch.tensor([0, 7, 25, 40], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, D) for h in (Hq, Hkv, Hkv))
    square = 4 * Hq * D * (7 ** 2 + 18 ** 2 + 15 ** 2)
    for mask in ("causal", "bidirectional"):
        counts = {b: _counted(lambda: ops.varlen_attention(q, k, v, cu, mask=mask, backend=b)) for b in ("torch", "cpu")}
        assert counts == {"torch": square, "cpu": square}, (mask, counts)
    qg = q.clone().requires_grad_()
    assert _counted(lambda: ops.varlen_attention(qg, k, v, cu, backend="cpu").sum().backward()) == square * 7 // 2

    M, H, Dh = 5, 16, 12
    hidden, positions = torch.randn(T, H), torch.tensor([3, 9, 9, 20, 39])
    w1, b1, w2, b2 = torch.randn(Dh, H), torch.randn(Dh), torch.randn(1, Dh), torch.randn(1)
    head = 2 * M * (H * Dh + Dh)
    for b in ("torch", "cpu"):
        assert _counted(lambda: ops.gather_value_head(hidden, positions, w1, b1, w2, b2, backend=b)) == head, b
    hg = hidden.clone().requires_grad_()
    fwd_bwd = _counted(lambda: ops.gather_value_head(hg, positions, w1, b1, w2, b2, backend="cpu").sum().backward())
    assert fwd_bwd == head + 2 * M * (2 * H * Dh + 2 * Dh)
