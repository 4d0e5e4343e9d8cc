"""Golden fixtures from the authors' code IN THEIR PINNED ENVIRONMENT (transformers 4.57.3, torch 2.6,
peft 0.18, molmo_utils), on tiny models: the released checkpoint's format and video sampling.

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.6.0 torchvision==0.21.0 transformers==4.57.3 "peft>=0.18,<0.19" \
        "accelerate>=1.12,<2" av molmo_utils einops
    git clone https://github.com/yinuoyang01/multi-response-rm /tmp/ref/multi-response-rm
    # Molmo2's remote code (configuration/modeling/processing/image_processing/video_processing_molmo2.py),
    # e.g. from a checkout of allenai's Molmo2 training code (olmo/hf_model/), into one folder:
    /tmp/refenv/bin/python scripts/reference_env_fixtures.py --reference-repo /tmp/ref/multi-response-rm \
        --molmo2-remote-code /tmp/ref/molmo2_remote --out tests/fixtures/reference_env

Nothing here imports mrrm (its compiled ops are built for another torch): the tiny tokenizer's corpus
and the text/image samples are read from mrrm/model/tiny.py and scripts/reference_fixtures.py by path.

It writes under --out (data only: the remote code is deleted from every saved checkpoint):

- checkpoints/molmo2_released/  a merged Molmo2 in the released checkpoint's format: their train.py's
  setup (AutoProcessor / AutoModelForImageTextToText with trust_remote_code, add_resp_sep_token, the
  Molmo2Embedding resize, LoRA on att_proj/attn_out/ff_proj/ff_out, MultiResponseRewardModel), their
  save_checkpoint, then THEIR scripts/merge_lora.py::merge_adapter (remote-code weight names such as
  model.transformer.blocks.N.self_attn.att_proj, wte.embedding + wte.new_embedding; config.json with
  auto_map and their vocab_size fix; value_head.pt; reward_model_config.json; processor files). The
  tiny tokenizer is laid out like the released one: ordinary tokens, padding tokens up to the base
  vocabulary, then Molmo2's media tokens in the additional embedding table, <|resp_sep|> after them.
- checkpoints/{qwen2_vl,qwen3_vl}_merged/  merged Qwen checkpoints: their train.py's setup (resize,
  LoRA, MultiResponseRewardModel), merged and saved with the calls their merge_lora.py makes.
- media/: the images, an mp4 (PyAV) and frame folders of 3, 4 and 6 frames.
- golden.json: per checkpoint and sample, what THEIR README inference load + their
  collate_multi_response_reward (MultiResponseRewardDataset for the media, molmo_utils for videos,
  one sample per batch, fp32) produce: token ids, response end / start indices, scores, and the frame
  count and video metadata the processor was given.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_FILES = ("configuration_molmo2.py", "modeling_molmo2.py", "processing_molmo2.py",
                "image_processing_molmo2.py", "video_processing_molmo2.py")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MOLMO2_MEDIA_TOKENS = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>",
                       "<im_low>", "<frame_start>", "<frame_end>", "<|video|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
MOLMO2_BASE_VOCAB = 608      # ordinary tokens + padding ("|<EXTRA_TOKENS_k>|"), as the released 151936
MOLMO2_ADDITIONAL = 16       # the additional table (128 in the released model): media tokens + spare rows

VIDEO_SAMPLES = [
    {"prompt": "Which way does the square move?", "video": "media/moving.mp4",
     "responses": ["It moves right.", "left\n", "It stays still "], "rankings": [1, 2, 3]},
    {"prompt": "Which way does it go?", "video": "media/moving444.mp4",
     "responses": ["right", "It goes left.", "up"], "rankings": [1, 2, 3]},
    {"prompt": "What happens?", "video": "media/frames3", "responses": ["A dot moves.", "nothing"],
     "rankings": [1, 2]},
    {"prompt": "What happens?", "video": "media/frames4", "sampling_interval": 2.0,
     "responses": ["The square grows.\n\n", "It shrinks", "no change"], "rankings": [1, 3, 2]},
    {"prompt": "Count the frames.", "video": "media/frames6", "responses": ["six", "five.", "seven!"],
     "rankings": [1, 2, 3]},
]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = _module(os.path.join(HERE, "..", "mrrm", "tiny.py"), "mrrm_tiny_standalone")
OLD = _module(os.path.join(HERE, "reference_fixtures.py"), "reference_fixtures_standalone")


# -- media ------------------------------------------------------------------------------------------

def write_media(out):
    OLD._images(os.path.join(out, "media"))  # media/images/*.png
    import av

    # 15 frames at 5 fps (3 s): molmo_utils takes 2 fps with the last frame (7 frames), Qwen-VL's reader
    # 6 evenly. Their environment reads the 64x64 file with decord (decord2); on the 32x32 one decord2
    # fails ("DECORDArrayCopyFromTo") and molmo_utils falls back to its PyAV reader: both readers covered.
    for name, size, pix_fmt in (("moving.mp4", 64, "yuv420p"), ("moving444.mp4", 32, "yuv444p")):
        with av.open(os.path.join(out, "media", name), "w") as container:
            stream = container.add_stream("libx264", rate=5)
            stream.width = stream.height = size
            stream.pix_fmt = pix_fmt
            stream.options = {"qp": "0"}
            for i in range(15):
                a = np.full((size, size, 3), 30, np.uint8)
                a[8:20, i * 2 % 24:i * 2 % 24 + 8] = (230, 40 + 10 * i, 40)
                for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    for n in (3, 4, 6):
        folder = os.path.join(out, "media", f"frames{n}")
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            a = np.full((32, 32, 3), 200, np.uint8)
            a[4 + 3 * i:12 + 3 * i, 6:6 + 4 + 2 * i] = (20 * i, 90, 220 - 30 * i)
            Image.fromarray(a).save(os.path.join(folder, f"frame_{i + 1:04d}.png"))


# -- tokenizers and bases ---------------------------------------------------------------------------

def molmo2_tokenizer():
    """A byte-level BPE with Qwen's specials, padded with "|<EXTRA_TOKENS_k>|" to MOLMO2_BASE_VOCAB
    ids, then Molmo2's media tokens (ids MOLMO2_BASE_VOCAB..+9): the released tokenizer's layout."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(TINY._trained_tokenizer_json(560, tuple(QWEN_SPECIALS)))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIALS[1:])
    pad = [f"|<EXTRA_TOKENS_{k}>|" for k in range(MOLMO2_BASE_VOCAB - len(tok))]
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:] + pad + MOLMO2_MEDIA_TOKENS})
    ids = tok.convert_tokens_to_ids(MOLMO2_MEDIA_TOKENS)
    assert ids == list(range(MOLMO2_BASE_VOCAB, MOLMO2_BASE_VOCAB + 10)), ids
    tok.chat_template = TINY.MOLMO2_CHAT_TEMPLATE
    return tok


