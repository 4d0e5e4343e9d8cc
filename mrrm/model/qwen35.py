"""Qwen3.5 (transformers `qwen3_5`) on mrrm's packed stream: its Gated DeltaNet layers read the packing.

Qwen3.5's text layers mix full attention (served by mrrm's varlen attention like every packed
backbone) with Gated DeltaNet linear attention: a short causal conv1d followed by the gated delta
rule, both recurrent. transformers' own layer does not keep packed sequences apart on the CPU, so
`use_mrrm_linear_attention` switches every such layer to `MrrmGatedDeltaNet`, which reads the same
`mrrm_varlen` metadata (`mrrm.model.VarlenMeta`) the attention layers get and runs
`mrrm.ops.linear_attention`: joint and single as independent sequences, independent by forking the
prefix's conv and recurrent states to each of its responses. The weights, their names and the
layer's arithmetic are transformers' (projections, gates, gated RMSNorm); only the sequence mixing
is packed. The vision tower is Qwen3-VL's kind and takes the same packed path.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from mrrm.ops.linear_attention import causal_conv1d_varlen, gated_delta_rule_varlen, recurrent_plan

MODEL_TYPE = "qwen3_5"
# LoRA on Qwen3.5's language model: the full-attention projections (one layer in four) and the Gated
# DeltaNet layers' q/k/v, output-gate and output projections (the small a/b gate projections and the
# conv stay frozen). mrrm.train's default target names only the attention projections.
LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|in_proj_qkv|in_proj_z|out_proj)"
_LAST_PLAN = None  # (weakref VarlenMeta, RecurrentPlan): one plan per forward, shared by every layer


def plan_for(meta):
    """The RecurrentPlan of a forward's packing metadata (cu_seqlens, mask, segment_ids), built once
    per VarlenMeta: every linear layer of one forward receives the same object. A plan attached to
    the metadata as `recurrent_plan` is used as it is (mrrm.flops attaches one: its segment ids live
    on the meta device, where their values cannot be read)."""
    global _LAST_PLAN
    attached = getattr(meta, "recurrent_plan", None)
    if attached is not None:
        return attached
    last = _LAST_PLAN
    if last is not None and last[0]() is meta:
        return last[1]
    plan = recurrent_plan(meta.cu_seqlens, meta.mask, meta.segment_ids)
    _LAST_PLAN = (weakref.ref(meta), plan)
    return plan


class MrrmGatedDeltaNet(Qwen3_5GatedDeltaNet):
    """Qwen3.5's Gated DeltaNet on a packed stream [1, T, H] with mrrm's metadata (`mrrm_varlen`)."""

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
        meta = kwargs.get("mrrm_varlen")
        if meta is None:
            raise RuntimeError("mrrm's Gated DeltaNet layer was called without packing metadata (mrrm_varlen); "
                               "run the backbone through RewardModel.forward")
        if cache is not None or kwargs.get("cache_params") is not None:  # its name in transformers <= 5.20
            raise RuntimeError("mrrm's Gated DeltaNet layer scores whole sequences and keeps no cache; "
                               "call the backbone with use_cache=False")
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise RuntimeError("mrrm's Gated DeltaNet layer runs on packed streams (batch dimension 1); got shape "
                               f"{tuple(hidden_states.shape)}")
        if attention_mask is not None:
            raise RuntimeError("mrrm's Gated DeltaNet layer takes no padding mask: the packed stream has no padding")
        x = hidden_states[0]
        T = x.shape[0]
        plan = plan_for(meta)
        mixed = causal_conv1d_varlen(self.in_proj_qkv(x), self.conv1d.weight.squeeze(1), self.conv1d.bias, plan,
                                     activation=self.activation)
        query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(T, -1, self.head_k_dim)
        key = key.reshape(T, -1, self.head_k_dim)
        value = value.reshape(T, -1, self.head_v_dim)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        core = gated_delta_rule_varlen(query, key, value, g, beta, plan, use_qk_l2norm=True)
        z = self.in_proj_z(x).reshape(-1, self.head_v_dim)
        core = self.norm(core.reshape(-1, self.head_v_dim), z).reshape(1, T, -1)
        return self.out_proj(core)


def use_mrrm_linear_attention(model) -> int:
    """Switch every Qwen3.5 Gated DeltaNet layer of `model` (a Qwen3_5Model or any module holding
    its layers) to `MrrmGatedDeltaNet`, in place (same parameters and names). Returns the number of
    layers switched; a model without such layers is an error."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, Qwen3_5GatedDeltaNet)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Qwen3.5 Gated DeltaNet layers")
    for m in layers:
        m.__class__ = MrrmGatedDeltaNet
    return len(layers)
