"""Qwen3.5 (hybrid Gated DeltaNet + full attention) on mrrm's packed stream, on a tiny random model.

Oracles: transformers' own eager forward of a separate backbone with the same weights, one
sequence at a time (joint: each sample; single / independent: each prompt + response), and, for the
ops, transformers' token-by-token recurrent delta rule and F.conv1d run per sequence. Independent
mode forks the prefix's conv and recurrent states to every response; the tests check that dropping
either fork is detected.

Also: gradients of the independent loss against the N eager passes', a short LoRA training run
through `mrrm.train.train`, save / load, mrrm.flops' linear-layer FLOPs against FlopCounterMode (exact
integers), and (CUDA with fla installed) the flash-linear-attention backend against the torch one.

Tolerances (fp32, CPU): scores agree to ~3e-7 in practice, asserted at 1e-5 absolute.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import (
    HEAD_DIM,
    TinyFamily,
    frame_list,
    max_abs_diff,
    randomize_head,
    reference_scores,
    rgb_image,
)

import mrrm
from mrrm.data.packing import SampleLayout, pack
from mrrm.model import tiny
from mrrm.model.parts import RewardModelConfig
from mrrm.model.qwen35 import LORA_TARGET
from mrrm.model.reward_model import RewardModel
from mrrm.ops import linear_attention as la
from mrrm.ops._dispatch import fla_available

ATOL = 1e-5


def long_memory(backbone, seed=0):
    """Give every Gated DeltaNet head a slow decay, as trained long-context heads have: the config's
    random init (A in [0.01, 16], dt_bias 1) forgets within two tokens (decay down to e^-20 per
    token), which would leave the recurrent state, and a test of its fork, nearly vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith("linear_attn.A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.3, generator=g).log())
            elif name.endswith("linear_attn.dt_bias"):
                p.zero_()
    return backbone


@pytest.fixture(scope="module")
def fam(tokenizer):
    """A tiny Qwen3.5 of 4 text layers (3 Gated DeltaNet, then full attention, as the released
    models repeat them), long-memory heads; `reference` holds the same weights, transformers' eager path."""
    cfg = tiny.build_config("qwen3_5", tokenizer=tokenizer, layers=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        backbone = long_memory(tiny.build_backbone(cfg))
    model = RewardModel(backbone, tokenizer, tiny.build_processor("qwen3_5", tokenizer),
                        RewardModelConfig(value_head_hidden_dim=HEAD_DIM))
    randomize_head(model.value_head, seed=7)
    ref = tiny.build_backbone(cfg)
    ref.load_state_dict(backbone.state_dict())
    ref.set_attn_implementation("eager")
    return TinyFamily("qwen3_5", cfg, tokenizer, model.processor, model.eval(), ref.eval())


@pytest.fixture(scope="module")
def batch():
    """Images, a frame-list video, an image and a video together, text only; N = 1..5."""
    return [
        {"prompt": "What is shown?", "image": rgb_image(1), "responses": ["a cat", "a dog", "a red car"]},
        {"prompt": "Say hi.", "responses": ["hello there"]},
        {"prompt": "What moves?", "video": frame_list(2, n=4), "responses": ["up", "it moves down", "left",
                                                                            "it stays still"]},
        {"prompt": "Count to three.", "responses": ["one two three", "three", "one", "two", "1 2 3"]},
        {"prompt": "What is in the image and the video?", "image": rgb_image(5), "video": frame_list(6, n=4),
         "responses": ["a tree", "a house near the water"]},
    ]


def assert_close(got, want, atol, what):
    diff = max_abs_diff(got, want)
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:g}\n got  {got}\n want {want}"


# -- the ops --------------------------------------------------------------------------------------

def _layouts():
    g = torch.Generator().manual_seed(0)
    return [SampleLayout(prefix_ids=torch.randint(0, 50, (P,), generator=g).tolist(),
                         response_ids=[torch.randint(0, 50, (r,), generator=g).tolist() for r in rs],
                         separator_ids=[99])
            for P, rs in ((5, [3, 1, 4]), (0, [2, 6]), (2, [1]), (70, [66, 2]))]  # a prefix and a response > 64


def test_recurrent_plan_follows_the_packing():
    layouts = _layouts()
    joint = pack(layouts, "joint")
    plan = la.recurrent_plan(joint.cu_seqlens, "causal")
    assert plan.root_starts.tolist() == joint.cu_seqlens[:-1].tolist() and not plan.has_children
    ind = pack(layouts, "independent")
    plan = la.recurrent_plan(ind.cu_seqlens, "shared_prefix", ind.segment_ids)
    # prefixes of 5, 2 and 70 tokens are roots; the prefix-less sample's responses are roots too
    # (the third sample's lone response continues its prefix: 2 + 1 tokens, nothing forked)
    assert plan.root_lengths.tolist() == [5, 2, 6, 3, 70]
    assert plan.child_lengths.tolist() == [3, 1, 4, 66, 2]
    assert plan.child_parent.tolist() == [0, 0, 0, 4, 4]
    assert plan.child_starts.tolist() == [5, 8, 9, 94, 160]
    assert int(plan.root_lengths.sum() + plan.child_lengths.sum()) == ind.num_tokens == plan.num_tokens

    with pytest.raises(ValueError, match="mask"):
        la.recurrent_plan(ind.cu_seqlens, "bidirectional")
    with pytest.raises(ValueError, match="segment_ids"):
        la.recurrent_plan(ind.cu_seqlens, "shared_prefix")
    with pytest.raises(ValueError, match="entries"):
        la.recurrent_plan(ind.cu_seqlens, "shared_prefix", ind.segment_ids[:-1])
    bad = ind.segment_ids.clone()
    bad[7] = 0
    with pytest.raises(ValueError, match="prefix must come first"):
        la.recurrent_plan(ind.cu_seqlens, "shared_prefix", bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        la.recurrent_plan(torch.tensor([0, 3, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens"):
        la.recurrent_plan([0, 3])


def _random_stream(T, seed=0, H=2, HV=4, K=8, V=8, D=12, W=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(T, H, K), k=r(T, H, K), v=r(T, HV, V), g=-F.softplus(r(T, HV)), beta=torch.sigmoid(r(T, HV)),
                x=r(T, D), weight=r(D, W) * 0.5, bias=r(D) * 0.1)


def _per_sequence_reference(t, idx):
    """Conv (F.conv1d, zero history) and the token-by-token recurrent delta rule on one sequence given
    by stream indices `idx` (transformers' torch_recurrent_gated_delta_rule, unwrapped)."""
    recurrent = la.transformers_torch_function("torch_recurrent_gated_delta_rule")
    x = t["x"][idx].T[None]
    W = t["weight"].shape[1]
    conv = F.silu(F.conv1d(x, t["weight"][:, None], t["bias"], padding=W - 1, groups=x.shape[1])[..., :len(idx)])
    # q/k heads repeated to the value heads here (transformers 5.20 and older do not repeat them inside),
    # and every argument named (5.15 and older give the state arguments no defaults)
    r = t["v"].shape[1] // t["q"].shape[1]
    q, k = (t[n][idx].repeat_interleave(r, dim=1)[None] for n in ("q", "k"))
    out, _ = recurrent(q, k, t["v"][idx][None], g=t["g"][idx][None], beta=t["beta"][idx][None], initial_state=None,
                       output_final_state=False, use_qk_l2norm_in_kernel=True)
    return conv[0].T, out[0]


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_ops_equal_each_sequence_alone_values_and_gradients(mode):
    layouts = _layouts()
    pb = pack(layouts, mode)
    plan = la.recurrent_plan(pb.cu_seqlens, pb.mask, pb.segment_ids)
    t = _random_stream(pb.num_tokens)
    for v in t.values():
        v.requires_grad_(True)
    conv = la.causal_conv1d_varlen(t["x"], t["weight"], t["bias"], plan, backend="torch")
    out = la.gated_delta_rule_varlen(t["q"], t["k"], t["v"], t["g"], t["beta"], plan, backend="torch")
    # the logical sequences: joint = each packed sequence; independent = prefix + response i
    seqs = []
    for s in range(pb.num_sequences):
        a, b = int(pb.cu_seqlens[s]), int(pb.cu_seqlens[s + 1])
        if mode == "joint":
            seqs.append((torch.arange(a, b), torch.ones(b - a, dtype=torch.bool)))
            continue
        seg = pb.segment_ids[a:b]
        prefix = torch.arange(a, b)[seg == 0]
        for i in seg[seg > 0].unique().tolist():
            resp = torch.arange(a, b)[seg == i]
            # the prefix's own outputs count once (with the first response), as the packed pass has them once
            keep = torch.cat([torch.full((len(prefix),), i == 1), torch.ones(len(resp), dtype=torch.bool)])
            seqs.append((torch.cat([prefix, resp]), keep))
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    projc = torch.randn(conv.shape, generator=torch.Generator().manual_seed(2), dtype=conv.dtype)
    want_loss = 0
    seen = torch.zeros(pb.num_tokens, dtype=torch.bool)
    for idx, keep in seqs:
        ref_conv, ref_out = _per_sequence_reference(t, idx)
        # fp32 (transformers' delta rule computes in fp32): chunked vs token by token
        torch.testing.assert_close(conv[idx], ref_conv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[idx], ref_out, rtol=1e-5, atol=2e-6)
        want_loss = want_loss + (ref_out[keep] * proj[idx[keep]]).sum() + (ref_conv[keep] * projc[idx[keep]]).sum()
        seen[idx[keep]] = True
    assert bool(seen.all())
    # gradients: the packed pass (the prefix run once, its state forked) against the per-sequence
    # passes (the prefix copied into each sequence), over the tokens both score
    got_loss = (out * proj).sum() + (conv * projc).sum()
    got = torch.autograd.grad(got_loss, list(t.values()))
    want = torch.autograd.grad(want_loss, list(t.values()))
    for name, a, b in zip(t, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m: f"grad of {name}: {m}")
    if mode == "independent":  # non-vacuous: the responses' loss reaches the prefix only through the fork
        prefix_tokens = pb.segment_ids == 0
        assert got[0][prefix_tokens].abs().sum() > 0 and got[5][prefix_tokens].abs().sum() > 0


def test_ops_validate_their_inputs():
    pb = pack(_layouts(), "joint")
    plan = la.recurrent_plan(pb.cu_seqlens)
    t = _random_stream(pb.num_tokens)
    with pytest.raises(ValueError, match="covers"):
        la.gated_delta_rule_varlen(t["q"][:-1], t["k"][:-1], t["v"][:-1], t["g"][:-1], t["beta"][:-1], plan)
    with pytest.raises(ValueError, match="multiple"):
        la.gated_delta_rule_varlen(t["q"], t["k"], t["v"][:, :3], t["g"][:, :3], t["beta"][:, :3], plan)
    with pytest.raises(ValueError, match="beta"):
        la.gated_delta_rule_varlen(t["q"], t["k"], t["v"], t["g"], t["beta"][:, :1], plan)
    with pytest.raises(ValueError, match="weight"):
        la.causal_conv1d_varlen(t["x"], t["weight"].T, None, plan)
    with pytest.raises(ValueError, match="activation"):
        la.causal_conv1d_varlen(t["x"], t["weight"], None, plan, activation="gelu")
    with pytest.raises(TypeError, match="RecurrentPlan"):
        la.causal_conv1d_varlen(t["x"], t["weight"], None, pb.cu_seqlens)
    with pytest.raises(ValueError, match="unknown backend"):
        la.causal_conv1d_varlen(t["x"], t["weight"], None, plan, backend="tpu")
    with pytest.raises(RuntimeError, match="no 'cuda' backend"):
        la.causal_conv1d_varlen(t["x"], t["weight"], None, plan, backend="cuda")
    with pytest.raises(ValueError, match="no function"):
        la.transformers_torch_function("not_a_function")
    assert la.transformers_torch_function("torch_chunk_gated_delta_rule").__name__ == "torch_chunk_gated_delta_rule"
    if not fla_available():
        with pytest.raises(RuntimeError, match="fla"):
            la.causal_conv1d_varlen(t["x"], t["weight"], None, plan, backend="fla")


# -- the model: joint, independent, single --------------------------------------------------------

def test_packed_joint_equals_eager_transformers(fam, batch, monkeypatch):
    want = [reference_scores(fam, s) for s in batch]
    assert max(max(w) - min(w) for w in want if len(w) > 1) > 100 * ATOL
    masks, linear_calls = [], []
    real_attention, real_rule = mrrm.ops.varlen_attention, la.gated_delta_rule_varlen

    def spy_attention(*args, **kwargs):
        masks.append(kwargs.get("mask"))
        return real_attention(*args, **kwargs)

    def spy_rule(*args, **kwargs):
        linear_calls.append(args[5])
        return real_rule(*args, **kwargs)
    monkeypatch.setattr(mrrm.ops, "varlen_attention", spy_attention)
    monkeypatch.setattr("mrrm.model.qwen35.gated_delta_rule_varlen", spy_rule)
    assert fam.model.packed
    got = fam.model.score(batch)
    assert_close(got, want, ATOL, "joint, one micro-batch")
    # full-attention layers and the vision tower through mrrm's attention; every linear layer packed
    assert set(masks) == {"causal", "bidirectional"}
    n_linear = sum(t == "linear_attention" for t in fam.config.text_config.layer_types)
    assert len(linear_calls) == n_linear and len({id(p) for p in linear_calls}) == 1  # one plan per forward
    assert_close(fam.model.score(batch, max_batch_tokens=1), want, ATOL, "joint, one sample per micro-batch")


def _no_fork(plan):
    """The plan with every child turned into a root (a response restarted from a zero state)."""
    starts = torch.cat([plan.root_starts, plan.child_starts])
    lengths = torch.cat([plan.root_lengths, plan.child_lengths])
    order = torch.argsort(starts)
    empty = torch.zeros(0, dtype=torch.int64)
    return la.RecurrentPlan(starts[order], lengths[order], empty, empty, empty, plan.num_tokens)


def test_independent_equals_single_and_needs_both_forks(fam, batch, monkeypatch):
    model = fam.model
    single = model.score(batch, mode="single")
    # single is each prompt + response alone: the eager forward agrees
    for s, sc in zip(batch[:2], single[:2]):
        for i, r in enumerate(s["responses"]):
            assert_close([[sc[i]]], [reference_scores(fam, dict(s, responses=[r]))], ATOL, "single vs eager")
    ind = model.score(batch, mode="independent")
    assert_close(ind, single, ATOL, "independent vs single")
    joint = model.score(batch)
    assert max_abs_diff(joint, ind) > 100 * ATOL  # joint responses see the earlier ones

    import mrrm.model.qwen35 as q35
    real_conv, real_rule = q35.causal_conv1d_varlen, q35.gated_delta_rule_varlen
    for drop in ("conv", "recurrent", "both"):
        with monkeypatch.context() as m:
            if drop in ("conv", "both"):
                m.setattr(q35, "causal_conv1d_varlen", lambda x, w, b, plan, **kw: real_conv(x, w, b, _no_fork(plan), **kw))
            if drop in ("recurrent", "both"):
                m.setattr(q35, "gated_delta_rule_varlen",
                          lambda q, k, v, g, beta, plan, **kw: real_rule(q, k, v, g, beta, _no_fork(plan), **kw))
            broken = model.score(batch, mode="independent")
        assert max_abs_diff(broken, single) > 100 * ATOL, f"dropping the {drop} fork went unnoticed"


def test_independent_gradients_equal_the_single_passes(fam, batch):
    """d(listwise loss)/d(every weight): one independent pass through mrrm against N eager
    transformers passes of prompt + response (the same loss over the same scores)."""
    model, ref = fam.model, fam.reference
    samples = [batch[0], batch[2], batch[3]]  # image, video, text
    targets = [1, 3, 0]
    (inputs,) = list(model.micro_batches([model.encoder.encode(s, i) for i, s in enumerate(samples)],
                                         "independent", None))
    model.zero_grad(set_to_none=True)
    scores = model(inputs)
    offs = inputs.packed.group_offsets
    loss = mrrm.ops.listwise_ce(scores, offs, torch.tensor(targets))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}

    ref.zero_grad(set_to_none=True)
    ref_scores = []
    for i, s in enumerate(samples):
        enc = model.encoder.encode(s, i)
        for r in enc.layout.response_ids:
            ids = torch.tensor([list(enc.layout.prefix_ids) + list(r)])
            kw = dict(enc.media)
            if kw:
                kw["mm_token_type_ids"] = model.encoder.token_types(ids)
            h = ref(input_ids=ids, use_cache=False, **kw).last_hidden_state[0, -1]
            ref_scores.append(model.value_head(h).squeeze(-1) / math.sqrt(h.shape[-1]))
    ref_loss = mrrm.ops.listwise_ce(torch.stack(ref_scores), offs, torch.tensor(targets))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and any(".linear_attn." in n for n in got) and any("visual." in n for n in got)
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_linear_layer_refuses_calls_without_packing(fam):
    from mrrm.model.qwen35 import MrrmGatedDeltaNet, use_mrrm_linear_attention

    layer = next(m for m in fam.model.backbone.modules() if isinstance(m, MrrmGatedDeltaNet))
    with pytest.raises(RuntimeError, match="mrrm_varlen"):
        layer(torch.zeros(1, 3, fam.config.text_config.hidden_size))
    with pytest.raises(ValueError, match="Gated DeltaNet"):
        use_mrrm_linear_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2 layers"):
        tiny.build_config("qwen3_5", tokenizer=fam.tokenizer, layers=1)


def test_save_load_round_trip(fam, batch, tmp_path):
    want = {m: fam.model.score(batch[:3], mode=m) for m in ("joint", "independent")}
    fam.model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = RewardModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.packed and type(loaded.backbone).__name__ == "Qwen3_5Model"
    for m, w in want.items():
        assert_close(loaded.score(batch[:3], mode=m), w, 1e-6, f"reload {m}")


# -- training through the public entry point -----------------------------------------------------

def test_training_independent_with_lora_lowers_the_loss(tmp_path, tokenizer):
    from mrrm.train.recipe import TrainConfig, build_model, train

    base = str(tmp_path / "base")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        long_memory(tiny.build_backbone(tiny.build_config("qwen3_5", tokenizer=tokenizer))).save_pretrained(base)
    tiny.build_processor("qwen3_5", tokenizer).save_pretrained(base)
    colours = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30)}
    rows = []
    for i in range(16):
        c = list(colours)[i % 4]
        from PIL import Image
        Image.new("RGB", (32, 32), colours[c]).save(tmp_path / f"im{i}.png")
        resp = list(colours)[i % 3:] + list(colours)[:i % 3]
        rows.append({"prompt": "What colour is the image?", "image": f"im{i}.png", "responses": resp,
                     "rankings": [1 if r == c else 2 for r in resp]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # lora_target left at mrrm.train's default: on Qwen3.5 it becomes LORA_TARGET (the linear layers too)
    cfg = TrainConfig(base_model=base, data=[str(data)], mode="independent", lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, head_hidden=32, batch_size=8, max_steps=20,
                      lr=1e-2, warmup_steps=0, schedule="constant", log_every=1, output_dir=str(tmp_path / "out"))
    built = build_model(cfg)
    assert built.backbone.peft_config["default"].target_modules == LORA_TARGET
    lora_names = [n for n, _ in built.named_parameters() if "lora_A" in n]
    assert any(".linear_attn.in_proj_qkv." in n for n in lora_names) and any(".self_attn.q_proj." in n
                                                                            for n in lora_names)
    train(cfg)
    log = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "log.jsonl")) if '"loss"' in line]
    losses = [r["loss"] for r in log if "step" in r and "acc" in r]
    assert len(losses) >= 20, log
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


# -- FLOPs: the analytic model of the linear layers against FlopCounterMode --------------------------

@pytest.mark.parametrize("kind", ["image", "video"])
def test_flops_analytic_equals_counter_on_the_tiny_model(fam, kind, monkeypatch):
    """mrrm.flops on the real tiny Qwen3.5 (every layer, a real image or video, mrrm's packing and
    forward, the CPU linear-attention path) and on its meta-device reduced copy: exact integers."""
    from flops_counting import SAMPLES, _count_real, _separated, _shape_of

    from mrrm.eval.flops import count_flops, scoring_flops

    model = fam.model
    enc = _separated(model, model.encoder.encode(SAMPLES[kind], 0))
    shape = _shape_of(model, enc)
    n = len(shape["response_tokens"])
    spec = mrrm.flops.backbone_spec(model.backbone.config)
    assert spec.text.num_linear_layers == 3 and spec.text.num_full_layers == 1 and spec.text.attn_output_gate
    for mode in mrrm.flops.MODES:
        real = _count_real(model, enc, mode, monkeypatch)
        analytic = scoring_flops(model.backbone.config, mode, n, **shape)
        assert analytic["text_tokens"] == real["tokens"] and analytic["sequences"] == real["sequences"]
        assert analytic["vision"] == real["vision"], (mode, analytic["vision"], real["vision"])
        assert analytic["total"] == real["total"], (mode, analytic["total"], real["total"])
        assert analytic["text_recurrent"] > 0
        meta = count_flops(model.backbone.config, mode, n, **shape)
        for key in ("vision", "vision_attention", "text", "text_attention", "text_linear", "value_head", "total"):
            assert meta[key] == analytic[key], (mode, key, meta[key], analytic[key])


def test_flops_of_the_linear_layers():
    from mrrm.eval.flops import backbone_spec, scoring_flops

    spec = backbone_spec("qwen3_5_9b")
    t = spec.text
    assert (t.num_layers, t.num_linear_layers, t.linear_num_key_heads, t.linear_num_value_heads,
            t.linear_key_head_dim, t.linear_conv_kernel) == (32, 24, 16, 32, 128, 4)
    assert spec.vision.family == "qwen3_5" and spec.vision.deepstack_visual_indexes == ()
    # the recurrence's useful work is linear in the tokens: 6 * HV * dk * dv + the conv, per layer and token
    shape = dict(prompt_tokens=100, response_tokens=50)
    per_token = 24 * (6 * 32 * 128 * 128 + 2 * 4 * (2 * 16 * 128 + 32 * 128))
    for mode, tokens in (("joint", 100 + 4 * 50 + 3 * 3), ("independent", 100 + 4 * 50), ("single", 4 * 150)):
        got = scoring_flops("qwen3_5_9b", mode, 4, convention="useful", **shape)
        assert got["text_tokens"] == tokens and got["text_recurrent"] == per_token * tokens
    # independent runs the prefix once and forks its state: with a long shared prefix it costs about
    # a single pass, and single costs about N of them
    long = dict(prompt_tokens=4000, response_tokens=64)
    ind = scoring_flops("qwen3_5_9b", "independent", 8, **long)["text_recurrent"]
    single = scoring_flops("qwen3_5_9b", "single", 8, **long)["text_recurrent"]
    assert 6 < single / ind < 8
    with pytest.raises(ValueError, match="linear_conv_kernel_dim"):
        backbone_spec({"model_type": "qwen3_5", "text_config": {
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "layer_types": ["linear_attention", "full_attention"], "linear_conv_kernel_dim": None}})


# -- the flash-linear-attention path (CUDA) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fla's Triton kernels; on the CPU "
                    "only in the interpreter with local patches: scripts/check_fla_interpreter.py)")