def build_molmo2_base(remote_dir, out, seed):
    """A tiny Molmo2 base in the released (remote-code) format, built by the remote code itself."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = os.path.join(out, "_tmp", "bases", "molmo2")
    os.makedirs(path, exist_ok=True)
    for f in REMOTE_FILES:
        shutil.copy(os.path.join(remote_dir, f), path)
    tok = molmo2_tokenizer()
    ids = dict(zip(MOLMO2_MEDIA_TOKENS, tok.convert_tokens_to_ids(MOLMO2_MEDIA_TOKENS)))
    hidden, vit = 32, 16
    config = {
        "architectures": ["Molmo2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_molmo2.Molmo2Config",
                     "AutoModelForImageTextToText": "modeling_molmo2.Molmo2ForConditionalGeneration"},
        "model_type": "molmo2",
        # the released ViT declares more layers than the adapter reads (27 for 25): here 4 for 3
        "vit_config": {"model_type": "molmo2", "hidden_size": vit, "intermediate_size": 2 * vit,
                       "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 2,
                       "head_dim": vit // 2, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                       "image_default_input_size": [56, 56], "image_patch_size": 14, "image_num_pos": 16,
                       "float32_attention": True, "attention_dropout": 0.0, "residual_dropout": 0.0,
                       "initializer_range": 0.02},
        "adapter_config": {"model_type": "molmo2", "vit_layers": [-2, -4], "pooling_attention_mask": True,
                           "hidden_size": vit, "num_attention_heads": 2, "num_key_value_heads": 2,
                           "head_dim": vit // 2, "float32_attention": True, "attention_dropout": 0.0,
                           "residual_dropout": 0.0, "hidden_act": "silu", "intermediate_size": 2 * hidden,
                           "text_hidden_size": hidden, "image_feature_dropout": 0.0, "initializer_range": 0.02},
        "text_config": {"model_type": "molmo2_text", "hidden_size": hidden, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "head_dim": 16, "vocab_size": MOLMO2_BASE_VOCAB,
                        "additional_vocab_size": MOLMO2_ADDITIONAL, "qkv_bias": False, "num_hidden_layers": 2,
                        "intermediate_size": 2 * hidden, "hidden_act": "silu", "embedding_dropout": 0.0,
                        "attention_dropout": 0.0, "residual_dropout": 0.0, "max_position_embeddings": 4096,
                        "rope_theta": 5000000.0, "rope_scaling": None, "rope_scaling_layers": None,
                        "use_qk_norm": True, "qk_norm_type": "qwen3", "layer_norm_eps": 1e-6,
                        "norm_after": False, "initializer_range": 0.02, "use_cache": True},
        "image_start_token_id": ids["<im_start>"], "low_res_image_start_token_id": ids["<low_res_im_start>"],
        "image_end_token_id": ids["<im_end>"], "image_low_res_id": ids["<im_low>"],
        "image_patch_id": ids["<im_patch>"], "image_col_id": ids["<im_col>"],
        "frame_start_token_id": ids["<frame_start>"], "frame_end_token_id": ids["<frame_end>"],
        "use_frame_special_tokens": False, "initializer_range": 0.02, "tie_word_embeddings": False,
        "use_cache": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    image = {"auto_map": {"AutoImageProcessor": "image_processing_molmo2.Molmo2ImageProcessor",
                          "AutoVideoProcessor": "video_processing_molmo2.Molmo2VideoProcessor",
                          "AutoProcessor": "processing_molmo2.Molmo2Processor"},
             "do_convert_rgb": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "image_processor_type": "Molmo2ImageProcessor", "max_crops": 4, "overlap_margins": [1, 1],
             "patch_size": 14, "pooling_size": [2, 2], "processor_class": "Molmo2Processor", "resample": 2,
             "size": {"height": 56, "width": 56}}
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(image, f, indent=2)
    video = {"auto_map": image["auto_map"], "do_convert_rgb": True, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "video_processor_type": "Molmo2VideoProcessor", "patch_size": 14,
             "pooling_size": [2, 2], "processor_class": "Molmo2Processor", "resample": 2,
             "size": {"height": 56, "width": 56}, "do_sample_frames": True, "num_frames": 384,
             "max_fps": 2, "frame_sample_mode": "uniform_last_frame"}
    with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"auto_map": {"AutoProcessor": "processing_molmo2.Molmo2Processor"},
                   "processor_class": "Molmo2Processor", "image_use_col_tokens": True,
                   "use_single_crop_col_tokens": False, "use_single_crop_start_token": True,
                   "video_use_col_tokens": False, "use_frame_special_tokens": False}, f, indent=2)
    tok.save_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(TINY.MOLMO2_CHAT_TEMPLATE)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, trust_remote_code=True, torch_dtype=torch.float32)
    model.save_pretrained(path)
    proc = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert proc.tokenizer.convert_tokens_to_ids("<|image|>") == ids["<|image|>"]
    return path


def build_qwen_base(family, out, seed):
    """A tiny Qwen2-VL / Qwen3-VL base written by transformers 4.57.3 (its own config format)."""
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2TokenizerFast,
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLConfig,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    path = os.path.join(out, "_tmp", "bases", family)
    plain = TINY.build_tokenizer(family=family, with_separator=False)  # 4.57's Qwen processors want Qwen's class
    tok = Qwen2TokenizerFast(tokenizer_object=plain._tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, additional_special_tokens=QWEN_SPECIALS[1:])
    sid = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    hidden, heads, head_dim = 32, 2, 16
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
                rope_theta=10000.0, eos_token_id=sid["<|im_end|>"], pad_token_id=tok.pad_token_id)
    common = dict(image_token_id=sid["<|image_pad|>"], video_token_id=sid["<|video_pad|>"],
                  vision_start_token_id=sid["<|vision_start|>"], vision_end_token_id=sid["<|vision_end|>"],
                  eos_token_id=sid["<|im_end|>"], pad_token_id=tok.pad_token_id)
    image = Qwen2VLImageProcessor(min_pixels=64 * 64 // 4, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                  temporal_patch_size=2)
    if family == "qwen3_vl":
        text.update(head_dim=head_dim, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                      num_position_embeddings=256, deepstack_visual_indexes=[1])
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
        video = Qwen3VLVideoProcessor(size={"shortest_edge": 64 * 64 // 4, "longest_edge": 64 * 64 * 16},
                                      patch_size=8, merge_size=2, temporal_patch_size=2)
        proc = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                chat_template=TINY.QWEN3_VL_CHAT_TEMPLATE)
    else:
        text.update(rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]})
        vision = dict(depth=2, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        video = Qwen2VLVideoProcessor(min_pixels=64 * 64 // 4, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                      temporal_patch_size=2)
        proc = Qwen2VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                chat_template=TINY.QWEN2_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(copy.deepcopy(cfg), torch_dtype=torch.float32)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


# -- their training setup, checkpoint, merge and inference ------------------------------------------

def _randomize(model, seed):
    """LoRA B and the value head as if trained (their initial values would make both no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.value_head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.1))


