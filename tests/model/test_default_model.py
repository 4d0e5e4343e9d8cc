"""The shipped default model (mrrm/model/default_model) on a fresh, unseen seed of the demo task."""
import json
import os

import pytest

import mrrm
from mrrm.common import is_correct
from mrrm.model.api import DEFAULT_MODEL_DIR
from mrrm.train import demo


@pytest.mark.slow
def test_shipped_default_model_on_a_fresh_seed(tmp_path):
    assert os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "mrrm_config.json"))
    path = demo.generate(200, 424242, str(tmp_path / "fresh"))
    samples = [json.loads(line) for line in open(path)]
    model = mrrm.load()
    scores = model.score(samples, media_dir=os.path.dirname(str(path)))
    assert model.encoder.media_base_dir is None  # a per-call option: the cached model is unchanged
    hits = {}
    for s, sc in zip(samples, scores):
        hits.setdefault(s["family"], []).append(is_correct(sc, s["rankings"]))
    overall = sum(sum(v) for v in hits.values()) / len(samples)
    assert overall >= 0.90, (overall, {k: sum(v) / len(v) for k, v in hits.items()})
    for fam, v in hits.items():
        assert sum(v) / len(v) >= 0.80, (fam, sum(v) / len(v))