def test_fla_backend_matches_torch_values_and_gradients():
    if not fla_available():
        pytest.skip("flash-linear-attention is not installed (pip install 'mrrm[fla]')")
    pb = pack(_layouts(), "independent")
    plan = la.recurrent_plan(pb.cu_seqlens.cuda(), pb.mask, pb.segment_ids.cuda())  # the plan itself: host
    t = {k: v.cuda() for k, v in _random_stream(pb.num_tokens).items()}
    grads = {}
    for backend in ("torch", "fla"):
        xs = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        conv = la.causal_conv1d_varlen(xs["x"], xs["weight"], xs["bias"], plan, backend=backend)
        out = la.gated_delta_rule_varlen(xs["q"], xs["k"], xs["v"], xs["g"], xs["beta"], plan, backend=backend)
        (out.square().sum() + conv.sin().sum()).backward()
        grads[backend] = (conv.detach(), out.detach(), {k: v.grad for k, v in xs.items()})
    (ct, ot, gt), (cf, of, gf) = grads["torch"], grads["fla"]
    # Triton's fp32 dots may use TF32 on the GPU: looser than the CPU comparisons
    torch.testing.assert_close(cf, ct, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(of, ot, rtol=1e-3, atol=1e-3)
    for k in gt:
        torch.testing.assert_close(gf[k], gt[k], rtol=1e-2, atol=1e-2, msg=lambda m: f"grad of {k}: {m}")