def their_training_setup(ref, base, targets, seed, head=("mlp", 24, "silu", "last")):
    """mr2rm/train.py main() up to the optimizer: processor + separator, the model, their embedding
    resize (Molmo2Embedding by hand, else resize_token_embeddings), LoRA, the reward model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    tokenizer = processor.tokenizer
    ref["add_resp_sep_token"](tokenizer)
    base_model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True, torch_dtype=torch.float32,
                                                             device_map=None)
    emb = base_model.get_input_embeddings()
    if hasattr(emb, "new_embedding") and hasattr(emb, "embedding"):  # their lines, verbatim in effect
        current, new = emb.embedding.shape[0] + emb.new_embedding.shape[0], len(tokenizer)
        if new > current:
            pad = torch.zeros(new - current, emb.new_embedding.shape[1], dtype=emb.new_embedding.dtype)
            emb.new_embedding = torch.nn.Parameter(torch.cat([emb.new_embedding, pad], dim=0))
        elif new < current:
            emb.new_embedding = torch.nn.Parameter(emb.new_embedding[:-(current - new)])
    else:
        OLD.resize_like_their_code(base_model, tokenizer)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets)
    base_model = get_peft_model(base_model, lora)
    model = ref["MultiResponseRewardModel"](base_model=base_model, value_head_type=head[0],
                                            value_head_hidden_dim=head[1], value_head_activation=head[2],
                                            resp_repr_mode=head[3])
    _randomize(model, seed)
    return model, processor


def load_like_readme(ref, path):
    """Their README's inference: processor + separator, the model (trust_remote_code), the head."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    ref["add_resp_sep_token"](processor.tokenizer)
    base_model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float32)
    with open(os.path.join(path, "reward_model_config.json")) as f:
        rm_cfg = json.load(f)
    rm = ref["MultiResponseRewardModel"](base_model=base_model, value_head_type=rm_cfg.get("value_head_type", "mlp"),
                                         value_head_hidden_dim=rm_cfg.get("value_head_hidden_dim", 1024),
                                         value_head_activation=rm_cfg.get("value_head_activation", "silu"),
                                         resp_repr_mode=rm_cfg.get("resp_repr_mode", "last"))
    rm.value_head.load_state_dict(torch.load(os.path.join(path, "value_head.pt"), map_location="cpu"))
    return rm.eval(), processor


