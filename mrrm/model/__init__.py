"""The reward model: RewardModel (a backbone, a value head at each response's end) in reward_model, its
configuration and parts (parts), backbone support (qwen35: Qwen3.5's linear attention), checkpoints in the
authors' layout and backbone loading (checkpoints), the Hugging Face Hub (hub), tiny models built from
configs (tiny), and the public entry points mrrm.load / mrrm.score (api)."""
from mrrm.model.checkpoints import load_backbone
from mrrm.model.parts import (
    RewardModelConfig,
    check_backbone_support,
    ensure_separator_token,
    load_processor,
    unwrap,
    verify_checkpoint,
)
from mrrm.model.reward_model import RewardModel

__all__ = ["RewardModel", "RewardModelConfig", "check_backbone_support", "ensure_separator_token", "load_backbone",
           "load_processor", "unwrap", "verify_checkpoint"]
