"""Definitions shared across mrrm, each in one place: the scoring modes, the value-head activations,
the integer and choice checks every public function uses, and best-of-N with its tie rule.

Pure Python (no torch import), so the command-line tools and the FLOP counter can use it too.
"""
from __future__ import annotations

import numbers
from typing import Sequence

# joint: one causal stream per sample (the paper's); independent: the shared prefix once, each
# response seeing only the prefix and itself (equal to single, token for token); single: one
# sequence per (prompt, response) pair, the classic per-response reward model.
MODES = ("joint", "independent", "single")
# training packs N responses into one pass, so it takes the two multi-response modes only
TRAIN_MODES = ("joint", "independent")

# the value head's hidden activation; the C++ (csrc/value_head.cpp) and Triton
# (kernels/value_head.py) kernels implement exactly these (tests/ops/test_value_head.py checks it)
ACTIVATIONS = ("silu", "gelu", "relu", "selu", "tanh")


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False):
    """`value` as an int >= minimum (bools refused), or None when allowed; else a ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_positive(name: str, value, *, unit: str = "") -> float:
    """`value` as a finite number > 0 (bools refused), else a ValueError naming it (and its unit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < float("inf")):
        raise ValueError(f"{name} must be a positive number{' of ' + unit if unit else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence):
    """`value` if it is one of `choices`, else a ValueError naming it and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def top_choice(keys: Sequence, *, ties: str = "none") -> int | None:
    """Best-of-N: the index of the highest key (a score, or any comparable key).

    ties="none" (the accuracy rule): None when the highest is tied, because the model has then not
    chosen. Every accuracy in mrrm (training's evaluation and its running accuracy, mrrm.eval, the
    tests) counts a sample correct iff `is_correct` holds, so a constant scorer scores 0, not 1/N.
    ties="first" (selection): the first of the tied, for callers that must pick one response (the
    score command's `best`)."""
    check_choice("ties", ties, ("none", "first"))
    if len(keys) == 0:
        raise ValueError("top_choice: no keys")
    best = max(keys)
    winners = [i for i, k in enumerate(keys) if k == best]
    return winners[0] if len(winners) == 1 or ties == "first" else None


def is_correct(keys: Sequence, rankings: Sequence) -> bool:
    """Best-of-N accuracy of one sample: the model's unique top choice has the best human rank
    (rankings: 1 = best; several responses may share it)."""
    if len(keys) != len(rankings):
        raise ValueError(f"is_correct: {len(keys)} keys for {len(rankings)} rankings")
    top = top_choice(keys)
    return top is not None and rankings[top] == min(rankings)


def tensor_version(t):
    """The tensor's in-place version counter; None for inference-mode tensors, which have none
    (identity alone then decides a memo hit in the per-forward metadata caches)."""
    return None if t.is_inference() else t._version
