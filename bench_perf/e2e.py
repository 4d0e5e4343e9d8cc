"""End-to-end scoring and training harness shared by the CPU benchmarks (test_latency_cpu.py) and the
GPU comparison (test_e2e_gpu.py).

One prompt (an image or a video plus a short question) with N responses of exactly R tokens each is
scored four ways, on the same weights:
  - single:      mrrm, one sequence per response (the conventional reward model, packed, vision
                 features computed once per sequence)
  - joint:       mrrm, all N responses in one sequence (the paper's method)
  - independent: mrrm, the prompt once, each response sees only the prompt and itself
  - published:   the published code's path: a ...ForConditionalGeneration forward on a right-padded
                 batch of N sequences with output_hidden_states=True and full-vocabulary logits, the
                 value head applied afterwards to the last layer's state at each response's end.
Inputs are encoded once, outside the timing: the timings are model time.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from PIL import Image

from mrrm import ops
from mrrm.data.encoding import SEPARATOR_TEXT, EncodedSample
from mrrm.model import tiny
from mrrm.model.parts import RewardModelConfig
from mrrm.model.reward_model import RewardModel, padded_batch

MODES = ("single", "joint", "independent")
PATHS = MODES + ("published",)

# The CPU model: a small Qwen3-VL-style backbone where compute dominates the Python overhead. The
# vocabulary is sized so the LM head is ~10% of the text tower's FLOPs per token, its share in
# Qwen3-VL-4B (2 * 2560 * 151936 vs 36 * 201,850,880): the published path's logits cost what they
# would cost at scale, proportionally.
CPU_MODEL = dict(hidden_size=512, layers=4, heads=8, kv_heads=4, vision_width=256, vision_depth=4, patch_size=16)
CPU_INTERMEDIATE = 1536
CPU_VOCAB = 2560
CPU_IMAGE = (512, 512)            # patch 16, merge 2 -> 16 x 16 = 256 vision tokens
CPU_VIDEO = (8, 256, 192)         # frames, width, height -> 4 x 8 x 6 = 192 vision tokens


def small_config(tok, family="qwen3_vl", **overrides):
    kw = dict(CPU_MODEL, **overrides)
    cfg = tiny.build_config(family, tokenizer=tok, **kw)
    cfg.text_config.intermediate_size = CPU_INTERMEDIATE if "hidden_size" not in overrides else 3 * kw["hidden_size"]
    cfg.text_config.vocab_size = max(CPU_VOCAB, len(tok))
    cfg.vision_config.num_heads = max(2, kw["vision_width"] // 64)
    return cfg


def real_config(name: str, tok):
    """A published architecture (mrrm.flops.ARCHITECTURES, e.g. "qwen3_vl_4b") at its real widths and
    depth, with the media token ids of mrrm's offline tokenizer (the vocabulary size stays the real
    one, so the published path's logits cost what they cost)."""
    from mrrm.eval import flops

    cfg = flops.backbone_config(name)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIAL_TOKENS}
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    for c in (cfg, cfg.text_config):
        c.pad_token_id, c.bos_token_id = tok.pad_token_id, None
        c.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return cfg


def build_processor(family, tok, *, patch_size, image_pixels, video_pixels):
    return tiny.build_processor(family, tok, patch_size=patch_size, image_pixels=image_pixels,
                                video_pixels=video_pixels)


@dataclasses.dataclass
class Harness:
    model: RewardModel            # mrrm: packed, mrrm attention
    published: torch.nn.Module    # ...ForConditionalGeneration with the same backbone weights, sdpa attention
    device: torch.device
    dtype: torch.dtype


def build_harness(config, tok, processor, *, device="cpu", dtype=torch.float32, head_hidden=1024, seed=0,
                  published=True) -> Harness:
    """The mrrm reward model and (published=True) the published path's model with the same weights."""
    from transformers import AutoModel, AutoModelForImageTextToText

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            backbone = AutoModel.from_config(config, dtype=dtype)
            rm = RewardModel(backbone, tok, processor, RewardModelConfig(value_head_hidden_dim=head_hidden,
                                                                         max_length=1 << 20,
                                                                         max_batch_tokens=1 << 20))
            rm.value_head.to(device=device, dtype=dtype)
            for lin in (rm.value_head[0], rm.value_head[2]):  # a head whose scores differ visibly
                torch.nn.init.normal_(lin.weight, std=0.5 / math.sqrt(lin.in_features))
            pub = None
            if published:
                pcfg = config.__class__.from_dict(config.to_dict())
                pcfg._attn_implementation = "sdpa"
                pub = AutoModelForImageTextToText.from_config(pcfg, dtype=dtype, attn_implementation="sdpa")
                pub.model.load_state_dict(backbone.state_dict())
    rm.eval()
    if pub is not None:
        pub.eval()
    return Harness(rm, pub, device, dtype)


