"""Golden fixtures from the authors' code (github yinuoyang01/multi-response-rm), run on tiny models.

    git clone https://github.com/yinuoyang01/multi-response-rm /tmp/ref/multi-response-rm
    pip install --target /tmp/ref/site molmo_utils --no-deps
    python scripts/reference_fixtures.py --reference-repo /tmp/ref/multi-response-rm --extra-path /tmp/ref/site \
        --out tests/fixtures/reference

This script drives THEIR code (imported from --reference-repo, never copied here): their
`add_resp_sep_token`, `MultiResponseRewardModel`, `save_checkpoint` and
`collate_multi_response_reward`, with the library calls their `train.py` / `merge_lora.py` make in
between (AutoModelForImageTextToText, resize_token_embeddings, get_peft_model, PeftModel,
merge_and_unload); the resized <|resp_sep|> row is set to its expected value
(`resize_like_their_code`). It writes under --out:

- bases/<family>/             a tiny random base model (ForConditionalGeneration, fp32) and its processor,
                              the tokenizer WITHOUT <|resp_sep|>, as a real base checkpoint is;
- checkpoints/<name>/         each checkpoint exactly as their code saved it (adapter at the root, or a
                              merged model), LoRA and value-head weights randomised as if trained;
- images/*.png                the images of the image samples;
- mrrm/<name>/                 mrrm checkpoints (mrrm's own layout) whose `save_pretrained(...,
                              layout="reference")` output was scored by their code here: the other
                              direction;
- golden.json                 per checkpoint and sample: the token ids, response end / start indices
                              and scores their collate + forward produce, one sample per batch, fp32.

Two shims make their code (written for transformers 4.57 and remote-code Molmo2) run on
transformers 5.x with native models: `tokenizer.additional_special_tokens` (gone in 5.x) reads and
writes `extra_special_tokens`, and a processor's `audio_tokenizer = None` placeholder (which their
save_checkpoint adds) is dropped before `save_pretrained`. Their merge_lora.py resizes Molmo2's
remote-code `Molmo2Embedding` by hand and fails on native models, so merged checkpoints are made
with the same library calls it makes (load base, add the separator, resize, merge, save model +
value head + config + processor) and scored through their README's inference path.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

FAMILY_VARIANTS = {
    # name: (family, value_head_type, value_head_hidden_dim, activation, resp_repr_mode)
    "qwen2_vl_mlp_silu_last": ("qwen2_vl", "mlp", 24, "silu", "last"),
    "qwen2_vl_linear_default": ("qwen2_vl", "linear", None, "selu", "last"),
    "qwen2_vl_mlp_null_selu_first": ("qwen2_vl", "mlp", None, "selu", "first"),
    "qwen2_vl_mlp_gelu_concat": ("qwen2_vl", "mlp", 24, "gelu", "first_last_concat"),
    "qwen2_vl_mlp_relu_add": ("qwen2_vl", "mlp", 24, "relu", "first_last_add"),
    "qwen2_vl_mlp_tanh_sub": ("qwen2_vl", "mlp", 24, "tanh", "first_last_sub"),
    "qwen2_vl_mlp_silu_mean": ("qwen2_vl", "mlp", 24, "silu", "response_mean"),
    "qwen2_5_vl_mlp_silu_last": ("qwen2_5_vl", "mlp", 24, "silu", "last"),
    "qwen3_vl_mlp_silu_last": ("qwen3_vl", "mlp", 24, "silu", "last"),
    "molmo2_mlp_silu_last": ("molmo2", "mlp", 24, "silu", "last"),
}
MERGED = ("qwen2_vl_mlp_silu_last", "qwen2_5_vl_mlp_silu_last", "qwen3_vl_mlp_silu_last", "molmo2_mlp_silu_last")
TINY = dict(hidden_size=32, heads=2, kv_heads=1, vision_width=16, layers=2)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Responses end in punctuation, newlines and spaces (BPE merges ".\n\n" with the separator).
TEXT_SAMPLES = [
    {"prompt": "What colour is the sky on a clear day?", "responses": ["Blue.", "It is green!\n", "red "],
     "rankings": [1, 3, 2]},
    {"prompt": "Count the dots.", "responses": ["There are two dots.\n\n", "three"], "rankings": [2, 1]},
    {"prompt": "Describe the picture in one line.",
     "responses": ["A cat.", "A dog on the left.\n", "The house is big ", "tree?", "no answer:\n"],
     "rankings": [1, 2, 3, 4, 5]},
    {"prompt": "Is it moving?\nAnswer yes or no.", "responses": ["yes", "no.", " maybe ", "It moves up.\n"],
     "rankings": [2, 1, 3, 4]},
]
IMAGE_SAMPLES = [
    {"prompt": "What colour is the square?", "image": "images/red_square.png", "responses": ["red.", "blue\n"],
     "rankings": [1, 2]},
    {"prompt": "Where is the circle?", "image": "images/circle_left.png",
     "responses": ["left.", "right!", "It is at the top.\n", "bottom "], "rankings": [1, 2, 3, 4]},
]


def _images(out):
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    a = np.full((48, 64, 3), 128, np.uint8)
    a[12:36, 20:44] = (220, 30, 30)
    Image.fromarray(a).save(os.path.join(out, "images", "red_square.png"))
    b = np.full((56, 56, 3), 200, np.uint8)
    yy, xx = np.mgrid[:56, :56]
    b[(yy - 28) ** 2 + (xx - 14) ** 2 < 64] = (20, 20, 220)
    Image.fromarray(b).save(os.path.join(out, "images", "circle_left.png"))


def _shims():
    """transformers 5.x shims (see the module docstring)."""
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    if not hasattr(PreTrainedTokenizerBase, "additional_special_tokens"):
        def get(self):
            return list(self.extra_special_tokens or [])
        PreTrainedTokenizerBase.additional_special_tokens = property(get)
    original = ProcessorMixin.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "audio_tokenizer", "absent") is None:
            del self.audio_tokenizer
        return original(self, *args, **kwargs)
    ProcessorMixin.save_pretrained = save_pretrained


def build_base(family, out, seed):
    """A tiny base checkpoint: weights, processor, tokenizer without <|resp_sep|>."""
    from transformers import AutoModelForImageTextToText

    from mrrm.model import tiny

    path = os.path.join(out, "bases", family)
    tok = tiny.build_tokenizer(family=family, with_separator=False)
    cfg = tiny.build_config(family, tokenizer=tok, **TINY)
    proc = tiny.build_processor(family, tok)
    if family == "molmo2":
        proc.image_processor.max_crops = 8  # their collate's default_max_crops overrides it anyway
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(copy.deepcopy(cfg))
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _randomize(model, seed):
    """LoRA B and the value head as if trained (their initial values would make both no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.value_head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.1))


