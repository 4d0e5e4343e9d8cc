"""Checkpoints in the authors' layout (github yinuoyang01/multi-response-rm), both directions.

What their code writes, and what `load_reference` reads:

- ``reward_model_config.json``: ``value_head_type`` (linear | mlp), ``value_head_hidden_dim`` (null =
  the head's input size), ``value_head_activation`` (selu | gelu | relu | tanh | silu),
  ``value_head_input_dim`` (H, or 2H for first_last_concat), ``resp_repr_mode`` (last | first |
  first_last_concat | first_last_add | first_last_sub | response_mean). Any other key is an error.
- ``value_head.pt``: a torch state dict of an ``nn.Linear`` (keys ``weight``, ``bias``) or of an
  ``nn.Sequential`` (``0.weight 0.bias 2.weight 2.bias``).
- the backbone, one of:
  * a peft LoRA adapter AT THE CHECKPOINT ROOT (``adapter_config.json`` + ``adapter_model.safetensors``:
    ``mr2rm/train.py::save_checkpoint`` and the final save), trained on a ``ForConditionalGeneration``
    model; the base comes from the adapter's ``base_model_name_or_path`` unless ``base_model=`` is
    given;
  * a merged full model (``config.json`` + weights: ``scripts/merge_lora.py``), likely the released form.
- the processor / tokenizer files, already holding ``<|resp_sep|>``.

The base model's embedding may lack the ``<|resp_sep|>`` row the tokenizer names (the authors'
code resized it during training and the adapter does not carry it): `model.ensure_embedding_rows`
appends missing rows as the mean of the existing ones, which is what their
``resize_token_embeddings`` produced up to ~1e-5 noise. An adapter that does carry full embedding
weights (peft's ``save_embedding_layers``) is loaded at the size it was saved with.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from mrrm.model import parts as M
from mrrm.model.hub import resolve

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
VALUE_HEAD_FILE = "value_head.pt"
# the defaults of the authors' MultiResponseRewardModel, for keys an older file may lack
REFERENCE_DEFAULTS = {"value_head_hidden_dim": None, "value_head_activation": "selu", "resp_repr_mode": "last"}
# Backbones whose `hidden_states[-1]`, which the authors' reward model reads, is the last decoder layer's
# output before the final norm under their pinned transformers 4.57.3 (measured there:
# tests/fixtures/reference_env); under transformers 5.x their code reads the normed state for these too.
UNNORMED_REFERENCE_TYPES = ("qwen3_vl",)


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def read_reference_config(path) -> dict:
    """reward_model_config.json, checked field by field (unknown keys and bad values are errors)."""
    file = os.path.join(path, M.PUBLISHED_CONFIG_FILE)
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        _fail(file, f"not valid JSON ({e})")
    if not isinstance(raw, dict):
        _fail(file, f"must hold a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(M.PUBLISHED_FIELDS))
    if unknown:
        _fail(file, f"unknown field(s) {unknown}; the authors' layout has {list(M.PUBLISHED_FIELDS)}")
    cfg = {**REFERENCE_DEFAULTS, **raw}
    if "value_head_type" in cfg and cfg["value_head_type"] not in M.VALUE_HEAD_TYPES:
        _fail(file, f"value_head_type must be one of {M.VALUE_HEAD_TYPES}, got {cfg['value_head_type']!r}")
    hd = cfg["value_head_hidden_dim"]
    if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int) or hd < 1):
        _fail(file, f"value_head_hidden_dim must be a positive integer or null, got {hd!r}")
    act = cfg["value_head_activation"]
    if not isinstance(act, str) or act.lower() not in M.ACTIVATION_MODULES:
        _fail(file, f"value_head_activation must be one of {tuple(M.ACTIVATION_MODULES)}, got {act!r}")
    cfg["value_head_activation"] = act.lower()
    if cfg["resp_repr_mode"] not in M.RESP_REPR_MODES:
        _fail(file, f"resp_repr_mode must be one of {M.RESP_REPR_MODES}, got {cfg['resp_repr_mode']!r}")
    ind = cfg.get("value_head_input_dim")
    if ind is not None and (isinstance(ind, bool) or not isinstance(ind, int) or ind < 1):
        _fail(file, f"value_head_input_dim must be a positive integer, got {ind!r}")
    return cfg


def _load_value_head(path, cfg: dict, hidden_size: int) -> tuple[nn.Module, dict]:
    """value_head.pt -> the head module, checked against the config and the backbone; returns the head
    and the resolved (type, hidden_dim, input_dim)."""
    file = os.path.join(path, VALUE_HEAD_FILE)
    if not os.path.exists(file):
        _fail(path, f"no {VALUE_HEAD_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it
        _fail(file, f"cannot be read as a torch state dict ({type(e).__name__}: {e})")
    if not isinstance(state, dict):
        _fail(file, f"must hold a state dict, got {type(state).__name__}")
    keys = sorted(state)
    if keys == ["bias", "weight"]:
        kind, first = "linear", state["weight"]
    elif keys == ["0.bias", "0.weight", "2.bias", "2.weight"]:
        kind, first = "mlp", state["0.weight"]
    else:
        _fail(file, f"holds keys {keys}: expected an nn.Linear (weight, bias) or an nn.Sequential "
                    "(0.weight, 0.bias, 2.weight, 2.bias) state dict")
    if cfg.get("value_head_type", kind) != kind:
        _fail(path, f"value_head_type is {cfg['value_head_type']!r} but {VALUE_HEAD_FILE} holds a {kind} head")
    in_dim = int(first.shape[1])
    expected = M.head_input_dim(hidden_size, cfg["resp_repr_mode"])
    if in_dim != expected:
        _fail(path, f"{VALUE_HEAD_FILE} takes inputs of size {in_dim}, but the backbone's hidden size {hidden_size} "
                    f"with resp_repr_mode {cfg['resp_repr_mode']!r} gives {expected}")
    if cfg.get("value_head_input_dim") is not None and cfg["value_head_input_dim"] != in_dim:
        _fail(path, f"value_head_input_dim={cfg['value_head_input_dim']} but {VALUE_HEAD_FILE} takes {in_dim}")
    hidden_dim = None
    if kind == "mlp":
        hidden_dim = int(first.shape[0])
        if (cfg["value_head_hidden_dim"] or in_dim) != hidden_dim:
            _fail(path, f"value_head_hidden_dim={cfg['value_head_hidden_dim']} (null = input size {in_dim}) but "
                        f"{VALUE_HEAD_FILE} has {hidden_dim}")
    head = M.build_value_head(in_dim, kind, hidden_dim, cfg["value_head_activation"])
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        _fail(file, f"does not fit the head it describes ({e})")
    return head, {"value_head_type": kind, "value_head_hidden_dim": hidden_dim, "input_dim": in_dim}


def _full_model_class(path_or_id):
    """The class the authors' code trains: AutoModelForImageTextToText (a causal LM for text backbones)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    M.check_backbone_support(path_or_id)
    cfg = AutoConfig.from_pretrained(path_or_id)
    if type(cfg) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _bare(full):
    """The backbone without its LM head (mrrm never computes vocabulary logits)."""
    return full.model if hasattr(full, "model") else full