def random_image(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_video(frames, width, height, seed=0) -> list:
    return [random_image((width, height), seed + i) for i in range(frames)]


def make_sample(h: Harness, kind: str, n: int, resp_tokens, *, image_size=CPU_IMAGE, video=CPU_VIDEO,
                prompt_words=16, seed=0) -> EncodedSample:
    """One encoded prompt with N responses of exactly `resp_tokens` tokens each (an int, or one length
    per response), drawn from the ordinary vocabulary (no special tokens)."""
    lens = [resp_tokens] * n if isinstance(resp_tokens, int) else list(resp_tokens)
    if len(lens) != n or min(lens) < 1:
        raise ValueError(f"need {n} positive response lengths, got {resp_tokens!r}")
    if kind not in ("image", "video", "text"):
        raise ValueError(f"kind must be image, video or text, got {kind!r}")
    words = "what colour is the object in the picture and where does it move".split()
    prompt = " ".join(words[i % len(words)] for i in range(prompt_words))
    sample = {"prompt": prompt, "responses": ["x"] * n}
    if kind == "image":
        sample["image"] = random_image(image_size, seed)
    elif kind == "video":
        sample["video"] = random_video(*video, seed=seed)
    enc = h.model.encoder.encode(sample)
    special = set(h.model.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(h.model.tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    resp = [ordinary[torch.randint(len(ordinary), (k,), generator=g)].tolist() for k in lens]
    # responses of exact lengths: the joint turn is them joined by the separator's tokens
    sep = h.model.tokenizer(SEPARATOR_TEXT, add_special_tokens=False)["input_ids"]
    layout = dataclasses.replace(enc.layout, response_ids=resp, separator_ids=sep, joint_ids=None,
                                 joint_score_offsets=None, response_starts=None, joint_starts=None)
    return dataclasses.replace(enc, layout=layout, text=None)


def vision_tokens(enc: EncodedSample, merge=2) -> int:
    grids = [g for g in (enc.image_grid_thw, enc.video_grid_thw) if g is not None]
    return int(sum(int(g.prod(-1).sum()) for g in grids)) // (merge * merge)


def vision_patches(enc: EncodedSample) -> int:
    """Patches the vision encoder sees (before the spatial merge)."""
    grids = [g for g in (enc.image_grid_thw, enc.video_grid_thw) if g is not None]
    return int(sum(int(g.prod(-1).sum()) for g in grids))


def analytic_ratios(h: Harness, enc: EncodedSample, n: int, convention: str = "dense") -> tuple[float, float]:
    """mrrm.flops' single/joint and single/independent FLOPs ratios for exactly the shapes of `enc`."""
    from mrrm.eval import flops

    lens = [len(r) for r in enc.layout.response_ids]
    grids = [g for g in (enc.image_grid_thw, enc.video_grid_thw) if g is not None]
    vision = [tuple(int(x) for x in row) for g in grids for row in g] or None
    cost = {m: flops.scoring_flops(h.model.backbone.config, m, n, prompt_tokens=len(enc.layout.prefix_ids)
                                   - vision_tokens(enc), response_tokens=lens, vision=vision,
                                   separator_tokens=len(enc.layout.separator_ids), convention=convention,
                                   head_hidden=h.model.value_head[0].out_features)["total"]
            for m in MODES}
    return cost["single"] / cost["joint"], cost["single"] / cost["independent"]


def _as_list(enc):
    return list(enc) if isinstance(enc, (list, tuple)) else [enc]


def inputs_for(h: Harness, enc, mode: str):
    """The one micro-batch of `enc` (one EncodedSample or a list: several prompts in one pass) in
    `mode` (ModelInputs on the harness's device)."""
    batches = list(h.model.micro_batches(_as_list(enc), mode, 1 << 30))
    assert len(batches) == 1
    return batches[0].to(h.device, h.dtype)


def published_inputs(h: Harness, enc):
    """The published path's padded batch (from the single-mode packing: one row per response) and the
    (row, col) of each response's score position."""
    inputs = inputs_for(h, enc, "single")
    pad = h.model.tokenizer.pad_token_id or 0
    kwargs, (row, col) = padded_batch(inputs, pad)
    sp = inputs.packed.score_positions.to(row.device)
    return kwargs, (row[sp], col[sp])


def published_scores(h: Harness, kwargs, where) -> torch.Tensor:
    """The published path: full forward with every layer's states and the logits, then the model's
    own value head (same op, activation and scale) on the last layer at each response's end."""
    out = h.published(**kwargs, output_hidden_states=True, use_cache=False)
    last = out.hidden_states[-1]
    rows = (where[0] * last.shape[1] + where[1]).to(torch.int64)
    l1, l2 = h.model.value_head[0], h.model.value_head[2]
    return ops.gather_value_head(last.reshape(-1, last.shape[-1]), rows, l1.weight, l1.bias, l2.weight, l2.bias,
                                 activation=h.model.config.value_head_activation, scale=h.model.head_scale)


def scoring_fn(h: Harness, enc, path: str):
    """A no-argument callable that scores `enc` (one EncodedSample or a list, scored in one pass)
    once along `path` and returns the flat scores."""
    if path == "published":
        if h.published is None:
            raise ValueError("this harness was built without the published path")
        kwargs, where = published_inputs(h, enc)

        def run():
            with torch.no_grad():
                return published_scores(h, kwargs, where)
        return run
    inputs = inputs_for(h, enc, path)

    def run():
        with torch.no_grad():
            return h.model(inputs)
    return run


def synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def count_flops(fn) -> int:
    """FLOPs of one call of fn, counted by FlopCounterMode with mrrm's ops pinned to the pure-torch
    reference (the counter does not see the C++ kernels, and charges CPU SDPA nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mrrm.eval.flops import reference_ops

    with reference_ops(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def median_seconds(fn, device, rounds=5, warmup=1) -> float:
    run = synced(fn, device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# -- training step: packed multi-response vs padded ------------------------------------------------
def train_samples(h: Harness, kind, batch, n, resp_tokens, seed=0, mixed=False):
    """`batch` encoded samples with rankings and ragged response lengths around resp_tokens (+-50%,
    so a padded batch carries real padding). mixed=True draws a preference dataset's mix instead:
    N from 2 to 2n per sample, and every other prompt text-only (no image)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        nb = int(torch.randint(2, 2 * n + 1, (1,), generator=g)) if mixed else n
        kb = ("text" if b % 2 else kind) if mixed else kind
        lens = torch.randint(max(1, resp_tokens // 2), resp_tokens * 3 // 2 + 1, (nb,), generator=g).tolist()
        enc = make_sample(h, kb, nb, lens, seed=seed + b)
        out.append((enc, torch.randperm(nb, generator=g).add(1).tolist()))
    return out


def train_step_fn(model: RewardModel, samples, device, dtype, loss="best"):
    """One forward + backward of the listwise loss over `samples` in one joint micro-batch."""
    from mrrm.train.recipe import listwise_loss

    encs = [e for e, _ in samples]
    ranks = [r for _, r in samples]
    batches = list(model.micro_batches(encs, "joint", 1 << 30))
    assert len(batches) == 1
    inputs = batches[0].to(device, dtype)
    offsets = inputs.packed.group_offsets.to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        scores = model(inputs)
        listwise_loss(scores.float(), offsets, ranks, loss).mean().backward()
    return run, inputs.packed.num_tokens


def padded_token_count(model: RewardModel, samples) -> int:
    """Tokens the padded batch of `samples` processes, padding included (rows x longest row)."""
    batches = list(model.micro_batches([e for e, _ in samples], "joint", 1 << 30))
    lengths = batches[0].packed.cu_seqlens.diff()
    return int(lengths.numel() * lengths.max())


def peak_memory(fn, device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before: CUDA's allocator
    statistics on a GPU; torch's MemTracker (it follows every tensor storage) on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v.get("Total", 0) for dev, v in peak.items() if torch.device(dev).type == "cpu"))


def padded_twin(h: Harness) -> RewardModel:
    """A RewardModel on a copy of the backbone that runs the generic padded path (sdpa attention,
    one right-padded row per sample, an attention mask)."""
    from transformers import AutoModel

    cfg = h.model.backbone.config
    pcfg = cfg.__class__.from_dict(cfg.to_dict())
    with torch.device(h.device):
        bb = AutoModel.from_config(pcfg, dtype=h.dtype, attn_implementation="sdpa")
    bb.load_state_dict(h.model.backbone.state_dict())
    twin = RewardModel(bb, h.model.tokenizer, h.model.processor, h.model.config, value_head=h.model.value_head,
                       packed=False)
    return twin
