"""FLOPs of one scoring pass on the real architectures: FlopCounterMode counts vs mrrm.flops' analytic model.

Architectures (published widths, written out in mrrm.flops.ARCHITECTURES, nothing downloaded):
Qwen2.5-VL-3B and Qwen3-VL-4B (the paper's Molmo2-4B language model is Qwen3-4B, the width and depth
of the Qwen3-VL-4B text tower), and the hybrid Qwen3.5-9B-style model (transformers' Qwen3_5Config
defaults: 24 Gated DeltaNet + 8 full-attention layers; its linear layers' conv and chunked delta
rule are counted as mrrm's torch path runs them, see mrrm.flops). Each is built on the meta device
at its real widths with one text layer of each kind and one vision block of each kind, its attention
routed through mrrm; counts are scaled to the real depth (mrrm.flops.count_flops). The token layout
of each mode is mrrm's own packing.

Cases: an image prompt (1,200 vision tokens: a 60 x 80 patch grid, 30 x 40 tokens) and a video
prompt (16 frames, 90 tokens each: 8 temporal groups of 12 x 15 tokens, 1,440 tokens), P = 64
other prompt tokens, N in {1, 2, 4, 8, 16} responses of R in {64, 256, 1024} tokens, the 3-token
separator, the paper's value head (1024 hidden). MRRM_BENCH_SMALL=1 runs a reduced set.

Each benchmark times the counting (one round) and records in extra_info the counted FLOPs of the
three modes, ratio_measured (counted single / joint), ratio_analytic (mrrm.flops, dense
convention: the one the counter uses), their single / independent twins, and the "useful"
(mask-aware) analytic ratios; the counted and analytic numbers must agree within 2%.
"""
import pytest

from mrrm.eval import flops

from .conftest import SMALL

ARCHS = ["qwen2_5_vl_3b", "qwen3_vl_4b", "qwen3_5_9b"]
PROMPTS = ["image"] if SMALL else ["image", "video"]
NS = [1, 4] if SMALL else [1, 2, 4, 8, 16]
RS = [64] if SMALL else [64, 256, 1024]
PROMPT_TOKENS = 64
IMAGE_TOKENS = 1200
VIDEO_FRAMES, VIDEO_TOKENS_PER_FRAME = 16, 90
TOLERANCE = 0.02


def _vision(arch, prompt):
    if prompt == "image":
        return [flops.image_grid(IMAGE_TOKENS, arch)]
    return [flops.video_grid(VIDEO_FRAMES, VIDEO_TOKENS_PER_FRAME, arch)]


def _count_all(arch, n, shape):
    return {m: flops.count_flops(arch, m, n, **shape) for m in flops.MODES}


@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_flops(benchmark, arch, prompt, n, r):
    shape = dict(prompt_tokens=PROMPT_TOKENS, response_tokens=r, vision=_vision(arch, prompt))
    counted = benchmark.pedantic(_count_all, args=(arch, n, shape), rounds=1, iterations=1, warmup_rounds=0)
    dense = {m: flops.scoring_flops(arch, m, n, **shape) for m in flops.MODES}
    useful = {m: flops.scoring_flops(arch, m, n, convention="useful", **shape) for m in flops.MODES}
    measured = counted["single"]["total"] / counted["joint"]["total"]
    measured_indep = counted["single"]["total"] / counted["independent"]["total"]
    analytic = dense["single"]["total"] / dense["joint"]["total"]
    analytic_indep = dense["single"]["total"] / dense["independent"]["total"]
    benchmark.group = f"scoring FLOPs {arch} {prompt}"
    benchmark.extra_info.update(
        arch=arch, prompt=prompt, N=n, R=r, V=dense["joint"]["vision_tokens"], P=PROMPT_TOKENS,
        vision_grid=list(shape["vision"][0]),
        flops_single=counted["single"]["total"], flops_joint=counted["joint"]["total"],
        flops_independent=counted["independent"]["total"],
        analytic_single=dense["single"]["total"], analytic_joint=dense["joint"]["total"],
        analytic_independent=dense["independent"]["total"],
        ratio_measured=measured, ratio_analytic=analytic,
        ratio_measured_independent=measured_indep, ratio_analytic_independent=analytic_indep,
        ratio_useful=useful["single"]["total"] / useful["joint"]["total"],
        ratio_useful_independent=useful["single"]["total"] / useful["independent"]["total"],
        vision_share_single=dense["single"]["vision"] / dense["single"]["total"],
        attention_share_joint=dense["joint"]["text_attention"] / dense["joint"]["total"],
        convention="counted and analytic ratios: dense attention (full L x L per packed sequence); "
                   "ratio_useful*: visible (causal / shared-prefix) pairs only")
    for m in flops.MODES:
        assert abs(counted[m]["total"] / dense[m]["total"] - 1) < TOLERANCE, (m, counted[m]["total"], dense[m]["total"])
    assert abs(measured / analytic - 1) < TOLERANCE, (measured, analytic)
    assert abs(measured_indep / analytic_indep - 1) < TOLERANCE, (measured_indep, analytic_indep)
    if n == 1:  # one response: the three modes are the same pass
        assert counted["single"]["total"] == counted["joint"]["total"] == counted["independent"]["total"]
