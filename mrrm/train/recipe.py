"""`python -m mrrm.train`: train a multi-response reward model on preference data.

    python -m mrrm.train                                   # the built-in demo (synthetic task, tiny model)
    python -m mrrm.train --base-model PATH --data a.jsonl b.jsonl --data-weights 3 1 --output-dir out
    python -m mrrm.train --config train.yaml --lr 5e-5     # YAML config; flags override it
    python -m mrrm.train --config mrrm_out/config.yaml --output-dir again  # the same run again (its resolved config)
    accelerate launch -m mrrm.train ...                    # data-parallel on several GPUs / nodes
    torchrun --nproc_per_node 2 -m mrrm.train ...          # the same on CPU processes (gloo)

Reads top to bottom: config -> model -> data (every sample validated before the first step) ->
loop (packed micro-batches under a token budget, gradient accumulation, listwise loss) -> atomic
checkpoints with exact resume -> final model that `mrrm.load(output_dir + "/model")` serves.

What a run writes to output_dir: config.yaml (every setting, resolved, at the start: `--config` takes it
back), log.jsonl (the metrics every log_every steps, held-out evaluations, and a final record with the
held-out evaluation and the joint-vs-single scoring comparison), curves.png (loss, accuracy and held-out
accuracy over the steps; needs matplotlib), summary.json, checkpoints/, model/, and with --report-to the
same scalars to TensorBoard (tensorboard/) and / or Weights & Biases (wandb/; WANDB_MODE=offline works).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from mrrm import ops
from mrrm._args import doc_epilog
from mrrm._io import WriteError, writing
from mrrm.common import TRAIN_MODES, is_correct
from mrrm.data.budgets import MEDIA_BUDGET_FLAGS, media_budgets_from_args
from mrrm.data.encoding import SampleError
from mrrm.data.media import DEFAULT_MEDIA_BUDGETS, VIDEO_SAMPLING
from mrrm.data.records import BadRecord, check_rankings, load_records
from mrrm.errors import ConfigError, DataError, MrrmError
from mrrm.integrity import (
    MANIFEST,
    ChecksumError,
    load_torch_file,
    sha256_file,
    update_manifest,
    verify_manifest,
    write_manifest,
)
from mrrm.model import tiny
from mrrm.model.checkpoints import load_backbone
from mrrm.model.parts import CONFIG_FILE as MODEL_CONFIG_FILE
from mrrm.model.parts import RewardModelConfig, ensure_separator_token, load_processor
from mrrm.model.reward_model import RewardModel
from mrrm.train import demo, sharding, threads
from mrrm.train.sharding import aligned_count, full_state, load_full_state, optimizer_state_by_name, zero3_full_state

LOSSES = ("best", "plackett_luce", "bradley_terry")
# The from-scratch demo backbone: 64x64 images with patch 8 give 16 vision tokens. In the authors'
# layout every response is read at its separator's newlines (the same token for all of them), which
# a from-scratch model must learn to route its answer into; hidden 128 learned that faster per second
# than 64 (docs/results.md, "Training the demo": measured alternatives).
TINY_DEMO_BACKBONE = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, rope_theta=10000.0)
DEMO_STEPS = 6000            # the no-argument demo: 7-8 minutes of steps on 2 cores (13-15 steps/s)
# The demo's loss: its rankings are graded (nearer misses rank higher), and Plackett-Luce over them
# leaves the first plateau where the best-only loss stays at ln 4 for thousands of steps (docs/results.md).
DEMO_LOSS = "plackett_luce"
# The demo's response representation: the mean over each response's tokens (an option of the authors'
# reward model) learned the demo task faster from scratch than the last token (docs/results.md).
DEMO_RESP_REPR = "response_mean"
DEMO_VIDEO_FPS = 4.0         # all 8 frames of the demo's 4 fps clips: motion 41% -> 76% (docs/results.md)
SCRATCH_LR, LORA_LR = 7e-4, 1e-4
# --report-to: the experiment trackers, each with the pip extra that installs it. The default is none (as
# transformers' TrainingArguments.report_to since v5): log.jsonl and curves.png are always written.
REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_PROJECT = "mrrm"       # the W&B project unless WANDB_PROJECT names one
RUN_CONFIG_FILE = "config.yaml"  # the run's resolved TrainConfig, in output_dir
CURVES_FILE = "curves.png"
# What a resume compares with the run that wrote its checkpoint (run_signature: every TrainConfig field, the
# training files by content), in four kinds. The lists name the exceptions; every other field changes the data
# or what a step computes (data, data_weights, batch_size, seed, loss, mode, max_length, max_batch_tokens,
# video_fps, video_sampling, media budgets, schedule, warmup_steps, max_grad_norm, ...): a change is refused,
# naming each (old -> new), unless --force-resume, which continues with the new values and records them.
# (1) When to log, evaluate and save, where and to which trackers, and the CPU threads: free to change, not recorded.
RESUME_BOOKKEEPING = ("output_dir", "force_resume", "resume_unverified", "log_every", "eval_every", "save_every",
                      "keep_last", "report_to", "threads")
# (2) Free to change and recorded in model/'s training record (`resumed`): how long the run goes (the schedule
# is stretched over the new total from the resumed step on), what is evaluated, and memory-only settings.
RESUME_RECORDED = ("max_steps", "epochs", "eval_data", "demo_eval_size", "gradient_checkpointing")
# (3) Never changed on a resume, not even with --force-resume: they make the checkpoint another model (its
# head, its representation, its LoRA, its base, its precision), or the checkpoint's optimizer state holds them
# (lr, weight_decay: loading it would silently keep the old values under a config that claims the new ones).
RESUME_FIXED = ("base_model", "lora_r", "lora_alpha", "lora_target", "head_type", "head_hidden", "head_activation",
                "resp_repr_mode", "bf16", "lr", "weight_decay")
# (4) Checked by the kind of checkpoint instead (_maybe_resume: a sharded one resumes only as it was written).
RESUME_BY_KIND = ("fsdp", "deepspeed")


@dataclass
class TrainConfig:
    base_model: str | None = None        # path or hub id; None = the built-in tiny backbone from scratch
    data: list = field(default_factory=lambda: ["demo"])   # files; "demo" = the built-in synthetic task
    data_weights: list | None = None     # mixing weights of the files (samples drawn per epoch)
    eval_data: str | None = None         # held-out file; "demo" = a fresh synthetic split (unseen seed)
    media_dir: str | None = None         # base dir of relative image/video paths (default: each file's dir)
    demo_train_size: int = 10000
    demo_eval_size: int = 400
    lora_r: int = 128                    # the paper's LoRA; 0 = train the whole backbone
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    video_fps: float | None = None       # frames sampled per second of video (None: Qwen-VL's 2.0)
    video_sampling: str = "qwen"         # qwen (qwen-vl-utils' reader at video_fps) or reference (the authors'
                                         # molmo_utils sampling); recorded in the checkpoint (mrrm.data.media)
    head_type: str = "mlp"               # mlp (the paper) or linear (the authors' code's default)
    head_hidden: int = 1024
    head_activation: str = "silu"
    resp_repr_mode: str | None = None    # the authors' response representations (mrrm.model.RESP_REPR_MODES);
                                         # None: last (the paper), and the demo's DEMO_RESP_REPR
    init_std: float = 0.06               # init of a from-scratch backbone (0.02 stalls at ln N)
    loss: str | None = None              # best (the paper; the default), plackett_luce, bradley_terry;
                                         # None: best, and the demo's DEMO_LOSS
    mode: str = "joint"                  # joint (the paper) or independent
    shuffle_responses: bool = True
    max_length: int = 4096
    max_batch_tokens: int = 8192         # per micro-batch (packed, no padding)
    batch_size: int = 32                 # samples per optimisation step (global, over all processes)
    epochs: float = 1.0
    max_steps: int | None = None         # None: epochs (the demo: DEMO_STEPS)
    lr: float | None = None              # None: 1e-4 with LoRA on a base model, 5e-4 from scratch
    schedule: str = "cosine"             # cosine, linear, constant
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0                  # steps; 0 = only at the end
    save_every: int = 0                  # steps; 0 = only at the end
    keep_last: int = 2
    seed: int = 0
    output_dir: str = "mrrm_out"
    skip_bad: bool = False
    drop_media: bool = False             # control runs: train and evaluate with images/videos removed
    log_every: int = 10
    report_to: list = field(default_factory=list)  # experiment trackers: tensorboard, wandb (--report-to tensorboard
                                         # wandb, or a comma list); [] / none (the default): log.jsonl only
    threads: int = 0                     # CPU threads of torch; 0 = auto (mrrm.train.threads): the count chosen is
                                         # what config.yaml records
    force_resume: bool = False           # resume even when data or step settings changed (RESUME_* above)
    resume_unverified: bool = False      # resume a checkpoint without a checksum manifest (an older mrrm's, or copied
                                         # without it), unchecked
    fsdp: bool = False                   # shard the model with FSDP2 over the launch's processes (mrrm.train.sharding)
    deepspeed: str | None = None         # a DeepSpeed JSON config: ZeRO-2/3 over the launch's processes (mrrm.train.sharding)
    # media budgets (the encoder's mrrm.data.media.MediaBudgets, checked before decoding); None: the defaults
    max_image_megapixels: float | None = None
    max_video_frame_megapixels: float | None = None
    max_video_megapixels: float | None = None
    max_images_per_sample: float | None = None
    max_videos_per_sample: float | None = None
    max_sample_megapixels: float | None = None


# --base-model TINY: the built-in tiny backbone, trained from scratch, on data of the user's (TrainConfig.base_model None)
TINY = "tiny"
# The help line of every TrainConfig field's flag (`mrrm train --help`); each says its default, or what the
# default None means. A field without a line gets its bare default (tests/cli/test_help.py asks for a line).
HELP = {
    "base_model": "path or Hugging Face Hub id of the backbone to fine-tune; 'tiny': the built-in tiny backbone, "
                  "trained from scratch (default: none, which only the built-in demo data may use: with --data "
                  "files, pass one)",
    "data": "training files (JSONL, JSON, parquet, or Hub dataset ids); 'demo': the built-in synthetic task "
            "(default: demo)",
    "data_weights": "mixing weights of the --data files, one each: samples drawn per epoch in proportion "
                    "(default: none, every file once per epoch)",
    "eval_data": "held-out file evaluated every --eval-every steps and at the end; 'demo': a fresh synthetic split "
                 "(default: none; with --data demo, the demo's own held-out split)",
    "media_dir": "base directory of relative image/video paths (default: each data file's directory)",
    "demo_train_size": "samples of the generated demo training split",
    "demo_eval_size": "samples of the generated demo held-out split",
    "lora_r": "LoRA rank on a base model (the paper's); 0 trains the whole backbone",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target": "regular expression of the modules LoRA adapts (default: the language model's attention "
                   "projections q/k/v/o_proj; on Qwen3.5 also its Gated DeltaNet layers)",
    "video_fps": "frames sampled per second of video (default: Qwen-VL's 2.0; the from-scratch demo: "
                 f"{DEMO_VIDEO_FPS:g}, every frame of its clips)",
    "video_sampling": f"how videos are sampled, one of {', '.join(VIDEO_SAMPLING)}: qwen-vl-utils' reader at "
                      "--video-fps, or the authors' molmo_utils sampling; recorded in the checkpoint",
    "head_type": "value head: mlp (the paper) or linear (the authors' code's default)",
    "head_hidden": "hidden width of the mlp value head",
    "head_activation": "activation of the mlp value head",
    "resp_repr_mode": "response representation, one of mrrm.model.RESP_REPR_MODES (default: last, the paper; "
                      f"{DEMO_RESP_REPR} on the demo data)",
    "init_std": "initializer std of a from-scratch backbone (0.02 stalls at ln N)",
    "loss": f"listwise loss, one of {', '.join(LOSSES)} (default: best, the paper; {DEMO_LOSS} on the demo data)",
    "mode": "joint (the paper: the N responses in one sequence) or independent",
    "shuffle_responses": "put each sample's responses in a new random order every epoch",
    "max_length": "longest sample in tokens; a longer one is a bad sample",
    "max_batch_tokens": "tokens of one packed micro-batch (no padding)",
    "batch_size": "samples per optimisation step, over all processes",
    "epochs": "passes over the data (a fraction allowed)",
    "max_steps": f"optimisation steps (default: as many as --epochs gives; {DEMO_STEPS} on the demo data)",
    "lr": f"peak learning rate (default: {LORA_LR:.0e} with LoRA on a base model, {SCRATCH_LR:.0e} from "
          "scratch)".replace("e-0", "e-"),
    "schedule": "learning-rate schedule after the warmup: cosine, linear or constant",
    "warmup_steps": "linear learning-rate warmup, in steps",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm; 0: no clipping",
    "bf16": "bfloat16 weights and autocast",
    "gradient_checkpointing": "recompute activations in the backward pass, to save memory",
    "eval_every": "evaluate the held-out data every N steps; 0: only at the end",
    "save_every": "save a checkpoint every N steps; 0: only at the end",
    "keep_last": "checkpoints kept in --output-dir, older ones deleted; 0: keep all",
    "report_to": "experiment trackers the run logs to, besides log.jsonl and curves.png (always written): "
                 "tensorboard, wandb (both: pip install 'mrrm[tensorboard]' / 'mrrm[wandb]'), or none (default: none, "
                 "as transformers' TrainingArguments since v5)",
    "threads": "CPU threads of torch; 0: chosen from the CPUs other processes leave free at the start "
               "(mrrm.train.threads), said in one line (default: 0)",
    "seed": "seed of the data order, the response shuffling, the initialization and the demo data",
    "output_dir": "where the checkpoints, log.jsonl and the final model/ go (a rerun resumes there)",
    "skip_bad": "train on the valid samples when some are bad (listed either way) instead of stopping",
    "drop_media": "control runs: train and evaluate with the images and videos removed",
    "log_every": "write the metrics every N steps",
    "force_resume": "resume even when data or step settings changed (refused otherwise, naming each)",
    "resume_unverified": "resume a checkpoint without a checksum manifest (an older mrrm's, or copied without it), "
                         "unchecked",
    "fsdp": "shard the model with FSDP2 over the launch's processes (mrrm.train.sharding)",
    "deepspeed": "a DeepSpeed JSON config: ZeRO-2/3 over the launch's processes (default: none, no DeepSpeed)",
    **{dest: f"media budget, checked before decoding (default {getattr(DEFAULT_MEDIA_BUDGETS, budget) / unit:g})"
       for dest, (budget, unit) in MEDIA_BUDGET_FLAGS.items()},
}


def _help(f) -> str:
    """A field's help line, with its default unless the line says it."""
    text = HELP.get(f.name, "")
    if "(default" not in text:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, list):
            default = " ".join(map(str, default))
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")  # argparse formats help strings


