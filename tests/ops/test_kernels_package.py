"""The Triton kernels live in the repository's top-level kernels/ folder and import as mrrm.kernels from a
checkout, an editable install and a wheel, without shadowing Hugging Face's `kernels` package (a dependency
of transformers >= 5.25) when Python runs from the repository root."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import mrrm.kernels.varlen_attention as va, mrrm.kernels.value_head as vh
out = {"va": va.__file__, "vh": vh.__file__, "mrrm": __import__("mrrm").__file__}
try:
    import kernels
    out["kernels"] = getattr(kernels, "__file__", None)
    out["kernels_path"] = list(getattr(kernels, "__path__", []))
except ImportError:
    out["kernels"] = "absent"
import transformers
from transformers.utils import is_kernels_available
out["transformers"] = transformers.__version__
out["hf_kernels_available"] = is_kernels_available()
print(json.dumps(out))
"""


def _probe(cwd, env=None):
    import json

    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hf_kernels_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("kernels")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
def test_from_the_repository_root_hf_kernels_is_not_shadowed():
    """From the root (cwd first on sys.path, as `python -m pytest` and scripts run) mrrm.kernels is the
    kernels/ folder and `import kernels` is still Hugging Face's package: the folder has no __init__.py, so
    it is only a namespace-package portion, which a regular package later on sys.path wins over."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    got = _probe(REPO, {"PYTHONPATH": str(REPO)})
    assert Path(got["va"]).resolve() == REPO / "kernels" / "varlen_attention.py"
    assert Path(got["vh"]).resolve() == REPO / "kernels" / "value_head.py"
    if _hf_kernels_installed():
        assert got["kernels"] and Path(got["kernels"]).resolve().parent != REPO / "kernels", got
        assert got["hf_kernels_available"], got
    else:  # our folder, found as a namespace portion, must not make transformers think kernels is there
        assert not got["hf_kernels_available"], got


@pytest.mark.slow
def test_installed_layout_of_a_wheel(tmp_path):
    """What a wheel holds (setuptools' build_py with pyproject's package-dir mapping): mrrm/kernels/ next to
    the other subpackages, importable from anywhere without the repository."""
    build = tmp_path / "build"
    done = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                           "--build-lib", str(build)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("varlen_attention.py", "value_head.py", "aot.py"):
        assert (build / "mrrm" / "kernels" / name).is_file(), name
    for pkg in ("ops", "data", "model", "train", "eval", "rl", "cli"):
        assert (build / "mrrm" / pkg / "__init__.py").is_file(), pkg
    assert (build / "mrrm" / "model" / "default_model" / "mrrm_config.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _probe(elsewhere, {"PYTHONPATH": str(build)})
    assert Path(got["mrrm"]).resolve().parent == (build / "mrrm").resolve()
    assert Path(got["va"]).resolve() == (build / "mrrm" / "kernels" / "varlen_attention.py").resolve()


@pytest.mark.slow
def test_an_installed_checkout_mounts_its_kernels_folder(tmp_path):
    """An editable install (or PYTHONPATH pointing at a checkout) imports mrrm from the checkout's mrrm/,
    which has no kernels/ of its own: mrrm mounts the checkout's top-level kernels/ as mrrm.kernels."""
    got = _probe(tmp_path, {"PYTHONPATH": str(REPO)})
    assert Path(got["va"]).resolve() == REPO / "kernels" / "varlen_attention.py"
