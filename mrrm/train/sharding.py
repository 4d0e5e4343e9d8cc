"""Sharded training for `python -m mrrm.train`: FSDP2 (`--fsdp`, torch's `fully_shard` applied by mrrm
itself) and DeepSpeed ZeRO-2 and ZeRO-3 (`--deepspeed ds_config.json`), under any data-parallel launch (torchrun
or accelerate's MULTI_GPU / MULTI_CPU), on GPUs (NCCL) and on CPU (gloo, which the tests use).

What makes a sharded run correct, and how mrrm.train does each:
  * Every rank runs the same collectives in the same order. Each transformer decoder layer is its
    own FSDP unit (all-gathered in its forward, reduce-scattered in its backward); everything else
    (embeddings, the vision tower, final norm, value head) is the root unit, gathered once per
    forward. The vision tower therefore issues no collective of its own: ranks whose micro-batches
    hold images, videos, both or neither stay in step. Ranks run the same number of micro-batches
    per step: `aligned_count` takes the largest count and the others pad with zero-loss passes.
  * Gradient clipping on the sharded parameters (DTensors), the list taken after sharding.
  * Checkpoints and `model/` from FULL state dicts gathered from the shards (`full_state`), the
    same files an unsharded run writes; resume loads them back into the shards (`load_full_state`).
  * Evaluation on every rank (each runs the same forwards; rank 0 logs).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist

from mrrm.errors import ConfigError
from mrrm.integrity import load_torch_file
from mrrm.model.parts import PACKED_VL_TYPES, TEXT_ONLY_ATTENTION_TYPES, head_linears, unwrap


def _require_distributed() -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise ConfigError("mrrm.train: --fsdp shards the model over the processes of a distributed launch; "
                         "start it with torchrun --nproc_per_node N (N >= 2) or accelerate launch "
                         "--num_processes N")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of the language model (transformers names them *DecoderLayer)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard(model: torch.nn.Module, *, bf16: bool = False) -> int:
    """Apply fully_shard to each decoder layer, then to the model (the root unit). Returns the
    number of layer units. bf16: parameters gathered in bf16, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _require_distributed()
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"mrrm.train: --fsdp found no *DecoderLayer module in {type(model).__name__}'s backbone")
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return len(layers)