def score_with_reference(ref, model, processor, samples, out, molmo2):
    """Their dataset (media resolution) + collate + forward, one sample per batch, given order."""
    data = os.path.join(out, "_tmp", "samples.jsonl")
    with open(data, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    dataset = ref["Dataset"](data, image_base_dir=out, video_base_dir=out)
    seen = {}
    original = processor.__class__.__call__

    def spy(self, *args, **kwargs):  # what the processor was given for the video, for the record
        if kwargs.get("videos") is not None:
            seen["frames"] = [int(np.asarray(v).shape[0]) for v in kwargs["videos"]]
            seen["video_metadata"] = [{k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
                                       for k, v in dict(m).items()} for m in kwargs["video_metadata"]]
        return original(self, *args, **kwargs)

    processor.__class__.__call__ = spy
    results = []
    try:
        for i, s in enumerate(samples):
            seen.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                batch = ref["collate"]([dataset[i]], tokenizer=processor.tokenizer, processor=processor,
                                       max_length=4096, shuffle_responses=False,
                                       vision_budget_enabled=molmo2 and "image" in s)
            batch.pop("labels"), batch.pop("rankings")
            ends, starts = batch.pop("resp_indices"), batch.pop("resp_start_indices")
            with torch.no_grad():
                scores = model(resp_indices=ends, resp_start_indices=starts, **batch)[0][0]
            entry = {"input_ids": batch["input_ids"][0].tolist(), "resp_indices": ends[0].tolist(),
                     "resp_start_indices": starts[0].tolist(), "scores": scores.tolist()}
            if "video" in s:
                entry.update(frames=seen["frames"], video_metadata=seen["video_metadata"],
                             reader_warnings=[str(w.message)[:200] for w in caught if "video" in str(w.message).lower()])
            results.append(entry)
    finally:
        processor.__class__.__call__ = original
    return results


def make_molmo2(ref, remote_dir, merge_lora, out, samples):
    base = build_molmo2_base(remote_dir, out, seed=301)
    model, processor = their_training_setup(ref, base, ["att_proj", "attn_out", "ff_proj", "ff_out"], seed=302)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tmp = os.path.join(out, "_tmp", "molmo2_adapter")
    ref["save_checkpoint"](model, optimizer, scheduler, 0, 1, 1, __import__("pathlib").Path(tmp), True, False,
                           processor=processor)
    adapter = os.path.join(tmp, "checkpoint-1")
    merged = os.path.join(out, "_tmp", "molmo2_released")
    # Without a GPU their merge_adapter passes `device="cpu"` to from_pretrained, which the model's
    # __init__ rejects; with one it passes device_map={"": 0}. That one keyword is dropped here.
    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        kw.pop("device", None)
        return original(cls, *a, **kw)

    AutoModelForImageTextToText.from_pretrained = classmethod(from_pretrained)
    try:
        merge_lora.merge_adapter(adapter_path=adapter, output_dir=merged, base_model_path=base,
                                 torch_dtype="float32")
    finally:
        AutoModelForImageTextToText.from_pretrained = classmethod(original)
    for f in REMOTE_FILES:  # merge_lora copies only the processor code; the model code comes with the base
        if not os.path.exists(os.path.join(merged, f)):
            shutil.copy(os.path.join(remote_dir, f), merged)
    rm, proc = load_like_readme(ref, merged)
    results = score_with_reference(ref, rm, proc, samples, out, molmo2=True)
    # the training-time model (LoRA unmerged) scores the same: the merge and its config fix are faithful
    train_results = score_with_reference(ref, model.eval(), processor, samples, out, molmo2=True)
    drift = max(abs(a - b) for r, t in zip(results, train_results) for a, b in zip(r["scores"], t["scores"]))
    print(f"molmo2: merged vs training-time model, largest score difference {drift:.3g}")
    return merged, results, drift


def make_qwen(ref, family, out, samples, seed):
    from peft import PeftModel  # noqa: F401  (merge_and_unload below is peft's)

    base = build_qwen_base(family, out, seed)
    model, processor = their_training_setup(ref, base, LORA_TARGETS, seed=seed + 1)
    merged = os.path.join(out, "_tmp", f"{family}_merged")
    # the calls their merge_lora.py makes, for a standard embedding: merge, save model + head + config + processor
    full = model.base_model.merge_and_unload()
    full.save_pretrained(merged)
    torch.save(model.value_head.state_dict(), os.path.join(merged, "value_head.pt"))
    with open(os.path.join(merged, "reward_model_config.json"), "w") as f:
        json.dump({"value_head_type": "mlp", "value_head_hidden_dim": 24, "value_head_activation": "silu",
                   "value_head_input_dim": model.value_head_input_dim, "resp_repr_mode": "last"}, f, indent=2)
    processor.save_pretrained(merged)
    rm, proc = load_like_readme(ref, merged)
    return merged, score_with_reference(ref, rm, proc, samples, out, molmo2=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-repo", required=True, help="a checkout of yinuoyang01/multi-response-rm")
    ap.add_argument("--molmo2-remote-code", required=True, help="a folder with Molmo2's remote-code .py files")
    ap.add_argument("--out", default="tests/fixtures/reference_env")
    args = ap.parse_args(argv)
    import transformers

    sys.path[:0] = [args.reference_repo]
    if not transformers.__version__.startswith("4.57."):
        raise SystemExit(f"run this in the authors' pinned environment (transformers 4.57.3), not {transformers.__version__}")
    from mr2rm.data.dataset import MultiResponseRewardDataset, add_resp_sep_token, collate_multi_response_reward
    from mr2rm.models.reward_model import MultiResponseRewardModel
    from mr2rm.train import save_checkpoint

    merge_lora = _module(os.path.join(args.reference_repo, "scripts", "merge_lora.py"), "their_merge_lora")
    ref = dict(add_resp_sep_token=add_resp_sep_token, MultiResponseRewardModel=MultiResponseRewardModel,
               save_checkpoint=save_checkpoint, collate=collate_multi_response_reward,
               Dataset=MultiResponseRewardDataset)
    out = args.out
    for sub in ("checkpoints", "media", "_tmp"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, "_tmp"))
    write_media(out)
    torch.set_grad_enabled(True)
    image_samples = [dict(s, image="media/" + s["image"]) for s in OLD.IMAGE_SAMPLES]
    golden = {"environment": {"transformers": transformers.__version__, "torch": torch.__version__,
                              "peft": __import__("peft").__version__,
                              "molmo_utils": __import__("importlib.metadata").metadata.version("molmo_utils")},
              "samples": {"text": OLD.TEXT_SAMPLES, "image": image_samples, "video": VIDEO_SAMPLES},
              "checkpoints": {}}
    all_samples = OLD.TEXT_SAMPLES + image_samples + VIDEO_SAMPLES
    jobs = [("molmo2_released", lambda: make_molmo2(ref, args.molmo2_remote_code, merge_lora, out, all_samples)),
            ("qwen2_vl_merged", lambda: make_qwen(ref, "qwen2_vl", out, all_samples, 401)),
            ("qwen3_vl_merged", lambda: make_qwen(ref, "qwen3_vl", out, all_samples, 501))]
    for name, job in jobs:
        made = job()
        path, results = made[0], made[1]
        dst = os.path.join(out, "checkpoints", name)
        shutil.copytree(path, dst)
        for f in REMOTE_FILES:  # data only: the remote code is not committed
            if os.path.exists(os.path.join(dst, f)):
                os.remove(os.path.join(dst, f))
        entry = {"family": name.split("_merged")[0].replace("_released", ""), "results": results}
        if len(made) > 2:
            entry["merged_vs_training_time_max_diff"] = made[2]
        golden["checkpoints"][name] = entry
        print(name, "done", flush=True)
    shutil.rmtree(os.path.join(out, "_tmp"), ignore_errors=True)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print("wrote", os.path.join(out, "golden.json"))


if __name__ == "__main__":
    main()
