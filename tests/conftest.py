"""Test setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, since @triton.jit reads it at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Subprocesses (commands, scripts, Ray workers) import the checkout under test, whatever mrrm is installed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: CI runs a fixed, derandomized set of examples (a red CI always reproduces);
# HYPOTHESIS_PROFILE=explore draws fresh random examples on every run to hunt for new cases.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(items):
    """Every case run through the Triton interpreter (a `backend` parameter of "triton" on a machine
    without CUDA) is `slow`, like the tests marked by hand (subprocesses, training runs)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if not HAS_CUDA and callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tokenizer():
    """mrrm's offline tokenizer (tests that build tiny models)."""
    from mrrm.model import tiny

    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def families(tokenizer):
    """family -> model_fixtures.TinyFamily, each built once per module (lazily)."""
    from model_fixtures import FAMILIES, build_family

    cache = {}

    def get(family):
        if family not in cache:
            tok = tokenizer if family != "molmo2" else None  # Molmo2 has its own media tokens
            cache[family] = build_family(family, tok, seed=FAMILIES.index(family))
        return cache[family]
    return get
