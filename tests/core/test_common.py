"""mrrm.common: the shared definitions, and ONE best-of-N rule wherever an accuracy is computed."""
import pytest
import torch

from mrrm.common import MODES, TRAIN_MODES, check_int, check_positive, is_correct, top_choice
from mrrm.eval import benchmarks as mev
from mrrm.model.api import build_default_model
from mrrm.train import demo
from mrrm.train import recipe as train


def test_top_choice_and_its_tie_rule():
    assert top_choice([0.1, 0.7, 0.2]) == 1
    assert top_choice([0.7, 0.1, 0.7]) is None            # a tied top: the model has not chosen
    assert top_choice([0.7, 0.1, 0.7], ties="first") == 0  # selection must pick one
    assert top_choice([(1, 2), (1, 3)]) == 1               # any comparable keys (the pairwise protocol's)
    with pytest.raises(ValueError, match="no keys"):
        top_choice([])
    with pytest.raises(ValueError, match="ties must be one of"):
        top_choice([1.0], ties="last")


def test_is_correct():
    assert is_correct([0.1, 0.9], [2, 1])
    assert not is_correct([0.9, 0.1], [2, 1])
    assert is_correct([0.1, 0.9, 0.5], [1, 1, 2])          # tied human ranks: either best counts
    assert not is_correct([0.5, 0.5], [1, 2])              # a constant scorer is never right
    with pytest.raises(ValueError, match="2 keys for 3 rankings"):
        is_correct([0.1, 0.2], [1, 2, 3])


def test_check_int():
    assert check_int("n", 3) == 3 and check_int("n", 0, minimum=0) == 0 and check_int("n", None, allow_none=True) is None
    for bad in (0, -1, True, 1.0, "2", None):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            check_int("n", bad)
    assert set(TRAIN_MODES) < set(MODES)
    assert check_positive("t", 2) == 2.0 and check_positive("t", 0.5) == 0.5
    for bad in (0, -1, True, float("inf"), float("nan"), "3", None):
        with pytest.raises(ValueError, match="t must be a positive number of seconds"):
            check_positive("t", bad, unit="seconds")


def test_training_and_eval_count_a_tied_top_as_wrong(tmp_path):
    """A model whose head gives every response the same score: training's evaluation and mrrm.eval's
    per-sample metric both give 0 (argmax would have counted every sample whose first response is
    ranked best)."""
    path = demo.generate(8, 77, str(tmp_path / "d"))
    model = build_default_model()
    for p in model.value_head.parameters():
        torch.nn.init.zeros_(p)
    per_file, bad = train.prepare(model, [str(path)], None, skip_bad=False, log=lambda *a: None)
    samples = per_file[0]
    assert len(samples) == 8 and not bad
    assert any(s.rankings[0] == 1 for s in samples)  # argmax-first would score these
    ev = train.evaluate(model, samples, "joint", None)
    assert ev["best_of_n"] == 0.0 and ev["n"] == 8
    for s in samples:
        assert mev.sample_metrics([0.0] * len(s.rankings), s.rankings)["correct"] is False