def build_parser() -> argparse.ArgumentParser:
    """`mrrm train`'s flags: --config and one flag per TrainConfig field (None: not given)."""
    ap = argparse.ArgumentParser(prog="mrrm train", description="Train a multi-response reward model on preference "
                                 "data (no arguments: the built-in demo).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Flags override the --config file, which overrides the defaults.\n\n" + doc_epilog(
                                     __doc__, "Reads top to bottom"))
    ap.add_argument("--config", help="YAML file with TrainConfig fields; the flags given override it (default: none)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        elif f.name in ("data", "data_weights", "report_to"):
            ap.add_argument(flag, dest=f.name, nargs="+", default=None,
                            type=float if f.name == "data_weights" else str, help=_help(f))
        else:
            ap.add_argument(flag, dest=f.name, default=None, type=_field_type(f), help=_help(f))
    return ap


def parse_args(argv=None) -> TrainConfig:
    """Flags override the YAML config, which overrides the defaults. Training files without a base model
    (which would train the built-in tiny backbone on them) are a ConfigError unless --base-model tiny."""
    ap = build_parser()
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as fh:
            values.update(yaml.safe_load(fh) or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            ap.error(f"{args.config}: unknown keys {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    values["base_model"] = _base_model(values.get("base_model"), values.get("data", TrainConfig().data))
    cfg = TrainConfig(**values)
    try:
        cfg.report_to = report_targets(cfg.report_to)
    except ConfigError as e:
        ap.error(str(e))
    if cfg.threads < 0:
        ap.error("--threads must be >= 0 (0: chosen from the free CPUs, mrrm.train.threads)")
    if cfg.loss is not None and cfg.loss not in LOSSES:
        ap.error(f"--loss must be one of {LOSSES}")
    if cfg.mode not in TRAIN_MODES:
        ap.error(f"--mode must be one of {TRAIN_MODES} (training packs the N responses into one pass)")
    if cfg.data_weights is not None and len(cfg.data_weights) != len(cfg.data):
        ap.error(f"--data-weights has {len(cfg.data_weights)} values for {len(cfg.data)} data files")
    if cfg.fsdp and cfg.deepspeed:
        ap.error("--fsdp and --deepspeed are two ways to shard; pick one")

    if cfg.video_sampling not in VIDEO_SAMPLING:
        ap.error(f"--video-sampling must be one of {VIDEO_SAMPLING}")
    return cfg


def _base_model(base_model, data) -> str | None:
    """TrainConfig.base_model from --base-model: TINY -> None (the built-in tiny backbone, from scratch). None
    with training files of the user's is refused: it trained the tiny demo backbone on them, silently (issue 31)."""
    if base_model == TINY:
        if os.path.exists(TINY):
            raise ConfigError(f"mrrm.train: --base-model {TINY} names the built-in tiny backbone, but ./{TINY} exists "
                              f"here: pass --base-model ./{TINY} for that one")
        return None
    if base_model is None and list(data) != ["demo"]:
        raise ConfigError("mrrm.train: --data without --base-model would train the built-in tiny demo backbone (2 "
                          "layers, from scratch) on your data: a toy that learns little. Pass --base-model PATH or a "
                          "Hugging Face Hub id (e.g. Qwen/Qwen2-VL-2B-Instruct) to fine-tune a real backbone, or "
                          f"--base-model {TINY} to train the tiny one from scratch on purpose")
    return base_model


def report_targets(value) -> list:
    """--report-to as a list of tracker names: names or comma-separated names (a YAML string too);
    "none", None or nothing -> []."""
    items = [] if value is None else [value] if isinstance(value, str) else list(value)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO and n != "none"]
    if unknown:
        raise ConfigError(f"mrrm.train: --report-to {', '.join(unknown)}: unknown; choose from "
                          f"{', '.join(REPORT_TO)} or none")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"mrrm.train: --report-to none with {', '.join(sorted(set(names) - {'none'}))}: pick one")
    return list(dict.fromkeys(n for n in names if n != "none"))


def _field_type(f):
    default = f.default
    if isinstance(default, bool):
        return None
    if isinstance(default, int) and f.name not in ("epochs",):
        return int
    if isinstance(default, float) or f.name == "epochs":
        return float
    if f.name == "max_steps":
        return int
    if f.name in ("lr", "video_fps"):
        return float
    return str


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):

    rm_cfg = RewardModelConfig(value_head_type=cfg.head_type, value_head_hidden_dim=cfg.head_hidden,
                               value_head_activation=cfg.head_activation, resp_repr_mode=cfg.resp_repr_mode or "last",
                               mode=cfg.mode, max_length=cfg.max_length, max_batch_tokens=cfg.max_batch_tokens,
                               base_model=cfg.base_model, video_sampling=cfg.video_sampling,
                               description="trained with python -m mrrm.train")
    if cfg.video_fps is not None:
        rm_cfg.video_fps = cfg.video_fps
    if cfg.base_model is None:  # the built-in tiny backbone, trained from scratch: no LoRA

        tok = tiny.build_tokenizer()
        bcfg = tiny.build_config("qwen2_vl", tokenizer=tok, initializer_range=cfg.init_std, **TINY_DEMO_BACKBONE)
        backbone = tiny.build_backbone(bcfg)
        proc = tiny.build_processor("qwen2_vl", tok)
        # Qwen3-VL's chat template: no default system prompt (Qwen2-VL's adds ~20 tokens to every
        # sample, which a from-scratch model gains nothing from)
        proc.chat_template = tok.chat_template = tiny.QWEN3_VL_CHAT_TEMPLATE
        rm_cfg.description = "tiny Qwen2-VL-style model trained from scratch with python -m mrrm.train"
        return _with_media_budgets(RewardModel(backbone, tok, proc, rm_cfg), cfg)

    tok, proc = load_processor(cfg.base_model)
    backbone = load_backbone(cfg.base_model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    ensure_separator_token(tok, backbone)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target
        if target == TrainConfig.lora_target and backbone.config.model_type == "qwen3_5":
            from mrrm.model.qwen35 import LORA_TARGET  # the default on Qwen3.5: its Gated DeltaNet layers too

            target = LORA_TARGET
        backbone = get_peft_model(backbone, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                       lora_dropout=cfg.lora_dropout, target_modules=target))
    if cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    return _with_media_budgets(RewardModel(backbone, tok, proc, rm_cfg), cfg)