def resize_like_their_code(model, tokenizer):
    """Their train.py's `model.resize_token_embeddings(len(tokenizer))`, with the new rows at the mean of
    the old ones. transformers draws them from N(mean, 1e-9 x covariance); the mean embedding is small,
    so that noise moves the scores by up to ~1e-4, and the adapter checkpoints do not save the row
    (their own reloads draw it again). The golden scores use the row's expected value, the mean,
    which is what mrrm appends (model.ensure_embedding_rows)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer))
    emb = model.get_input_embeddings().weight
    if emb.shape[0] > old:
        with torch.no_grad():
            emb[old:] = emb[:old].mean(0, keepdim=True)


def make_checkpoint(ref, base, name, spec, out, seed):
    """Their train.py's setup, then their save_checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, head_type, head_dim, act, repr_mode = spec
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    ref["add_resp_sep_token"](tokenizer)
    base_model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    resize_like_their_code(base_model, tokenizer)  # their train.py, for a standard embedding
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=LORA_TARGETS)
    base_model = get_peft_model(base_model, lora)
    model = ref["MultiResponseRewardModel"](base_model=base_model, value_head_type=head_type,
                                            value_head_hidden_dim=head_dim, value_head_activation=act,
                                            resp_repr_mode=repr_mode)
    _randomize(model, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tmp = os.path.join(out, "_tmp", name)
    ref["save_checkpoint"](model, optimizer, scheduler, 0, 1, 1, __import__("pathlib").Path(tmp), True, False,
                           processor=processor)
    dst = os.path.join(out, "checkpoints", name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.move(os.path.join(tmp, "checkpoint-1"), dst)
    return model.eval(), tokenizer, processor, dst


def make_merged(ref, base, adapter_dir, out, name):
    """A merged checkpoint with the calls their merge_lora.py makes; returns the reward model as their
    README's inference path loads it."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    dst = os.path.join(out, "checkpoints", name)
    shutil.rmtree(dst, ignore_errors=True)
    full = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    ref["add_resp_sep_token"](tok)
    resize_like_their_code(full, tok)
    full = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    with open(os.path.join(adapter_dir, "reward_model_config.json")) as f:
        rm_cfg = json.load(f)
    rm = ref["MultiResponseRewardModel"](base_model=full, value_head_type=rm_cfg["value_head_type"],
                                         value_head_hidden_dim=rm_cfg["value_head_hidden_dim"],
                                         value_head_activation=rm_cfg["value_head_activation"],
                                         resp_repr_mode=rm_cfg["resp_repr_mode"])
    rm.value_head.load_state_dict(torch.load(os.path.join(adapter_dir, "value_head.pt")))
    rm.base_model.save_pretrained(dst)
    torch.save(rm.value_head.state_dict(), os.path.join(dst, "value_head.pt"))
    with open(os.path.join(dst, "reward_model_config.json"), "w") as f:
        json.dump({**rm_cfg, "value_head_input_dim": rm.value_head_input_dim}, f, indent=2)
    tok.save_pretrained(dst)
    AutoProcessor.from_pretrained(base).save_pretrained(dst)
    return load_like_readme(ref, dst)


def load_like_readme(ref, path):
    """Their README's inference: processor + separator, the model, the config, the value head."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    ref["add_resp_sep_token"](processor.tokenizer)
    base_model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with open(os.path.join(path, "reward_model_config.json")) as f:
        rm_cfg = json.load(f)
    rm = ref["MultiResponseRewardModel"](base_model=base_model, value_head_type=rm_cfg.get("value_head_type", "mlp"),
                                         value_head_hidden_dim=rm_cfg.get("value_head_hidden_dim", 1024),
                                         value_head_activation=rm_cfg.get("value_head_activation", "silu"),
                                         resp_repr_mode=rm_cfg.get("resp_repr_mode", "last"))
    rm.value_head.load_state_dict(torch.load(os.path.join(path, "value_head.pt"), map_location="cpu"))
    return rm.eval(), processor.tokenizer, processor


def score_with_reference(ref, model, tokenizer, processor, samples, family, out):
    """Their collate + forward, one sample per batch, responses in the given order."""
    results = []
    for s in samples:
        images = [Image.open(os.path.join(out, s["image"])).convert("RGB")] if "image" in s else []
        sample = ref["Sample"](prompt=s["prompt"], responses=list(s["responses"]), label=0,
                               rankings=list(s["rankings"]), images=images, videos=[])
        batch = ref["collate"]([sample], tokenizer=tokenizer, processor=processor, max_length=4096,
                               shuffle_responses=False, vision_budget_enabled=(family == "molmo2" and bool(images)))
        batch.pop("labels"), batch.pop("rankings")
        ends, starts = batch.pop("resp_indices"), batch.pop("resp_start_indices")
        ids = batch["input_ids"][0].tolist()
        with torch.no_grad():
            scores = model(resp_indices=ends, resp_start_indices=starts, **batch)[0][0]
        results.append({"input_ids": ids, "resp_indices": ends[0].tolist(), "resp_start_indices": starts[0].tolist(),
                        "scores": scores.tolist()})
    return results


def mrrm_to_reference(ref, bases, out, golden, samples):
    """The other direction: checkpoints mrrm writes with layout="reference", scored by their code.

    - a merged model: mrrm loads a reference adapter checkpoint (merging it) and saves it; their
      README inference path loads that;
    - a LoRA adapter at the root: an mrrm LoRA model (peft on the bare backbone, trained-looking
      weights) saved in mrrm's layout under mrrm/ and in the reference layout; their training
      setup with their `load_checkpoint` loads the latter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from mrrm.model.parts import RewardModelConfig, ensure_separator_token, load_processor
    from mrrm.model.reward_model import RewardModel

    scratch = os.path.join(out, "_tmp", "mrrm_saved")
    for family in ("qwen2_vl", "molmo2"):
        name = f"{family}_mlp_silu_last"
        m = RewardModel.from_pretrained(os.path.join(out, "checkpoints", name), base_model=bases[family])
        path = os.path.join(scratch, f"{family}_merged")
        m.save_pretrained(path, layout="reference")
        rm, tok, proc = load_like_readme(ref, path)
        golden["checkpoints"][f"mrrm_saved:{family}_merged"] = {
            "family": family, "kind": "mrrm->reference merged", "source": f"checkpoints/{name}",
            "base": f"bases/{family}", "results": score_with_reference(ref, rm, tok, proc, samples, family, out)}

        tok, proc = load_processor(bases[family])
        backbone = AutoModel.from_pretrained(bases[family])
        ensure_separator_token(tok, backbone)
        backbone = get_peft_model(backbone, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        lora = RewardModel(backbone, tok, proc, RewardModelConfig(value_head_hidden_dim=12, base_model=bases[family]))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for pname, p in sorted(lora.named_parameters()):
                if "lora_B" in pname or pname.startswith("value_head"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        mrrm_dir = os.path.join(out, "mrrm", f"{family}_lora")
        shutil.rmtree(mrrm_dir, ignore_errors=True)
        lora.save_pretrained(mrrm_dir)
        path = os.path.join(scratch, f"{family}_adapter")
        lora.save_pretrained(path, layout="reference")
        # their training setup around the base, then their load_checkpoint of what mrrm wrote
        processor = AutoProcessor.from_pretrained(path)
        ref["add_resp_sep_token"](processor.tokenizer)
        full = AutoModelForImageTextToText.from_pretrained(bases[family], dtype=torch.float32)
        resize_like_their_code(full, processor.tokenizer)
        full = get_peft_model(full, LoraConfig(r=4, lora_alpha=8, bias="none", task_type="CAUSAL_LM",
                                               target_modules=LORA_TARGETS))
        with open(os.path.join(path, "reward_model_config.json")) as f:
            rm_cfg = json.load(f)
        rm = ref["MultiResponseRewardModel"](base_model=full, value_head_type=rm_cfg["value_head_type"],
                                             value_head_hidden_dim=rm_cfg["value_head_hidden_dim"],
                                             value_head_activation=rm_cfg["value_head_activation"],
                                             resp_repr_mode=rm_cfg["resp_repr_mode"])
        optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        ref["load_checkpoint"](path, rm, optimizer, scheduler, "cpu", False, True)
        golden["checkpoints"][f"mrrm_saved:{family}_adapter"] = {
            "family": family, "kind": "mrrm->reference adapter", "source": f"mrrm/{family}_lora",
            "base": f"bases/{family}",
            "results": score_with_reference(ref, rm.eval(), processor.tokenizer, processor, samples, family, out)}
        print(family, "mrrm -> reference done", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-repo", required=True, help="a checkout of yinuoyang01/multi-response-rm")
    ap.add_argument("--extra-path", action="append", default=[], help="more import paths (molmo_utils)")
    ap.add_argument("--out", default="tests/fixtures/reference")
    args = ap.parse_args(argv)
    sys.path[:0] = [args.reference_repo, *args.extra_path]
    _shims()
    from mr2rm.data.dataset import MultiResponseRewardSample, add_resp_sep_token, collate_multi_response_reward
    from mr2rm.models.reward_model import MultiResponseRewardModel
    from mr2rm.train import load_checkpoint, save_checkpoint

    ref = dict(add_resp_sep_token=add_resp_sep_token, MultiResponseRewardModel=MultiResponseRewardModel,
               save_checkpoint=save_checkpoint, load_checkpoint=load_checkpoint, collate=collate_multi_response_reward,
               Sample=MultiResponseRewardSample)
    out = args.out
    for sub in ("bases", "checkpoints", "mrrm", "_tmp"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    _images(out)
    torch.set_grad_enabled(True)
    samples = TEXT_SAMPLES + IMAGE_SAMPLES
    golden = {"samples": samples, "checkpoints": {}}
    bases = {}
    for i, family in enumerate(("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "molmo2")):
        bases[family] = build_base(family, out, seed=100 + i)
    for j, (name, spec) in enumerate(FAMILY_VARIANTS.items()):
        family = spec[0]
        model, tok, proc, path = make_checkpoint(ref, bases[family], name, spec, out, seed=200 + j)
        golden["checkpoints"][name] = {"family": family, "kind": "adapter", "base": f"bases/{family}",
                                       "results": score_with_reference(ref, model, tok, proc, samples, family, out)}
        print(name, "done", flush=True)
        if name in MERGED:
            mname = name.replace("_mlp_silu_last", "_merged")
            m2, tok2, proc2 = make_merged(ref, bases[family], path, out, mname)
            golden["checkpoints"][mname] = {"family": family, "kind": "merged", "base": None,
                                            "results": score_with_reference(ref, m2, tok2, proc2, samples, family, out)}
            print(mname, "done", flush=True)
    mrrm_to_reference(ref, bases, out, golden, samples)
    shutil.rmtree(os.path.join(out, "_tmp"), ignore_errors=True)
    # the adapter checkpoints name the base by the path it had here; tests pass base_model=
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print("wrote", os.path.join(out, "golden.json"))


if __name__ == "__main__":
    main()
