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
    monkeypatch.setenv("MRRM_OPS", "torch")
    assert all(choose_backend(op, CPU) == "torch" for op in ops.OP_BACKENDS)
    # listwise_ce has no Triton kernel (its GPU kernel is CUDA C++): it stays on auto.
    monkeypatch.setenv("MRRM_OPS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("varlen_attention", CPU) == "triton"
    assert choose_backend("listwise_ce", CPU) == "cpu"


def test_env_per_op_pairs(monkeypatch):
    monkeypatch.setenv("MRRM_OPS", "listwise_ce=torch, gather_value_head=torch")
    assert choose_backend("listwise_ce", CPU) == "torch"
    assert choose_backend("gather_value_head", CPU) == "torch"
    assert choose_backend("varlen_attention", CPU) == "cpu"


@pytest.mark.parametrize("value", ["bogus", "listwise_ce=bogus", "nope=cpu"])
def test_env_typos_are_errors(monkeypatch, value):
    monkeypatch.setenv("MRRM_OPS", value)
    with pytest.raises(ValueError, match="MRRM_OPS"):
        choose_backend("listwise_ce", CPU)


def test_keyword_beats_env_and_says_why_it_cannot_serve(monkeypatch):
    monkeypatch.setenv("MRRM_OPS", "torch")
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


def test_meta_tensors_fall_back_to_torch(monkeypatch):
    monkeypatch.delenv("MRRM_OPS", raising=False)
    assert choose_backend("gather_value_head", torch.device("meta")) == "torch"


def test_linear_attention_ops_choose_here(monkeypatch):
    """Qwen3.5's linear-attention ops are dispatched by the same rules: auto is torch on the CPU (and on a GPU
    without flash-linear-attention), `fla` asked for without it is an error, and the older
    MRRM_LINEAR_ATTENTION still sets them when MRRM_OPS does not name them."""
    from mrrm.ops import _dispatch

    monkeypatch.delenv("MRRM_OPS", raising=False)
    monkeypatch.delenv("MRRM_LINEAR_ATTENTION", raising=False)
    for op in ("causal_conv1d", "gated_delta_rule"):
        assert choose_backend(op, CPU) == "torch"
    monkeypatch.setattr(_dispatch, "fla_available", lambda: False)
    assert choose_backend("gated_delta_rule", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        choose_backend("causal_conv1d", CPU, "fla")
    monkeypatch.setenv("MRRM_LINEAR_ATTENTION", "fla")
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        choose_backend("gated_delta_rule", CPU)
    monkeypatch.setenv("MRRM_OPS", "gated_delta_rule=torch")
    assert choose_backend("gated_delta_rule", CPU) == "torch"


def test_env_reference_routes_the_public_op(monkeypatch):
    """MRRM_OPS=reference (the old name of `torch`, still accepted) must reach the pure-torch
    implementation, not just the chooser."""
    import mrrm.ops.oracle as oracle

    called = {}
    real = oracle.listwise_ce

    def spy(*a, **k):
        called["yes"] = True
        return real(*a, **k)

    monkeypatch.setattr(oracle, "listwise_ce", spy)
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
