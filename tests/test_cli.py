"""The one command-line entry: `mrrm <command>` / `python -m mrrm <command>` (mrrm.cli)."""
import importlib
import inspect
import pickle
import subprocess
import sys
from importlib import metadata

import pytest

import mrrm
from mrrm import api, cli, demo


def test_every_command_is_a_module_main():
    assert set(cli.COMMANDS) == {"score", "train", "eval", "serve", "demo", "prefgraph", "flops", "tour"}
    for command, module in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), command
        assert f"mrrm {command} " in cli.usage()


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2  # no command: usage, as an error
    assert "usage: mrrm <command>" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["scroe"]) == 2
    assert "unknown command 'scroe'" in capsys.readouterr().err


def test_command_runs_the_module_with_its_arguments(tmp_path, capsys):
    """`mrrm demo ...` is `python -m mrrm.demo ...`: the same split, byte for byte."""
    assert cli.main(["demo", "--seed", "3", "--n", "4", "--out", str(tmp_path / "a")]) == 0
    assert "colour" in capsys.readouterr().out  # the module's own summary
    b = demo.generate(4, seed=3, out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "data.jsonl").read_bytes() == b.read_bytes()
    with pytest.raises(SystemExit) as e:  # the module's argparse handles its own flags
        cli.main(["demo", "--no-such-flag"])
    assert e.value.code == 2


def test_console_script_is_installed():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("mrrm") == "mrrm.cli:main"


@pytest.mark.slow
def test_python_m_mrrm_runs_a_command():
    done = subprocess.run([sys.executable, "-m", "mrrm", "tour", "--samples", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "max |independent - single|" in done.stdout
    assert subprocess.run([sys.executable, "-m", "mrrm"], capture_output=True, text=True).returncode == 2


def test_mrrm_score_is_only_the_function():
    """`mrrm.score` stays the function whatever is imported: `import mrrm.score` is refused (the
    command is mrrm.score_cli), so the signature, the docstring and pickling are the function's."""
    with pytest.raises(ImportError, match="mrrm.score_cli"):
        importlib.import_module("mrrm.score")
    assert mrrm.score is api.score
    assert list(inspect.signature(mrrm.score).parameters)[:2] == ["batch", "model"]
    assert pickle.loads(pickle.dumps(mrrm.score)) is api.score
    assert cli.COMMANDS["score"] == "mrrm.score_cli"
