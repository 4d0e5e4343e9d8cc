"""CPU scoring latency and training throughput of a small Qwen3-VL-style model (bench_perf/e2e.py).

Latency: one prompt with N responses of R tokens, scored along the four paths of e2e.py (single,
joint, independent, published). The paths are timed in interleaved rounds inside one test, so each
ratio compares medians taken side by side; extra_info records every median, the FLOPs each path
actually executed (FlopCounterMode on the same call), the measured ratios and the FLOPs ratios of
the same shapes (counted, and from mrrm.flops' analytic model).

Training: a forward + backward of the listwise loss over a batch of samples with ragged responses,
packed (mrrm: one joint stream, varlen attention, no padding) vs padded (the same samples as
right-padded rows with an attention mask): real tokens per second and peak memory of the step.
"""
import pytest
import torch

from mrrm.model import tiny

from . import e2e
from .conftest import SMALL

NS = [2, 4] if SMALL else [2, 4, 8]
KINDS = ["image"] if SMALL else ["image", "video"]
R = 32          # short answers, the case the paper targets
ROUNDS = 3 if SMALL else 5
SMALL_OVERRIDES = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, vision_width=64, vision_depth=2)


@pytest.fixture(scope="module")
def harness():
    tok = tiny.build_tokenizer()
    cfg = e2e.small_config(tok, **(SMALL_OVERRIDES if SMALL else {}))
    proc = e2e.build_processor("qwen3_vl", tok, patch_size=16, image_pixels=e2e.CPU_IMAGE[0] * e2e.CPU_IMAGE[1],
                               video_pixels=e2e.CPU_VIDEO[1] * e2e.CPU_VIDEO[2])
    return e2e.build_harness(cfg, tok, proc, device="cpu", dtype=torch.float32, head_hidden=256)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", NS)
def test_scoring_latency_cpu(benchmark, harness, kind, n):
    h = harness
    enc = e2e.make_sample(h, kind, n, R, image_size=e2e.CPU_IMAGE, video=e2e.CPU_VIDEO)
    fns = {p: e2e.scoring_fn(h, enc, p) for p in e2e.PATHS}
    # the four paths compute what they claim: single == independent == published, joint differs
    out = {p: fn() for p, fn in fns.items()}
    torch.testing.assert_close(out["independent"], out["single"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["published"], out["single"], rtol=1e-3, atol=1e-3)
    if n > 1:
        assert (out["joint"] - out["single"]).abs().max() > 1e-4
    counted = {p: e2e.count_flops(fn) for p, fn in fns.items()}
    times = {p: [] for p in e2e.PATHS}
    for _ in range(ROUNDS):  # interleaved, so drift hits every path alike
        for p, fn in fns.items():
            times[p].append(e2e.median_seconds(fn, h.device, rounds=1, warmup=0))
    med = {p: float(torch.tensor(t).median()) for p, t in times.items()}
    ratio_joint = med["single"] / med["joint"]
    flops_ratio = counted["single"] / counted["joint"]
    analytic_joint, analytic_indep = e2e.analytic_ratios(h, enc, n)
    benchmark.group = f"scoring latency CPU {kind} R={R}"
    benchmark.extra_info.update(
        kind=kind, n=n, R=R, vision_tokens=e2e.vision_tokens(enc), prefix_tokens=len(enc.layout.prefix_ids),
        **{f"seconds_{p}": med[p] for p in e2e.PATHS},
        **{f"flops_{p}": counted[p] for p in e2e.PATHS},
        ratio_measured=ratio_joint,
        ratio_measured_independent=med["single"] / med["independent"],
        ratio_vs_published=med["published"] / med["joint"],
        ratio_flops=flops_ratio,
        ratio_flops_independent=counted["single"] / counted["independent"],
        ratio_analytic=analytic_joint, ratio_analytic_independent=analytic_indep,
        latency_share_of_flops_ratio=ratio_joint / flops_ratio)
    # analytic model and counter agree on the executed shapes (the 2% target of the FLOPs benchmarks)
    assert abs(analytic_joint / flops_ratio - 1) < 0.02, (analytic_joint, flops_ratio)
    benchmark.pedantic(fns["joint"], rounds=ROUNDS, warmup_rounds=0)


@pytest.mark.parametrize("batch_kind", ["uniform", "mixed"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_train_step_cpu(benchmark, harness, layout, batch_kind):
    """uniform: image prompts with N=4 each; mixed: N from 2 to 8, half the prompts text-only."""
    h = harness
    batch, n = (2, 4) if SMALL else (4, 4)
    samples = e2e.train_samples(h, "image", batch, n, R * 2, mixed=batch_kind == "mixed")
    model = h.model if layout == "packed" else e2e.padded_twin(h)
    model.train()
    try:
        run, real_tokens = e2e.train_step_fn(model, samples, h.device, h.dtype)
        padded_tokens = e2e.padded_token_count(model, samples) if layout == "padded" else real_tokens
        peak = e2e.peak_memory(run, h.device)
        sec = e2e.median_seconds(run, h.device, rounds=ROUNDS, warmup=1)
        benchmark.group = f"train step CPU (fwd+bwd) batch={batch} {batch_kind}"
        benchmark.extra_info.update(layout=layout, batch_kind=batch_kind, batch=batch, n=n, real_tokens=real_tokens,
                                    processed_tokens=padded_tokens, seconds=sec,
                                    tokens_per_s=real_tokens / sec, peak_bytes=peak)
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    finally:
        model.eval()


def test_score_file_encoding_workers_cpu(benchmark, tmp_path):
    """Scoring a file with the default model (python -m mrrm.score's loop): encoding in this process
    vs in 2 worker processes ahead of the model (mrrm.data.pipeline; pool start-up outside the timing, the
    model's forward on one thread so the workers have the other core). Interleaved rounds, medians;
    the same chunks, so the scores are identical (asserted)."""
    import statistics
    import time

    import mrrm
    from mrrm.data.pipeline import EncodePool, encoded_ahead
    from mrrm.train import demo

    path = demo.generate(100 if SMALL else 400, 11, tmp_path / "demo")
    import json

    samples = [json.loads(x) for x in open(path)]
    model = mrrm.load(device="cpu")
    chunk = 64
    chunks = [list(enumerate(samples[i:i + chunk], i)) for i in range(0, len(samples), chunk)]
    media_dir = str(tmp_path / "demo")

    def in_process():
        return [s for c in chunks for s in model.score([x for _, x in c], media_dir=media_dir, errors="skip")]

    pool = EncodePool(model.encoder, 2)
    threads = torch.get_num_threads()

    def workers():
        torch.set_num_threads(1)
        try:
            return [s for _, res in encoded_ahead(pool, chunks, media_dir) for s in model.score_encoded([e for e, _ in res])]
        finally:
            torch.set_num_threads(threads)

    try:
        assert workers() == in_process()  # also warms both paths up
        times = {"in_process": [], "workers_2": []}
        for _ in range(ROUNDS):
            for name, fn in (("in_process", in_process), ("workers_2", workers)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        pool.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update(samples=len(samples), medians_s=med, speedup=med["in_process"] / med["workers_2"],
                                cpu_cores=torch.get_num_threads())
    benchmark.group = "score a file: encoding in process vs 2 worker processes (default model, CPU)"
    benchmark.pedantic(in_process, rounds=1, iterations=1)