def _with_media_budgets(model, cfg: TrainConfig):
    """The model with the config's media budgets (max_image_megapixels, ...) on its encoder."""
    model.encoder.set_media_budgets(media_budgets_from_args(dataclasses.asdict(cfg)))
    return model


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainSample:
    encoded: object          # encoding.EncodedSample
    rankings: list
    family: str | None
    num_tokens: int


def prepare(model, paths, media_dir, *, skip_bad, log=print, drop_media=False):
    """Load and validate every sample (fields, rankings vs responses, media, length) before training.
    Returns (samples per file, bad records). Fail-fast raises with the full list unless skip_bad."""

    per_file, bad = [], []
    for path in paths:
        records, wheres, parse_bad = load_records(path)
        bad += parse_bad
        base_dir = media_dir or os.path.dirname(os.path.abspath(path))
        good = []
        for rec, where in zip(records, wheres):
            if drop_media:
                rec = {k: v for k, v in rec.items() if k not in ("image", "images", "video", "videos")}
            sid = rec.get("id")
            reason = check_rankings(rec)
            if reason is None:
                try:
                    enc = model.encoder.encode(rec, len(good), media_dir=base_dir)
                except SampleError as e:
                    reason = e.reason
            if reason is not None:
                bad.append(BadRecord(where, reason, sid))
                continue
            good.append(TrainSample(enc, list(rec["rankings"]), rec.get("family"), enc.num_tokens))
        per_file.append(good)
    if bad:
        log(f"validation: {len(bad)} bad sample(s):\n  " + "\n  ".join(str(b) for b in bad))
        if not skip_bad:
            raise DataError(f"mrrm.train: {len(bad)} bad sample(s) (listed above); fix them or pass --skip-bad")
    return per_file, bad


def epoch_order(per_file, weights, epoch, seed):
    """Sample indices (file, index) of one epoch: every file shuffled with a generator seeded by
    (seed, epoch); with weights, files are resampled in proportion (with replacement beyond size)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    total = sum(len(s) for s in per_file)
    order = []
    for f, samples in enumerate(per_file):
        n = len(samples)
        want = n if weights is None else round(total * weights[f] / sum(weights))
        idx = torch.cat([torch.randperm(n, generator=g) for _ in range(max(1, math.ceil(want / max(n, 1))))])[:want]
        order += [(f, int(i)) for i in idx]
    perm = torch.randperm(len(order), generator=g).tolist()
    return [order[i] for i in perm]


def shuffled(encoder, sample: TrainSample, seed, epoch, key):
    """The sample with its responses in a random order (deterministic in seed, epoch, key); the
    joint turn is tokenized again in that order (encoder.reorder), as the authors' collate does."""
    g = random.Random(f"{seed}:{epoch}:{key}")
    n = len(sample.rankings)
    perm = list(range(n))
    g.shuffle(perm)
    if perm == sorted(perm):
        return sample.encoded, sample.rankings
    return encoder.reorder(sample.encoded, perm), [sample.rankings[p] for p in perm]


def listwise_loss(scores, group_offsets, rankings, loss):
    """Per-group losses [B] for rankings (1 = best). best: CE against the rank-1 response (uniform
    over tied rank-1 responses); plackett_luce: full rankings, Breslow ties; bradley_terry: mean of
    -log sigmoid(s_i - s_j) over the pairs with rank_i < rank_j."""

    flat = torch.tensor([r for rk in rankings for r in rk], device=scores.device)
    if loss == "plackett_luce":
        return ops.listwise_ce(scores, group_offsets, flat, loss="plackett_luce", reduction="none")
    if loss == "best":
        tops = [[i for i, r in enumerate(rk) if r == min(rk)] for rk in rankings]
        if all(len(t) == 1 for t in tops):
            targets = torch.tensor([t[0] for t in tops], device=scores.device)
            return ops.listwise_ce(scores, group_offsets, targets, loss="best", reduction="none")
        probs = torch.tensor([1.0 / len(t) if i in t else 0.0 for t, rk in zip(tops, rankings) for i in range(len(rk))],
                             device=scores.device, dtype=scores.dtype)
        return ops.listwise_ce(scores, group_offsets, probs, loss="soft", reduction="none")
    out = []
    offs = group_offsets.tolist()
    for b, rk in enumerate(rankings):
        s = scores[offs[b]:offs[b + 1]]
        r = torch.tensor(rk, device=scores.device)
        better = r[:, None] < r[None, :]
        out.append(-torch.nn.functional.logsigmoid(s[:, None] - s[None, :])[better].mean())
    return torch.stack(out)


