"""The compiled backends as torch.library custom ops: torch.library.opcheck (schema, fake / meta
implementations, autograd registration, AOT dispatch with dynamic shapes) on the CPU, and the packed
scoring forward of a tiny vision-language model under torch.compile(fullgraph=True): no graph break,
the same scores as eager."""
import numpy as np
import pytest
import torch
from PIL import Image

from mrrm import ops
from mrrm.model.api import build_default_model

torch.manual_seed(0)
LENGTHS = [7, 13, 1, 9]


def _attention_inputs(mask, blocks=False, dtype=torch.float32):
    T = sum(LENGTHS)
    cu = torch.tensor([0] + np.cumsum(LENGTHS).tolist(), dtype=torch.int32)
    q = torch.randn(T, 4, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(T, 2, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    seg = None
    if mask == "shared_prefix":
        seg = torch.cat([torch.tensor([0] * (n // 2) + [1] * (n - n // 2 - n // 4) + [2] * (n // 4)) for n in LENGTHS])
        seg = seg.to(torch.int32)
    blk = None
    if blocks:
        blk = torch.full((T,), -1, dtype=torch.int32)
        blk[1:3] = 0  # inside the first sequence's prefix
    return q, k, v, cu, max(LENGTHS), mask, seg, blk, 0.35, "cpu"


@pytest.mark.parametrize("mask,blocks", [("causal", False), ("bidirectional", False), ("shared_prefix", False),
                                         ("causal", True), ("shared_prefix", True)])
def test_opcheck_varlen_attention(mask, blocks):
    args = _attention_inputs(mask, blocks)
    torch.library.opcheck(torch.ops.mrrm.varlen_attention_fwd.default, args)
    q, k, v, cu, L, mask, seg, blk, scale, backend = args
    with torch.no_grad():
        out, lse = torch.ops.mrrm.varlen_attention_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mrrm.varlen_attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, cu, L, mask, seg, blk, scale, backend))


def test_opcheck_gather_value_head():
    T, H, D, M = 23, 16, 12, 6
    hidden = torch.randn(T, H, requires_grad=True)
    w1, b1 = torch.randn(D, H, requires_grad=True), torch.randn(D, requires_grad=True)
    w2, b2 = torch.randn(1, D, requires_grad=True), torch.randn(1, requires_grad=True)
    positions = torch.tensor([0, 5, 5, 9, 22, 13])
    for store_z in (True, False):
        torch.library.opcheck(torch.ops.mrrm.gather_value_head_fwd.default,
                              (hidden, positions, w1, b1, w2, b2, "gelu", 0.5, store_z, store_z, "cpu"))
    with torch.no_grad():
        out, z, repeats = torch.ops.mrrm.gather_value_head_fwd(hidden, positions, w1, b1, w2, b2, "gelu", 0.5, True,
                                                               True, "cpu")
    for need_hidden in (True, False):
        torch.library.opcheck(torch.ops.mrrm.gather_value_head_bwd.default,
                              (torch.randn(M), hidden.detach(), positions, w1.detach(), b1.detach(), w2.detach(),
                               b2.detach(), z, repeats, "gelu", 0.5, need_hidden, "cpu"))


@pytest.mark.parametrize("loss", ["best", "plackett_luce", "soft"])
def test_opcheck_listwise_ce(loss):
    offsets = torch.tensor([0, 3, 4, 8])
    scores = torch.randn(8, requires_grad=True)
    targets = {"best": torch.tensor([2, 0, 1]), "plackett_luce": torch.tensor([2, 1, 1, 1, 4, 1, 3, 2]),
               "soft": torch.tensor([0.2, 0.8, 0.0, 1.0, 0.25, 0.25, 0.25, 0.25])}[loss]
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.mrrm.listwise_ce_fwd_bwd.default, (scores, offsets, targets, loss, reduction))


def test_ops_train_step_compiles_and_matches_eager():
    """attention -> value head -> listwise loss, forward and backward, in one compiled graph."""
    q, k, v, cu, L, mask, seg, blk, scale, _ = _attention_inputs("shared_prefix")
    w1, b1 = torch.randn(12, 32, requires_grad=True), torch.randn(12, requires_grad=True)
    w2, b2 = torch.randn(1, 12, requires_grad=True), torch.randn(1, requires_grad=True)
    positions = (cu[1:] - 1).long()
    offsets, targets = torch.tensor([0, 2, 4]), torch.tensor([1, 0])

    def step(q, k, v, w1, b1, w2, b2):
        out = ops.varlen_attention(q, k, v, cu, L, mask=mask, segment_ids=seg, check_inputs=False)
        scores = ops.gather_value_head(out.reshape(out.shape[0], -1), positions, w1, b1, w2, b2, check_inputs=False)
        return ops.listwise_ce(scores, offsets, targets, check_inputs=False)

    leaves = (q, k, v, w1, b1, w2, b2)
    want = step(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.fixture(scope="module")
def model_and_batches():
    model = build_default_model().eval()
    img = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    samples = [{"prompt": "What is shown?", "image": img, "responses": ["a cat", "a dog", "a red car"]},
               {"prompt": "Name a colour.", "responses": ["red", "blue"]}]
    encoded, _ = model.encoder.encode_all(samples)
    return model, {mode: next(model.micro_batches(encoded, mode, None)) for mode in ("joint", "independent", "single")}


def _compiled_scores(model, inputs, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(inputs)
        got = torch.compile(model, fullgraph=True, backend=backend)(inputs)
    return got, want


@pytest.mark.parametrize("mode", ["joint", "independent", "single"])
def test_packed_scoring_forward_traces_in_one_graph(model_and_batches, mode):
    """fullgraph=True raises at any graph break: the vision tower, the text model with mrrm's
    attention and the fused value head trace as one graph (AOT autograd, eager kernels)."""
    model, batches = model_and_batches
    got, want = _compiled_scores(model, batches[mode], "aot_eager")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_packed_scoring_forward_compiles_with_inductor(model_and_batches):
    """The same graph through Inductor (generated C++ kernels around mrrm's ops): ~20-30 s on 2 cores."""
    model, batches = model_and_batches
    got, want = _compiled_scores(model, batches["joint"], "inductor")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