def aligned_count(n: int, device) -> int:
    """The largest of every rank's `n` (the micro-batches each runs this step)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """(model state, optimizer state) as full, unsharded CPU tensors keyed like an unsharded run's
    (the optimizer's by parameter name). Collective: every rank calls it; rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_options()) if optimizer is not None else None
    return model_state, optim_state


def load_full_state(model, model_state: dict, optimizer=None, optim_state: dict | None = None) -> None:
    """Load full states (as `full_state` returns, read from a checkpoint by every rank) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def optimizer_state_by_name(optim_state: dict) -> bool:
    """Whether an optimizer state is keyed by parameter name (sharded runs) rather than by index."""
    return any(isinstance(k, str) for k in optim_state.get("state", {}))


# --------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 / ZeRO-3 (`python -m mrrm.train --deepspeed ds_config.json`, optional extra `deepspeed`)
#
# ZeRO-3 partitions the parameters and gathers each module's when the module is called (hooks in the
# forward and the backward): every rank must call the same modules in the same order. The decoder
# layers are; the vision tower is not by itself (a rank's pass may hold images, videos, both or
# neither), so under ZeRO-3 the model makes exactly one vision-tower call per pass
# (`RewardModel.one_vision_call`: images and videos together, a dummy image in a pass without media).
# The fused value head reads its weights without calling the head's modules: they are registered as
# the model's external parameters (gathered with the model's forward). Checkpoints hold the full
# model gathered layer by layer on rank 0 (DeepSpeed's consolidated state dict) next to DeepSpeed's
# own partition files, from which a resume restores every rank's partitions.
# --------------------------------------------------------------------------------------------------
DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger (every DeepSpeed module logs through it)


def deepspeed_config(path: str, *, max_grad_norm: float, bf16: bool) -> dict:
    """The user's DeepSpeed JSON with what mrrm.train's loop needs: one sample per "micro batch" and
    no DeepSpeed accumulation count (mrrm packs its own micro-batches per step, as many as the token
    budget gives, and marks the step's last one as the accumulation boundary), the client AdamW
    allowed under ZeRO, and --max-grad-norm as gradient_clipping unless the file sets one.
    Stages 0-3 (ZeRO-3: see above; `prepare_zero3` readies the model)."""
    import json

    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise ConfigError(f"mrrm.train: --deepspeed {path!r}: cannot read a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"mrrm.train: --deepspeed {path!r}: the config must be a JSON object")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"mrrm.train: --deepspeed {path!r}: zero_optimization.stage must be 0-3, got {stage!r}")
    if int(cfg.get("gradient_accumulation_steps", 1)) != 1:
        raise ConfigError(f"mrrm.train: --deepspeed {path!r}: gradient_accumulation_steps must be 1 (mrrm.train "
                         "accumulates over its own packed micro-batches within each step; set --batch-size instead)")
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two below and the world size
    cfg.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("gradient_clipping", float(max_grad_norm or 0.0))
    if bf16:
        cfg.setdefault("bf16", {"enabled": True})
    return cfg


class _HandlersOffStdout(logging.Filter):
    """A filter on a library's logger whose handler the library makes on stdout, later (DeepSpeed makes its
    handler when it is imported, which accelerate and transformers do lazily, e.g. when a model is saved):
    before each record is handled, the logger's stdout handlers are moved to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        _move_to_stderr(logging.getLogger(record.name))
        return True


def _move_to_stderr(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's log lines on stderr from now on, whoever imports it: its logger writes to stdout, where its
    "Setting accelerator to CPU" line (logged when it is imported: by accelerate when a model is saved, even
    without --deepspeed) landed among a command's results. `mrrm train` calls this first."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _HandlersOffStdout) for f in logger.filters):
        logger.addFilter(_HandlersOffStdout())
    _move_to_stderr(logger)


def import_deepspeed():
    """The deepspeed module, its log lines on stderr (`deepspeed_logs_to_stderr`)."""
    deepspeed_logs_to_stderr()
    try:
        import deepspeed  # an optional dependency (mrrm[deepspeed]), imported by --deepspeed runs only
    except ImportError:
        raise ConfigError("mrrm.train: --deepspeed needs DeepSpeed: pip install 'mrrm[deepspeed]' "
                          "(DS_BUILD_OPS=0 pip install deepspeed on machines without CUDA)") from None
    return deepspeed


def deepspeed_engine(model, optimizer, config: dict):
    """(engine, DeepSpeed's optimizer) for `model` under the running process group."""
    deepspeed = import_deepspeed()
    _require_distributed()
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, ds_optimizer


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def prepare_zero3(model) -> None:
    """Ready a RewardModel for ZeRO-3 before `deepspeed_engine`: one vision-tower call per pass, and
    the value head's weights registered as external parameters of the model (the fused head reads
    them directly). Refuses backbones whose media path cannot make one call per pass."""

    base = unwrap(model.backbone)
    kind = base.config.model_type
    if kind in TEXT_ONLY_ATTENTION_TYPES or (not model.packed and hasattr(base.config, "vision_config")):
        raise ConfigError(f"mrrm.train: DeepSpeed ZeRO-3 is not supported for {kind} backbones (their vision tower "
                         "runs per media kind, differently on each rank); use ZeRO-2, or --fsdp to shard the parameters")
    if kind in PACKED_VL_TYPES:
        # one tower call per pass on every supported transformers: handed over as mm_encoder_outputs
        # where the forward takes them, else returned by the backbone's own get_*_features calls
        model.one_vision_call = True
    deepspeed = import_deepspeed()
    for linear in head_linears(model.value_head):
        for p in linear.parameters():
            deepspeed.zero.register_external_parameter(model, p)


# The classes DeepSpeed's checkpoint files hold besides tensors and plain values, allowed when they are read
# back (measured with DeepSpeed 0.19.8: ZeRO-2 and ZeRO-3 optimizer partitions hold LossScaler, ZeroStageEnum and,
# ZeRO-2, fragment_address; DynamicLossScaler takes LossScaler's place in fp16 runs). Nothing else is unpickled.
DEEPSPEED_CHECKPOINT_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def load_partitions_safely(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with mrrm.integrity.load_torch_file (PyTorch's
    restricted unpickler, DEEPSPEED_CHECKPOINT_CLASSES allowed) instead of DeepSpeed's own
    torch.load(weights_only=False): a crafted partition file is refused, naming it, before it runs
    anything. Every file DeepSpeed reads goes through `engine.checkpoint_engine.load`."""
    import importlib

    allowed = []
    for module, name in DEEPSPEED_CHECKPOINT_CLASSES:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: a file that needs it is refused, named
            pass

    def load(path, map_location=None):
        return load_torch_file(path, map_location=map_location, allowed=allowed)

    engine.checkpoint_engine.load = load


def zero3_full_state(engine) -> dict | None:
    """The full model state of a ZeRO-3 engine, gathered layer by layer on rank 0 (None elsewhere).
    Collective: every rank calls it."""
    return engine._zero3_consolidated_16bit_state_dict()
