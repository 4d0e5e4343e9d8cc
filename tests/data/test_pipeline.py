"""mrrm.data.pipeline: encoding in worker processes. A worker that dies on a sample costs that sample."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_worker_that_dies_costs_its_sample_not_the_run():
    """One sample aborts its worker process (SIGABRT, as a native library failing an allocation does):
    the pool broke and every part in flight with it (BrokenProcessPool, the whole run). Now that sample is
    a per-sample error naming how the worker died, every other sample is encoded, in order, and the pool
    keeps working for the next chunk."""
    from faults import AbortingEncoder

    from mrrm.data.pipeline import EncodePool

    pool = EncodePool(AbortingEncoder(), 2)
    try:
        samples = [{"id": i, "abort": i == 3} for i in range(6)]
        results = pool.gather(pool.submit(samples))
        assert [encoded for encoded, _ in results] == [0, 1, 2, None, 4, 5]
        assert [reason is None for _, reason in results] == [True, True, True, False, True, True]
        assert "the encoding worker process died on this sample (killed by SIGABRT)" in results[3][1]
        assert pool.deaths == 1
        assert pool.gather(pool.submit([{"id": 7}, {"id": 8}])) == [(7, None), (8, None)]
    finally:
        pool.close()


@pytest.mark.slow
def test_workers_encode_under_the_encoder_s_media_budgets(tmp_path):
    """The media budgets travel with the encoder (pickled into each worker process, no module state copied
    by hand): a worker refuses what the encoder's non-default MediaBudgets refuse, with the same reasons as
    the encoder in this process, and passes what the defaults pass."""
    from PIL import Image

    from mrrm.data.encoding import SampleError
    from mrrm.data.media import DEFAULT_MEDIA_BUDGETS, MediaBudgets
    from mrrm.data.pipeline import EncodePool
    from mrrm.model.api import build_default_model

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    samples = [{"prompt": "p", "responses": ["a", "b"]},
               {"prompt": "p", "responses": ["a", "b"], "images": ["a.png"]},
               {"prompt": "p", "responses": ["a", "b"], "images": ["a.png", "a.png"]}]
    encoder = build_default_model().encoder
    encoder.encode(samples[1], 1, media_dir=str(tmp_path))  # the defaults pass it
    budgets = encoder.set_media_budgets(images_per_sample=1, image_pixels=255)  # 16x16 = 256 pixels
    assert budgets == MediaBudgets(images_per_sample=1, image_pixels=255) != DEFAULT_MEDIA_BUDGETS
    here = []
    for i, sample in enumerate(samples):
        try:
            encoder.encode(sample, i, media_dir=str(tmp_path))
            here.append(None)
        except SampleError as e:
            here.append(e.reason)
    assert here[0] is None and "(--max-image-megapixels" in here[1] and "over the limit of 1 per sample" in here[2]
    pool = EncodePool(encoder, 1)
    try:
        results = pool.gather(pool.submit(samples, media_dir=str(tmp_path)))
    finally:
        pool.close()
    assert [reason for _, reason in results] == here
    assert results[0][0] is not None
