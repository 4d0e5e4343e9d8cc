"""Every documented entry point keeps working after the move into subpackages: `python -m mrrm.<name>` for
each command, `mrrm.<name>` importable as the very module that implements it (one module under two names,
so patching either patches both), veRL's file-path loading of mrrm/grpo.py, and the public names of
`mrrm` (load, score, the errors) resolved lazily."""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import mrrm

REPO = Path(__file__).resolve().parents[2]
KEPT = {"serve": "mrrm.rl.serve", "grpo": "mrrm.rl.grpo", "prefgraph": "mrrm.eval.prefgraph",
        "flops": "mrrm.eval.flops", "demo": "mrrm.train.demo", "tour": "mrrm.cli.tour"}


@pytest.mark.parametrize("name", sorted(KEPT))
def test_old_module_path_is_the_implementation(name):
    assert importlib.import_module(f"mrrm.{name}") is importlib.import_module(KEPT[name])
    assert getattr(mrrm, name) is importlib.import_module(KEPT[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["score", "train", "eval", "serve", "prefgraph", "flops", "demo", "tour"])
def test_python_dash_m_runs_each_command(name):
    done = subprocess.run([sys.executable, "-m", f"mrrm.{name}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_verl_loads_grpo_from_its_file_path():
    """veRL's custom_reward_function.path may be a file: it is loaded under another module name and its
    functions read as attributes, at the kept path and at the implementation's."""
    for path in (REPO / "mrrm" / "grpo.py", Path(mrrm.grpo.__file__)):
        spec = importlib.util.spec_from_file_location("custom_module", str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.compute_score) and callable(module.compute_score_row)


def test_public_names_and_errors():
    from mrrm.errors import MrrmError
    from mrrm.errors import __all__ as error_names
    from mrrm.model.api import load, score

    assert mrrm.load is load and mrrm.score is score
    for name in error_names:
        cls = getattr(mrrm, name)
        assert issubclass(cls, MrrmError), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mrrm.nope  # noqa: B018


def test_the_extension_imports_on_its_own():
    """`import mrrm` loads no torch, yet mrrm._C (linked against torch's libraries) imports first thing."""
    done = subprocess.run([sys.executable, "-c", "import mrrm._C as C; print(callable(C.has_cuda))"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