def _adapter_embedding_rows(adapter_dir) -> int | None:
    """Rows of input-embedding weights saved inside the adapter (peft's save_embedding_layers), if any."""
    file = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if not os.path.exists(file):
        return None
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        for k in f.keys():
            if k.endswith("embed_tokens.weight") and "lora_" not in k:
                return int(f.get_slice(k).get_shape()[0])
    return None


def load_reference(cls, path, *, base_model=None, media_base_dir=None, final_norm=None):
    """A RewardModel from a checkpoint the authors' code wrote (see the module docstring). Videos are
    sampled as their code samples them (video_sampling="reference"). final_norm=None: as their code
    reads the hidden states under its pinned transformers 4.57.3 (un-normed for UNNORMED_REFERENCE_TYPES);
    True reads after the final norm, as their code does when run under transformers 5.x."""
    cfg = read_reference_config(path)
    has_adapter = os.path.exists(os.path.join(path, ADAPTER_CONFIG))
    has_full = os.path.exists(os.path.join(path, "config.json"))
    if not has_adapter and not has_full:
        _fail(path, f"holds {M.PUBLISHED_CONFIG_FILE} but neither a peft adapter ({ADAPTER_CONFIG}) nor a merged "
                    "model (config.json) at its root")
    base_path = None
    if has_adapter:
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            adapter_cfg = json.load(f)
        base_path = base_model or adapter_cfg.get("base_model_name_or_path")
        if not base_path:
            _fail(os.path.join(path, ADAPTER_CONFIG), "names no base model (base_model_name_or_path); pass base_model=")
        if not any(os.path.exists(os.path.join(path, w)) for w in ADAPTER_WEIGHTS):
            _fail(path, f"{ADAPTER_CONFIG} without adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    tok_dir = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else (base_path or path)
    tokenizer, processor = M.load_processor(tok_dir)

    if has_adapter:
        from peft import PeftModel


        base_dir = resolve(base_path)  # a Hub id: huggingface_hub's cache
        full = _full_model_class(base_dir).from_pretrained(base_dir)
        saved_rows = _adapter_embedding_rows(path)
        if saved_rows is not None and saved_rows != full.get_input_embeddings().weight.shape[0]:
            full.resize_token_embeddings(saved_rows, mean_resizing=False)  # the adapter brings the rows
        M.ensure_separator_token(tokenizer, full)
        full = PeftModel.from_pretrained(full, path).merge_and_unload()
    else:
        full = _full_model_class(path).from_pretrained(path)
        M.ensure_separator_token(tokenizer, full)
    backbone = _bare(full).float().eval()
    head, resolved = _load_value_head(path, cfg, M.text_hidden_size(backbone))
    if final_norm is None:
        final_norm = backbone.config.model_type not in UNNORMED_REFERENCE_TYPES
    config = M.RewardModelConfig(
        value_head_type=resolved["value_head_type"], value_head_hidden_dim=resolved["value_head_hidden_dim"],
        value_head_activation=cfg["value_head_activation"], resp_repr_mode=cfg["resp_repr_mode"],
        base_model=base_path, video_sampling="reference", final_norm=final_norm,
        description=f"loaded from the authors' layout at {path} ({'adapter' if has_adapter else 'merged model'})")
    return cls(backbone, tokenizer, processor, config, value_head=head, media_base_dir=media_base_dir)


def reference_config(model) -> dict:
    """reward_model_config.json of a RewardModel."""
    cfg = model.config
    first = M.head_linears(model.value_head)[0]
    return {"value_head_type": cfg.value_head_type,
            "value_head_hidden_dim": first.out_features if cfg.value_head_type == "mlp" else cfg.value_head_hidden_dim,
            "value_head_activation": cfg.value_head_activation, "value_head_input_dim": first.in_features,
            "resp_repr_mode": cfg.resp_repr_mode}


def save_reference(model, path) -> None:
    """Write `model` as the authors' code writes checkpoints: a LoRA backbone as the adapter at the root
    (keys of a peft model around the ForConditionalGeneration class, as their training wraps it), a
    full backbone as a merged ForConditionalGeneration model; plus reward_model_config.json,
    value_head.pt and the processor."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    base = M.unwrap(model.backbone)
    if base is not model.backbone:  # peft LoRA
        from peft import get_peft_model_state_dict

        if not model.config.base_model:
            raise ValueError("a LoRA backbone needs config.base_model (the base model's path or hub id) to be saved")
        peft_cfg = model.backbone.peft_config["default"].to_dict()
        peft_cfg["base_model_name_or_path"] = model.config.base_model
        peft_cfg["task_type"] = "CAUSAL_LM"
        for k, v in list(peft_cfg.items()):  # sets are not JSON
            if isinstance(v, set):
                peft_cfg[k] = sorted(v)
        state = get_peft_model_state_dict(model.backbone)
        # mrrm wraps the bare model, the authors' code the ForConditionalGeneration around it (".model")
        state = {("base_model.model.model." + k[len("base_model.model."):] if k.startswith("base_model.model.") else k):
                 v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, os.path.join(path, ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
        with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_cfg, f, indent=2)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForImageTextToText if type(base.config) in AutoModelForImageTextToText._model_mapping \
            else AutoModelForCausalLM
        # a fresh config: the live one names mrrm's attention, which a plain load would not find
        config = type(base.config).from_dict(base.config.to_dict())
        full = cls.from_config(config)
        missing, unexpected = full.model.load_state_dict(base.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"the backbone does not fit {type(full).__name__}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        out = full.get_output_embeddings()
        emb = full.get_input_embeddings().weight
        if out is not None and out.weight.shape == emb.shape:  # never read by a reward model: a harmless copy
            with torch.no_grad():
                out.weight.copy_(emb)
        full.save_pretrained(path, safe_serialization=True)
    torch.save({k: v.detach().cpu() for k, v in model.value_head.state_dict().items()},
               os.path.join(path, VALUE_HEAD_FILE))
    with open(os.path.join(path, M.PUBLISHED_CONFIG_FILE), "w") as f:
        json.dump(reference_config(model), f, indent=2)
    (model.processor or model.tokenizer).save_pretrained(path)


def load_backbone(path, **kwargs):
    """The bare backbone (no LM head) saved at `path`, every weight from the checkpoint.

    A full model's checkpoint (a ForConditionalGeneration's, as the Hub's Qwen-VL models and the
    authors' merged models are: `model.layers.*`, `lm_head.weight`) loads into the bare class through
    transformers' key conversion, which 5.10 lacks for the bare class (5.15 has it): the text
    weights would stay at their random init with only a logged report. So weights the bare class
    reports missing send the load through the full-model class (whose conversion those versions
    have) and its `.model`; weights missing there too are an error naming them."""
    from transformers import AutoModel

    M.check_backbone_support(path)
    with M.quiet_loading():
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    if not info.get("missing_keys"):
        return model
    del model
    with M.quiet_loading():
        full, info = _full_model_class(path).from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("lm_head."))
    if missing:
        import transformers

        raise ValueError(f"{path}: {len(missing)} backbone weights are not in the checkpoint under any name this "
                         f"transformers ({transformers.__version__}) maps (they would be random): "
                         f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    return _bare(full)
