"""Backend selection: MRRM_OPS, the backend= keyword, and the errors of backends that cannot serve."""
import pytest
import torch

from mrrm import ops
from mrrm.ops._dispatch import choose_backend

CPU = torch.device("cpu")


def test_auto_picks_cpu_kernels_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MRRM_OPS", raising=False)
    assert choose_backend("varlen_attention", CPU) == "cpu"
    assert choose_backend("gather_value_head", CPU) == "cpu"
    assert choose_backend("listwise_ce", CPU) == "cpu"


def test_env_single_name_applies_where_the_op_has_it(monkeypatch):
    monkeypatch.setenv("MRRM_OPS", "reference")
    assert all(choose_backend(op, CPU) == "reference" for op in ops.OP_BACKENDS)
    # listwise_ce has no Triton kernel (its GPU kernel is CUDA C++): it stays on auto.
    monkeypatch.setenv("MRRM_OPS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("varlen_attention", CPU) == "triton"
    assert choose_backend("listwise_ce", CPU) == "cpu"


def test_env_per_op_pairs(monkeypatch):
    monkeypatch.setenv("MRRM_OPS", "listwise_ce=reference, gather_value_head=reference")
    assert choose_backend("listwise_ce", CPU) == "reference"
    assert choose_backend("gather_value_head", CPU) == "reference"
    assert choose_backend("varlen_attention", CPU) == "cpu"


@pytest.mark.parametrize("value", ["bogus", "listwise_ce=bogus", "nope=cpu"])
def test_env_typos_are_errors(monkeypatch, value):
    monkeypatch.setenv("MRRM_OPS", value)
    with pytest.raises(ValueError, match="MRRM_OPS"):
        choose_backend("listwise_ce", CPU)


def test_keyword_beats_env_and_says_why_it_cannot_serve(monkeypatch):
    monkeypatch.setenv("MRRM_OPS", "reference")
    assert choose_backend("listwise_ce", CPU, "cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no 'triton' backend"):
        choose_backend("listwise_ce", CPU, "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        choose_backend("listwise_ce", CPU, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        choose_backend("varlen_attention", CPU, "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("varlen_attention", CPU, "tpu")


def test_meta_tensors_fall_back_to_reference(monkeypatch):
    monkeypatch.delenv("MRRM_OPS", raising=False)
    assert choose_backend("gather_value_head", torch.device("meta")) == "reference"


def test_env_reference_routes_the_public_op(monkeypatch):
    """MRRM_OPS=reference must reach the reference implementation, not just the chooser."""
    import mrrm.ops.oracle as reference

    called = {}
    real = reference.listwise_ce

    def spy(*a, **k):
        called["yes"] = True
        return real(*a, **k)

    monkeypatch.setattr(reference, "listwise_ce", spy)
    monkeypatch.setenv("MRRM_OPS", "reference")
    scores = torch.randn(5, requires_grad=True)
    loss = ops.listwise_ce(scores, torch.tensor([0, 2, 5]), torch.tensor([1, 0]))
    loss.backward()
    assert called.get("yes") and scores.grad is not None


def test_flash_backend_absent_is_explained(monkeypatch):
    from mrrm.ops import _dispatch

    if _dispatch.flash_attn_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RuntimeError, match="flash-attn"):
        choose_backend("varlen_attention", CPU, "flash")