@torch.no_grad()
def evaluate(model, samples, mode, max_batch_tokens):
    """Best-of-N accuracy (mrrm.common.is_correct: a unique top score on a rank-1 response), overall
    and per family."""
    was = model.training
    model.eval()
    hits, per_family = [], {}
    try:
        for inputs in model.micro_batches([s.encoded for s in samples], mode, max_batch_tokens):
            scores = model(inputs.to(model.device, model.dtype)).float().cpu()
            pb = inputs.packed
            offs = pb.group_offsets.tolist()
            for b, idx in enumerate(pb.sample_indices):
                s = samples[idx]
                hit = is_correct(scores[offs[b]:offs[b + 1]].tolist(), s.rankings)
                hits.append(hit)
                per_family.setdefault(s.family or "all", []).append(hit)
    finally:
        model.train(was)
    return {"best_of_n": sum(hits) / max(len(hits), 1), "n": len(hits),
            "per_family": {k: sum(v) / len(v) for k, v in sorted(per_family.items())}}


@torch.no_grad()
def compare_scoring(model, samples, max_batch_tokens) -> dict:
    """The paper's claim on `samples`: scored jointly (the N responses in one sequence, the media encoded
    once) and singly (one sequence per response, the media encoded N times), each mode in one timed
    scoring pass over all the samples (RewardModel.score_encoded) and its FLOPs counted by
    torch.utils.flop_counter.FlopCounterMode in a pass of its own before it (which also warms the mode up;
    mrrm's ops count every packed sequence's full square of attention, the "dense" convention of
    mrrm.eval.flops). Returns {samples, joint_s, single_s, speedup, joint_flops, single_flops, flops_ratio}."""
    encoded = [s.encoded for s in samples]
    out = {"samples": len(encoded)}
    for mode in ("joint", "single"):
        with FlopCounterMode(display=False) as counter:
            model.score_encoded(encoded, mode=mode, max_batch_tokens=max_batch_tokens)
        t0 = time.perf_counter()
        model.score_encoded(encoded, mode=mode, max_batch_tokens=max_batch_tokens)  # scores come back on the CPU:
        out[f"{mode}_s"] = round(time.perf_counter() - t0, 4)                      # a GPU's work is finished
        out[f"{mode}_flops"] = int(counter.get_total_flops())
    out["speedup"] = round(out["single_s"] / max(out["joint_s"], 1e-9), 3)
    out["flops_ratio"] = round(out["single_flops"] / max(out["joint_flops"], 1), 3)
    return {k: out[k] for k in ("samples", "joint_s", "single_s", "speedup", "joint_flops", "single_flops", "flops_ratio")}


def scoring_line(c: dict) -> str:
    """compare_scoring's result in one line."""
    def secs(x):
        return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"
    speed = f"{c['speedup']:.1f}x faster" if c["speedup"] >= 1 else f"{1 / c['speedup']:.1f}x slower"
    flops = f"{c['flops_ratio']:.1f}x fewer" if c["flops_ratio"] >= 1 else f"{1 / c['flops_ratio']:.1f}x more"
    return (f"held-out ({c['samples']} samples): joint {secs(c['joint_s'])} vs single {secs(c['single_s'])} ({speed}), "
            f"FLOPs {flops}")


# ---------------------------------------------------------------------------------------------
# what a run writes besides checkpoints: config.yaml, the trackers, curves.png
# ---------------------------------------------------------------------------------------------
def write_config(cfg: TrainConfig, path: str) -> None:
    """Every TrainConfig field of the (resolved) run to `path`, as YAML that `--config` takes back."""
    with writing(path), open(path, "w") as fh:
        fh.write("# mrrm.train's resolved configuration; `python -m mrrm.train --config config.yaml --output-dir NEW` "
                 "reruns it\n")
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False, default_flow_style=False)


def check_trackers(report_to) -> None:
    """ConfigError naming the pip extra for a --report-to tracker that is not installed."""
    for name in report_to:
        try:
            if name == "tensorboard":
                # optional (the tensorboard extra), imported only to check it is there
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            elif name == "wandb":
                import wandb  # noqa: F401  (optional: the wandb extra)
        except ImportError as e:
            raise ConfigError(f"mrrm.train: --report-to {name} needs the {name} package: pip install "
                              f"'mrrm[{REPORT_TO[name]}]' ({e})") from None


def _scalars(record: dict, prefix: str = "") -> dict:
    """The numbers of a log.jsonl record, nested keys joined by "/" ({"eval": {"best_of_n"}} -> eval/best_of_n)."""
    out = {}
    for key, value in record.items():
        if key in ("step", "final"):
            continue
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


class Trackers:
    """The --report-to experiment trackers (main process): each gets the numbers of every log.jsonl record
    at its step. TensorBoard writes output_dir/tensorboard/; W&B runs wandb.init(project=WANDB_PROJECT or
    "mrrm", dir=output_dir, config=the resolved TrainConfig), in the mode WANDB_MODE says (offline: no
    network, the run in output_dir/wandb/)."""

    def __init__(self, cfg: TrainConfig):
        self.tb = self.wandb = None
        if "tensorboard" in cfg.report_to:
            # optional (the tensorboard extra; check_trackers named it if missing)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if "wandb" in cfg.report_to:
            import wandb  # optional (the wandb extra; check_trackers named it if missing)

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, dir=cfg.output_dir,
                                    config=dataclasses.asdict(cfg))

    def log(self, record: dict, prefix: str = "") -> None:
        scalars = _scalars(record, prefix)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _moving_average(values, window):
    if window <= 1 or len(values) < window:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_curves(output_dir: str, log=print) -> str | None:
    """output_dir/curves.png from log.jsonl: the training loss, the training batches' accuracy (best-of-N)
    and the held-out best-of-N over the steps (thin: as logged; thick: a moving average over ~1/25 of
    the run). Needs matplotlib (the eval extra): without it, one line says so. Returns the path or None."""
    try:
        # optional (the eval extra), and only needed here: the object API, no pyplot, no global backend
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log(f"{CURVES_FILE} not written: matplotlib is not installed (pip install 'mrrm[eval]')")
        return None
    train_steps, loss, acc, eval_steps, held_out = [], [], [], [], []
    with open(os.path.join(output_dir, "log.jsonl")) as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "loss" in r:
                train_steps.append(r["step"])
                loss.append(r["loss"])
                acc.append(r.get("acc"))
            if isinstance(r.get("eval"), dict) and "best_of_n" in r["eval"]:
                eval_steps.append(r["step"])
                held_out.append(r["eval"]["best_of_n"])
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    window = max(1, len(train_steps) // 25)
    ax_loss.plot(train_steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8)
    ax_loss.plot(train_steps, _moving_average(loss, window), color="tab:blue", label="training loss")
    ax_loss.set(xlabel="step", ylabel="listwise loss", title="training loss")
    if acc and all(a is not None for a in acc):
        ax_acc.plot(train_steps, acc, color="tab:orange", alpha=0.3, linewidth=0.8)
        ax_acc.plot(train_steps, _moving_average(acc, window), color="tab:orange", label="training batches")
    if eval_steps:
        ax_acc.plot(eval_steps, held_out, "o-", color="tab:green", label="held-out")
    ax_acc.set(xlabel="step", ylabel="best-of-N accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    path = os.path.join(output_dir, CURVES_FILE)
    with writing(path):
        fig.savefig(path, dpi=100)
    log(f"curves: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_signature(cfg, data_paths) -> dict:
    """What a resumed run is compared with (resume_changes): the training files' content and every
    setting of the (resolved) config but the bookkeeping ones and those checked by the checkpoint's kind."""
    skip = set(RESUME_BOOKKEEPING) | set(RESUME_BY_KIND) | {"data"}
    signature = {"data": [sha256_file(p) for p in data_paths]}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in skip:
            value = getattr(cfg, f.name)
            signature[f.name] = list(value) if isinstance(value, tuple) else value
    return signature


_NOT_RECORDED = "<not recorded>"


def resume_changes(saved: dict | None, current: dict) -> dict:
    """The settings `current` changes against the checkpoint's `saved` signature, by kind:
    {"fixed": [...], "forced": [...], "recorded": [...]}, each a list of (name, old, new). A setting the
    checkpoint did not record (an older mrrm wrote it) counts as a forced change, old = "<not recorded>"."""
    saved = saved or {}
    out = {"fixed": [], "forced": [], "recorded": []}
    for name, new in current.items():
        old = saved.get(name, _NOT_RECORDED)
        if old == new:
            continue
        kind = "fixed" if name in RESUME_FIXED and old != _NOT_RECORDED else "recorded" \
            if name in RESUME_RECORDED else "forced"
        out[kind].append((name, old, new))
    return out


def _describe(changes) -> str:
    def one(name, old, new):
        if name == "data":
            return "data (the training files' contents)"
        return f"{name} {old if old == _NOT_RECORDED else repr(old)} -> {new!r}"
    return ", ".join(one(*c) for c in changes)


def save_checkpoint(out_dir, step, model, optimizer, scheduler, position, keep_last, signature=None, states=None,
                    extra_dir=None, history=None):
    """Atomically: write into a temp dir, then rename; keep the last `keep_last` checkpoints. The temp dir
    gets state.pt (model, optimizer, scheduler, RNG, data position, step: tensors and plain values only, so
    a resume reads it without unpickling code) and a checksum manifest (`checksums.sha256`, mrrm.integrity)
    over every file in it, written last. `signature` (run_signature) is kept to check a resume against;
    `history`: the settings changed by earlier resumes (model/'s training record). `states`: (model state,
    optimizer state) already gathered (a sharded run's full states). `extra_dir`: a directory moved into
    the checkpoint as `deepspeed/` (DeepSpeed's own partition files), covered by the manifest too."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, f"step-{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(os.path.join(tmp, "state.pt")):
            os.makedirs(tmp)
            trainable, optim_state = states if states is not None else (model.state_dict(), optimizer.state_dict())
            torch.save({"model": trainable, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                        "rng": rng_state(), "position": position, "step": step, "signature": signature,
                        "history": list(history or [])},
                       os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "state.pt"), "rb") as fh:
                os.fsync(fh.fileno())
        if extra_dir is not None:
            os.rename(extra_dir, os.path.join(tmp, "deepspeed"))
        with writing(os.path.join(tmp, MANIFEST)):
            write_manifest(tmp)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took; the older checkpoints are untouched
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def checkpoints_newest_first(out_dir) -> list[str]:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    return [os.path.join(root, d) for d in reversed(done)]


def latest_checkpoint(out_dir):
    done = [d for d in checkpoints_newest_first(out_dir) if os.path.exists(os.path.join(d, "state.pt"))]
    return done[0] if done else None


# A checkpoint mrrm wrote before its manifest covered every file: the SHA-256 of state.pt alone
LEGACY_STATE_SHA = "state.sha256"


def _unverified_reason(path) -> str | None:
    """Why the checkpoint at `path` cannot be verified (None: it can). Raises ChecksumError when a file
    does not match."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        verify_manifest(path)
        return None
    if os.path.exists(os.path.join(path, LEGACY_STATE_SHA)):
        with open(os.path.join(path, LEGACY_STATE_SHA)) as fh:
            if fh.read().strip() != sha256_file(os.path.join(path, "state.pt")):
                raise ChecksumError(f"{os.path.join(path, 'state.pt')}: does not match its SHA-256 ({LEGACY_STATE_SHA}): "
                                    "the file is damaged")
        if not os.path.isdir(os.path.join(path, "deepspeed")):
            return None  # state.pt is all a resume reads: its SHA-256 covers it
        return f"no {MANIFEST}: its {LEGACY_STATE_SHA} (an older mrrm's) covers state.pt but not deepspeed/"
    return f"no {MANIFEST} to verify its files against"


def load_intact_checkpoint(out_dir, log=print, *, unverified=False):
    """(path, state) of the newest checkpoint whose files all match its checksum manifest and whose
    state.pt loads (without unpickling code: mrrm.integrity.load_torch_file); every checkpoint skipped
    is named with the reason. A checkpoint without a manifest is skipped unless `unverified`
    (--resume-unverified), which resumes it unchecked and says so. (None, None) when there are none;
    ConfigError when there are some but none is intact (training would otherwise restart silently)."""
    bad = []
    for path in checkpoints_newest_first(out_dir):
        state_file = os.path.join(path, "state.pt")
        reason = None
        if not os.path.exists(state_file):
            reason = "no state.pt"
        else:
            try:
                missing = _unverified_reason(path)
            except ChecksumError as e:
                reason = str(e)
            else:
                if missing is not None and not unverified:
                    reason = f"{missing}; pass --resume-unverified to resume it unchecked"
                elif missing is not None:
                    log(f"checkpoint {path}: {missing}; resuming it UNVERIFIED (--resume-unverified)")
        if reason is None:
            try:
                return path, load_torch_file(state_file)
            except (FileNotFoundError, ValueError) as e:  # refused (pickled code), truncated, empty, not a
                reason = f"state.pt does not load ({e})"   # checkpoint: try the previous one
        log(f"checkpoint {path} skipped: {reason}")
        bad.append(f"{path} ({reason})")
    if bad:
        raise ConfigError("mrrm.train: no intact checkpoint to resume from: " + "; ".join(bad)
                         + ". Delete them (or use a new --output-dir) to start over.")
    return None, None


def make_scheduler(optimizer, cfg, total_steps):
    def factor(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# the loop, in the manner of torchtune's recipes: train() = setup -> one train_step per global
# batch (with its logging, evaluation and checkpoint) -> finish, the pieces sharing a TrainState
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What setup builds and the loop advances."""
    cfg: TrainConfig                 # resolved (_resolve_config): no None left among lr, loss, resp_repr_mode
    accel: object                    # accelerate.Accelerator
    model: object                    # the bare RewardModel: encoder, checkpoints, evaluation, save_pretrained
    ddp_model: object                # the model as accel.prepare wrapped it: the training forward and backward
    optimizer: object
    scheduler: object
    params: list                     # the trainable parameters
    per_file: list                   # training samples per data file (prepare)
    eval_samples: list
    total_steps: int
    step: int = 0
    position: dict = field(default_factory=lambda: {"epoch": 0, "offset": 0})  # next sample in the epoch order
    order: list = field(default_factory=list)   # the current epoch's (file, index) order (epoch_order)
    trackers: object = None          # Trackers (--report-to): main process
    bar: object = None               # tqdm progress bar
    t0: float = 0.0                  # the loop's start: wall clock (time.time) ...
    cpu0: float = 0.0                # ... and this process's CPU time, all its threads (time.process_time)
    tokens_seen: int = 0             # this rank's tokens since t0
    signature: dict | None = None    # run_signature, saved with every checkpoint
    zero3: bool = False              # DeepSpeed ZeRO-3: parameters partitioned, as under --fsdp
    history: list = field(default_factory=list)  # settings changed by resumes (_maybe_resume), saved with checkpoints

    @property
    def sharded_params(self) -> bool:
        """The parameters live in shards: every rank runs evaluation's passes, full states are gathered."""
        return self.cfg.fsdp or self.zero3

    @property
    def log_path(self):
        return os.path.join(self.cfg.output_dir, "log.jsonl")


def train(cfg: TrainConfig) -> dict:
    try:
        media_budgets_from_args(dataclasses.asdict(cfg))  # checked first; build_model sets them on the encoder
    except ValueError as e:
        raise ConfigError(f"mrrm.train: {e}") from None
    cfg = dataclasses.replace(cfg, report_to=report_targets(cfg.report_to))
    check_trackers(cfg.report_to)  # before anything loads: a tracker asked for and not installed is named now
    accel = _setup_accelerator(cfg)
    cfg = _resolve_config(cfg)
    n_threads, line = threads.apply(cfg.threads)
    cfg = dataclasses.replace(cfg, threads=n_threads)
    accel.print(line)
    if accel.is_main_process:
        write_config(cfg, os.path.join(cfg.output_dir, RUN_CONFIG_FILE))
    data_paths, eval_path = _data_paths(cfg, accel)
    st = _setup(cfg, accel, data_paths, eval_path)
    while st.step < st.total_steps:
        metrics = train_step(st, _next_batch(st))
        _log_metrics(st, metrics)
        _maybe_evaluate(st)
        _maybe_save(st)
    return _finish(st)


# accelerate launch --config_file X sets these from the config's distributed_type (not with --cpu, which
# drops the FSDP / DeepSpeed section before the script starts: nothing is left to check then)
_SHARDING_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def check_sharding_request(environ, distributed_type: str) -> None:
    """Refuse a run whose launcher config asks for accelerate's FSDP or DeepSpeed: accelerate applies
    them on CUDA GPUs only (on CPU it silently runs DDP, `MULTI_CPU`, every rank holding the whole
    model), and mrrm.train does not train correctly under accelerate's wrapping (clipping would see
    no gradients of sharded parameters, checkpoints keep one rank's shards, evaluation runs on one
    rank). Sharding is `--fsdp` under a data-parallel launch (mrrm.train.sharding). Either way the run
    would not be what the config says, so it stops before loading anything."""
    asked = [name for name, var in _SHARDING_ENV.items() if environ.get(var, "").lower() in ("1", "true", "yes")]
    if not asked:
        return
    got = distributed_type.rsplit(".", 1)[-1]
    if got != asked[0]:
        raise ConfigError(f"mrrm.train: the accelerate config asks for {asked[0]} but this run is {got} "
                         f"({asked[0]} needs CUDA GPUs under accelerate; on CPU it would silently train unsharded "
                         "data-parallel); use a data-parallel config (distributed_type: MULTI_GPU / MULTI_CPU), "
                         "with --fsdp to shard (mrrm.train applies FSDP2 itself)")
    raise ConfigError(f"mrrm.train: accelerate's {asked[0]} is not supported: under it gradient clipping, checkpoints "
                     "and evaluation would be wrong (sharded parameters). Launch data-parallel (distributed_type: "
                     "MULTI_GPU) and pass --fsdp: mrrm.train applies FSDP2 itself (mrrm.train.sharding)")


def _setup_accelerator(cfg):
    """The accelerator (one process, or one of a data-parallel group), the seeds, the output dir."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accel = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.bf16 else "no",
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    check_sharding_request(os.environ, str(accel.distributed_type))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:  # before any model or data is loaded: an unwritable output directory fails here, by name
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write-test-{os.getpid()}")  # one per process: ranks share the dir
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"mrrm.train: --output-dir {cfg.output_dir!r}: cannot write there "
                         f"({e.strerror or type(e).__name__})") from None
    return accel


def _resolve_config(cfg):
    """The defaults that depend on other fields: the learning rate by backbone, the demo's recipe on the
    built-in demo data, and the paper's loss and response representation otherwise."""
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=SCRATCH_LR if cfg.base_model is None else LORA_LR)
    if list(cfg.data) == ["demo"]:
        if cfg.max_steps is None:
            cfg = dataclasses.replace(cfg, max_steps=DEMO_STEPS)
        if cfg.loss is None:
            cfg = dataclasses.replace(cfg, loss=DEMO_LOSS)
        if cfg.resp_repr_mode is None:
            cfg = dataclasses.replace(cfg, resp_repr_mode=DEMO_RESP_REPR)
        if cfg.video_fps is None and cfg.base_model is None:
            cfg = dataclasses.replace(cfg, video_fps=DEMO_VIDEO_FPS)
    if cfg.loss is None:
        cfg = dataclasses.replace(cfg, loss="best")
    if cfg.resp_repr_mode is None:
        cfg = dataclasses.replace(cfg, resp_repr_mode="last")
    return cfg


def _data_paths(cfg, accel):
    """(training files, held-out file or None); the demo's are generated into output_dir/data."""
    if list(cfg.data) != ["demo"]:
        return list(cfg.data), cfg.eval_data

    data_dir = os.path.join(cfg.output_dir, "data")
    if accel.is_main_process:
        # in a fresh interpreter: generated in this process, a clip now and then came out
        # encoded differently run to run (demo.generate_in_subprocess)
        try:
            demo.generate_in_subprocess(cfg.demo_train_size, cfg.seed, os.path.join(data_dir, "train"))
            demo.generate_in_subprocess(cfg.demo_eval_size, cfg.seed + 10_000, os.path.join(data_dir, "eval"))
        except RuntimeError as e:
            raise ConfigError(f"mrrm.train: {e}") from None
    accel.wait_for_everyone()
    return [os.path.join(data_dir, "train", "data.jsonl")], cfg.eval_data or os.path.join(data_dir, "eval", "data.jsonl")


def _setup(cfg, accel, data_paths, eval_path) -> TrainState:
    """Model -> data -> optimizer and scheduler -> resume -> accelerate's wrapping -> logging."""
    model = build_model(cfg)
    per_file, eval_samples, total_steps = _setup_data(cfg, model, data_paths, eval_path, accel.print)
    if cfg.fsdp:  # sharded in place before the optimizer sees the parameters (they become DTensors)

        model.to(accel.device)
        units = sharding.shard(model, bf16=cfg.bf16 and accel.device.type == "cuda")
        accel.print(f"FSDP2: {units} decoder layers sharded over {accel.num_processes} processes")
    params, optimizer, scheduler = _setup_optim(cfg, model, total_steps)
    signature = run_signature(cfg, data_paths)
    step, position, resumed, history = _maybe_resume(cfg, model, optimizer, scheduler, accel.print, signature)
    zero3 = False
    if cfg.fsdp:
        ddp_model = model  # no DDP wrapper: FSDP's hooks do the communication
    elif cfg.deepspeed:

        model.to(accel.device)
        ds_cfg = sharding.deepspeed_config(cfg.deepspeed, max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16)
        zero3 = sharding.zero_stage(ds_cfg) == 3
        if zero3:
            sharding.prepare_zero3(model)
        ddp_model, optimizer = sharding.deepspeed_engine(model, optimizer, ds_cfg)
        if resumed is not None:  # the optimizer partitions: DeepSpeed's files in the checkpoint, verified with the
            sharding.load_partitions_safely(ddp_model)  # rest (load_intact_checkpoint), read without pickled code
            try:
                ddp_model.load_checkpoint(os.path.join(resumed, "deepspeed"), tag="zero", load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
            except ValueError as e:  # UnsafeFileError (a refused partition) or an unreadable one, named
                raise ConfigError(f"mrrm.train: cannot resume DeepSpeed's partitions: {e}") from None
        accel.print(f"DeepSpeed ZeRO-{ds_cfg.get('zero_optimization', {}).get('stage', 0)} over "
                    f"{accel.num_processes} processes")
    else:
        ddp_model, optimizer = accel.prepare(model, optimizer)
    st = TrainState(cfg, accel, model, ddp_model, optimizer, scheduler, params, per_file, eval_samples, total_steps,
                    step=step, position=position, signature=signature, zero3=zero3, history=history)
    if accel.is_main_process:
        _drop_log_after(st.log_path, step)
    st.trackers = Trackers(cfg if accel.is_main_process else dataclasses.replace(cfg, report_to=[]))
    from tqdm.auto import tqdm

    st.bar = tqdm(total=total_steps, initial=step, disable=not accel.is_main_process, desc="train")
    st.t0, st.cpu0, st.tokens_seen = time.time(), time.process_time(), 0
    st.order = epoch_order(per_file, cfg.data_weights, position["epoch"], cfg.seed)
    return st


def _setup_data(cfg, model, data_paths, eval_path, log):
    """(training samples per file, held-out samples, total steps), every sample validated."""
    per_file, _ = prepare(model, data_paths, cfg.media_dir, skip_bad=cfg.skip_bad, log=log, drop_media=cfg.drop_media)
    eval_samples = prepare(model, [eval_path], cfg.media_dir, skip_bad=True, log=log,
                           drop_media=cfg.drop_media)[0][0] if eval_path else []
    n_train = sum(len(s) for s in per_file)
    if n_train == 0:
        raise DataError("mrrm.train: no usable training sample")
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))  # weighted files resample to the same total
    total_steps = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    return per_file, eval_samples, total_steps


def _setup_optim(cfg, model, total_steps):
    """(trainable parameters, AdamW over them, the LR schedule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    return params, optimizer, scheduler


def _maybe_resume(cfg, model, optimizer, scheduler, log, signature=None):
    """(step, position, checkpoint path, history) of the newest intact checkpoint in output_dir, its state
    loaded; (0, the start, None, []) without one. The run's settings are compared with the checkpoint's
    (resume_changes): a change that makes it another model (RESUME_FIXED) is refused; one that changes the
    data or what a step computes is refused unless --force-resume; each is named, old -> new. The changes
    that go through are appended to the history that model/'s training record carries."""
    resume, state = load_intact_checkpoint(cfg.output_dir, log, unverified=cfg.resume_unverified)
    if resume is None:
        return 0, {"epoch": 0, "offset": 0}, None, []
    history = list(state.get("history") or [])
    if signature is not None:
        changes = resume_changes(state.get("signature"), signature)
        if changes["fixed"]:
            also = f" (and, --force-resume aside: {_describe(changes['forced'])})" if changes["forced"] else ""
            raise ConfigError(f"mrrm.train: {resume} was written with settings a resume cannot change: "
                             f"{_describe(changes['fixed'])}{also}. The model's head, representation, LoRA, base "
                             "and precision make it another model, and its optimizer state holds lr and "
                             "weight_decay (it would keep the old values): resume with the checkpoint's settings, "
                             "or use a new --output-dir.")
        if changes["forced"] and not cfg.force_resume:
            raise ConfigError(f"mrrm.train: {resume} was written by a run with other settings: "
                             f"{_describe(changes['forced'])}; resuming would not continue that run. Use the same "
                             "settings, a new --output-dir, or --force-resume to continue with the new ones (recorded "
                             "in model/'s training record).")
        if changes["forced"]:
            log(f"resuming despite changed {_describe(changes['forced'])} (--force-resume)")
        if changes["recorded"]:
            log(f"resuming with {_describe(changes['recorded'])}")
        changed = {name: [None if old == _NOT_RECORDED else old, new]
                   for name, old, new in changes["forced"] + changes["recorded"]}
        if "data" in changed:
            changed["data"] = "the training files' contents changed"  # (their SHA-256s would tell a reader nothing)
        if changed:
            history.append({"step": int(state["step"]), "changed": changed})

    kind = "deepspeed" if state["optimizer"].get("deepspeed") else "fsdp" if optimizer_state_by_name(state["optimizer"]) \
        else "plain"
    want = "deepspeed" if cfg.deepspeed else "fsdp" if cfg.fsdp else "plain"
    if kind != want:
        how = {"deepspeed": "with --deepspeed", "fsdp": "with --fsdp", "plain": "without --fsdp / --deepspeed"}
        raise ConfigError(f"mrrm.train: {resume} was written by a run {how[kind]}; resume it the same way, or use a "
                         "new --output-dir")
    if cfg.fsdp:
        load_full_state(model, state["model"], optimizer, state["optimizer"])
    elif cfg.deepspeed:  # the model now; the optimizer partitions once the engine exists (_setup)
        model.load_state_dict(state["model"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step, position = state["step"], state["position"]
    set_rng_state(state["rng"])
    log(f"resumed from {resume} (step {step})")
    return step, position, resume, history


def _drop_log_after(log_path, step):
    """On a resume at `step`: log.jsonl's records of later steps (written before the interruption, and
    about to be written again) and a finished run's final record are dropped, atomically, so no step is
    logged twice."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
            if record.get("step", 0) > step or record.get("final"):  # this run writes its own final record
                continue
        except ValueError:
            continue  # a line torn by the interruption
        keep.append(line)
    if len(keep) != len(lines):
        tmp = log_path + ".tmp"
        with writing(tmp), open(tmp, "w") as fh:
            fh.writelines(keep)
        os.replace(tmp, log_path)


def _next_batch(st: TrainState):
    """The (file, index) keys of the next global batch; a new epoch's order when this one is used up."""
    if st.position["offset"] >= len(st.order):
        st.position = {"epoch": st.position["epoch"] + 1, "offset": 0}
        st.order = epoch_order(st.per_file, st.cfg.data_weights, st.position["epoch"], st.cfg.seed)
    batch_keys = st.order[st.position["offset"]: st.position["offset"] + st.cfg.batch_size]
    st.position = {"epoch": st.position["epoch"], "offset": st.position["offset"] + st.cfg.batch_size}
    return batch_keys


def _my_micro_batches(st: TrainState, batch_keys):
    """(packed micro-batches of this rank's share of the batch, the rankings of its samples), each
    sample's responses shuffled unless --no-shuffle-responses."""
    cfg, world, rank = st.cfg, st.accel.num_processes, st.accel.process_index
    units, ranks_of = [], []
    for f, i in batch_keys[rank::world]:
        s = st.per_file[f][i]
        enc, rk = shuffled(st.model.encoder, s, cfg.seed, st.position["epoch"], f"{f}:{i}") if cfg.shuffle_responses \
            else (s.encoded, s.rankings)
        units.append(enc)
        ranks_of.append(rk)
    micro = list(st.model.micro_batches(units, cfg.mode, cfg.max_batch_tokens)) if units else []
    return micro, ranks_of


def train_step(st: TrainState, batch_keys) -> dict:
    """One optimizer step over the micro-batches of one global batch (gradients accumulated, synced
    on the last micro-batch); returns the step's metrics, the loss and accuracy over all ranks."""
    cfg, accel, world = st.cfg, st.accel, st.accel.num_processes
    micro, ranks_of = _my_micro_batches(st, batch_keys)
    real = len(micro)
    if cfg.fsdp or cfg.deepspeed:  # every rank runs as many passes (the same collectives), extra ones with zero loss

        micro = micro + [micro[-1] if micro else _padding_batch(st)] * (aligned_count(real, accel.device) - real)
    elif not micro and world > 1:  # a rank that drew no sample still joins DDP's gradient all-reduce,
        micro = [_padding_batch(st)]  # through a forward of the wrapped model (a bare backward would hang)
    loss_sum = torch.zeros((), device=accel.device)
    hits = torch.zeros((), device=accel.device)
    for k, inputs in enumerate(micro):
        rk = [ranks_of[j] for j in inputs.packed.sample_indices] if k < real else None
        sync = k == len(micro) - 1
        if cfg.deepspeed:  # DeepSpeed reduces the gradients and steps at the step's last micro-batch only
            st.ddp_model.set_gradient_accumulation_boundary(sync)
        with (accel.no_sync(st.ddp_model) if not sync and world > 1 and not (cfg.fsdp or cfg.deepspeed)
              else contextlib.nullcontext()):
            scores = st.ddp_model(inputs.to(accel.device, st.model.dtype))
            if rk is None:  # padding: the same collectives, no contribution
                _backward(st, scores.float().sum() * 0.0)
                continue
            per_group = listwise_loss(scores.float(), inputs.packed.group_offsets.to(accel.device), rk, cfg.loss)
            # normalised by the GLOBAL batch: the mean over ranks DDP (or FSDP's reduce-scatter) takes
            # then gives sum / batch
            loss = per_group.sum() * world / len(batch_keys)
            _backward(st, loss)
        loss_sum += per_group.detach().sum()
        offs, flat = inputs.packed.group_offsets.tolist(), scores.detach().float().tolist()
        hits += sum(is_correct(flat[offs[b]:offs[b + 1]], ranks) for b, ranks in enumerate(rk))
        st.tokens_seen += inputs.packed.num_tokens
    grad_norm = None
    if cfg.deepspeed:  # clipping (gradient_clipping), the optimizer step and zero_grad happened in engine.step()
        norm = st.ddp_model.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    elif cfg.max_grad_norm:
        if cfg.fsdp:  # on the sharded parameters (DTensors): the norm is all-reduced over the shards
            norm = torch.nn.utils.clip_grad_norm_(st.params, cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        else:
            grad_norm = float(accel.clip_grad_norm_(st.params, cfg.max_grad_norm))
    if not cfg.deepspeed:
        st.optimizer.step()
    st.scheduler.step()
    if not cfg.deepspeed:
        st.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    totals = accel.reduce(torch.stack([loss_sum, hits]), reduction="sum")
    metrics = {"step": st.step, "loss": float(totals[0]) / len(batch_keys), "acc": float(totals[1]) / len(batch_keys),
               "lr": st.scheduler.get_last_lr()[0], "tokens_per_s": st.tokens_seen * world / (time.time() - st.t0),
               "elapsed_s": round(time.time() - st.t0, 3), "cpu_s": round(time.process_time() - st.cpu0, 3)}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm  # before clipping
    return metrics


def _backward(st: TrainState, loss) -> None:
    """loss.backward through accelerate, or through the DeepSpeed engine (then engine.step(), which
    steps the optimizer only at the accumulation boundary set for this micro-batch)."""
    if st.cfg.deepspeed:
        st.ddp_model.backward(loss)
        st.ddp_model.step()
    else:
        st.accel.backward(loss)


def _padding_batch(st: TrainState):
    """A micro-batch for a rank that drew no sample this step (a sharded run pads with it): the
    first training sample, packed as training packs it."""
    first = next(s for samples in st.per_file for s in samples)
    return next(iter(st.model.micro_batches([first.encoded], st.cfg.mode, st.cfg.max_batch_tokens)))


def _append_jsonl(path, record):
    with writing(path), open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _log_metrics(st: TrainState, metrics):
    """The progress bar every step; log.jsonl and the trackers every log_every steps and at the last."""
    st.bar.update(1)
    st.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    if st.accel.is_main_process and (st.step % st.cfg.log_every == 0 or st.step == st.total_steps):
        _append_jsonl(st.log_path, metrics)
        st.trackers.log(metrics, prefix="train/")


def _maybe_evaluate(st: TrainState):
    """Held-out best-of-N every eval_every steps (main process) but the last (_finish evaluates there)."""
    cfg = st.cfg
    if not (cfg.eval_every and st.step % cfg.eval_every == 0 and st.eval_samples) or st.step == st.total_steps:
        return
    if st.accel.is_main_process or st.sharded_params:  # a sharded model evaluates on every rank (the same passes)
        ev = evaluate(st.model, st.eval_samples, cfg.mode, cfg.max_batch_tokens)
    if st.accel.is_main_process:
        record = {"step": st.step, "eval": ev}
        _append_jsonl(st.log_path, record)
        st.trackers.log(record)


def _maybe_save(st: TrainState):
    """A checkpoint every save_every steps but the last (_finish saves that one)."""
    cfg = st.cfg
    if cfg.save_every and st.step % cfg.save_every == 0 and st.step < st.total_steps:
        _save(st)
        st.accel.wait_for_everyone()


def _save(st: TrainState) -> None:
    """This step's checkpoint, written by the main process (a sharded run gathers the full states
    on every rank first)."""
    cfg = st.cfg
    states = extra = None
    if cfg.fsdp:

        states = full_state(st.model, st.optimizer)
    elif cfg.deepspeed:  # every rank writes its optimizer partition (DeepSpeed's format); state.pt the rest
        extra = os.path.join(cfg.output_dir, "checkpoints", f"step-{st.step:08d}.deepspeed.tmp")
        if st.accel.is_main_process:
            shutil.rmtree(extra, ignore_errors=True)
        st.accel.wait_for_everyone()
        with writing(extra):
            st.ddp_model.save_checkpoint(extra, tag="zero", save_latest=False)
        st.accel.wait_for_everyone()
        if st.zero3:  # the full model, gathered layer by layer on rank 0

            states = (zero3_full_state(st.ddp_model), {"deepspeed": True})
        else:
            states = (st.model.state_dict(), {"deepspeed": True})
    if st.accel.is_main_process:
        save_checkpoint(cfg.output_dir, st.step, st.model, st.optimizer, st.scheduler, st.position, cfg.keep_last,
                        signature=st.signature, states=states, extra_dir=extra, history=st.history)


def _finish(st: TrainState) -> dict:
    """The final checkpoint, model/, the final evaluation and the joint-vs-single scoring comparison on the
    held-out set (log.jsonl's final record), summary.json and curves.png; returns the summary."""
    cfg, accel = st.cfg, st.accel
    st.bar.close()
    summary = {"steps": st.step, "seconds": round(time.time() - st.t0, 1)}
    _save(st)
    if st.sharded_params and st.eval_samples:  # every rank runs the sharded model's evaluation passes
        summary["eval"] = evaluate(st.model, st.eval_samples, cfg.mode, cfg.max_batch_tokens)
    if accel.is_main_process:
        _save_final_model(st)
        if st.eval_samples:
            if not st.sharded_params:
                summary["eval"] = evaluate(st.model, st.eval_samples, cfg.mode, cfg.max_batch_tokens)
            print_table(summary["eval"])
            _record_evaluation(os.path.join(cfg.output_dir, "model"), cfg, st.step, summary["eval"], st.history)
            if not st.sharded_params:  # the paper's claim, measured on this run's held-out set
                summary["scoring"] = compare_scoring(st.model, st.eval_samples, cfg.max_batch_tokens)
            final = {"step": st.step, "final": True, "eval": summary["eval"]}
            if "scoring" in summary:
                final["scoring"] = summary["scoring"]
            _append_jsonl(st.log_path, final)
            st.trackers.log(final)
        st.trackers.close()
        with writing(os.path.join(cfg.output_dir, "summary.json")), \
                open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        write_curves(cfg.output_dir, log=accel.print)
        accel.print(f"done: {st.step} steps in {summary['seconds']} s; model saved to {os.path.join(cfg.output_dir, 'model')}")
        if "scoring" in summary:
            accel.print(scoring_line(summary["scoring"]))
        elif st.eval_samples:
            accel.print("joint vs single scoring: not measured (the model is sharded over the processes)")
    accel.wait_for_everyone()
    # tear the process group down before exit: gloo's threads otherwise abort the interpreter at exit
    # ("terminate called without an active exception") and torchrun reports a failed rank
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def _save_final_model(st: TrainState) -> None:
    """model/ for mrrm.load (main process). A sharded model is saved through an unsharded copy
    holding the newest checkpoint's full state (save_pretrained cannot write DTensors)."""
    out = os.path.join(st.cfg.output_dir, "model")
    model = st.model
    if st.sharded_params:
        newest = checkpoints_newest_first(st.cfg.output_dir)[0]
        model = build_model(st.cfg)
        model.load_state_dict(load_torch_file(os.path.join(newest, "state.pt"))["model"])
    model.config.training = training_record(st.cfg, st.step, history=st.history)
    with writing(out):
        model.save_pretrained(out)


def training_record(cfg: TrainConfig, steps: int, evaluation: dict | None = None, history=None) -> dict:
    """What the model card says about training (RewardModelConfig.training): the command that reruns it
    (the flags that differ from the defaults), the data files, the steps, the held-out evaluation, and
    `resumed`: the settings a resume changed, at which step (old -> new), when any did (the command then
    names the last values, and did not run with them from the start)."""
    import shlex

    args = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == default or f.name in ("output_dir", "force_resume", "resume_unverified", "threads"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    if cfg.base_model is None and list(cfg.data) != ["demo"]:  # the tiny backbone on the user's data: asked for
        args = ["--base-model", TINY, *args]
    record = {"command": shlex.join(["python", "-m", "mrrm.train", *args]), "data": list(cfg.data), "steps": steps}
    if cfg.eval_data:
        record["eval_data"] = cfg.eval_data
    if history:
        record["resumed"] = list(history)
    if evaluation:
        record["eval"] = {k: evaluation[k] for k in ("best_of_n", "n", "per_family") if k in evaluation}
    return record


def _record_evaluation(model_dir: str, cfg: TrainConfig, steps: int, evaluation: dict, history=None) -> None:
    """Add the final held-out evaluation to model/'s training record (evaluated after model/ is saved),
    and rehash that file in model/'s checksum manifest."""

    path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    with open(path) as fh:
        saved = json.load(fh)
    saved["training"] = training_record(cfg, steps, evaluation, history)
    with writing(path), open(path, "w") as fh:
        json.dump(saved, fh, indent=2)
    with writing(os.path.join(model_dir, MANIFEST)):
        update_manifest(model_dir, [MODEL_CONFIG_FILE])


def print_table(ev):
    print(f"held-out best-of-N accuracy: {ev['best_of_n'] * 100:.1f}% over {ev['n']} samples")
    print("| family | best-of-N |\n|---|---|")
    for fam, acc in ev["per_family"].items():
        print(f"| {fam} | {acc * 100:.1f}% |")


def main(argv=None) -> int:
    sharding.deepspeed_logs_to_stderr()  # stdout carries the results only (accelerate imports DeepSpeed on save)
    try:
        train(parse_args(argv))
    except WriteError as e:  # a full disk, a quota, a read-only file system: which file, and how to go on
        print(f"mrrm.train: {e}; the checkpoints written before are intact: make room and rerun the same command "
              "to resume", file=sys.stderr)
        return 1
    except MrrmError as e:  # the settings or the data cannot give the run asked for: the message says why
        print(e, file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and closed, and the process group is destroyed; but DDP's reducer (held by
        # the wrapped model and by accelerate) keeps gloo's process group alive until the interpreter's
        # teardown, where its threads now and then abort the process ("terminate called without an
        # active exception", exit -6: seen in 1 of 4 CI runs of the rank-without-samples test), and
        # torchrun then reports a failed run. A finished distributed run skips that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
