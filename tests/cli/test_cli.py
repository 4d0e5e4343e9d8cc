"""The one command-line entry: `mrrm <command>` / `python -m mrrm <command>` (mrrm.cli)."""
import dataclasses
import importlib
import inspect
import pickle
import subprocess
import sys
from importlib import metadata

import pytest

import mrrm
from mrrm import cli
from mrrm.model import api
from mrrm.train import demo


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
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"mrrm {mrrm.__version__}\n"


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
    command is mrrm.cli.score_file), so the signature, the docstring and pickling are the function's."""
    with pytest.raises(ImportError, match="mrrm.cli.score_file"):
        importlib.import_module("mrrm.score")
    assert mrrm.score is api.score
    assert list(inspect.signature(mrrm.score).parameters)[:2] == ["batch", "model"]
    assert pickle.loads(pickle.dumps(mrrm.score)) is api.score
    assert cli.COMMANDS["score"] == "mrrm.cli.score_file"


def test_one_set_of_model_flags_and_one_device_default():
    """score, eval and serve take --model/--mode/--max-batch-tokens/--device/--dtype from one place
    (mrrm._args.add_model_args): the same defaults, choices and help; one device rule."""
    import torch

    from mrrm.cli import score_file as score_cli
    from mrrm.common import MODES
    from mrrm.eval import benchmarks as mev
    from mrrm.rl import serve

    flags = ("--model", "--mode", "--max-batch-tokens", "--device", "--dtype")

    def spec(parser):
        acts = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
        return {f: (acts[f].default, acts[f].choices, acts[f].help, acts[f].type) for f in flags}

    specs = [spec(m.build_parser()) for m in (score_cli, mev, serve)]
    assert specs[0] == specs[1] == specs[2]
    assert specs[0]["--mode"][1] == MODES and specs[0]["--device"][0] is None
    assert api.resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert api.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device 'gpu0'"):
        api.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            api.resolve_device("cuda:0")
    assert api.resolve_dtype("bfloat16") is torch.bfloat16 and api.resolve_dtype(None) is None
    with pytest.raises(ValueError, match="not a torch dtype"):
        api.resolve_dtype("float128")
    with pytest.raises(ValueError, match="neither a directory .* nor a Hugging Face Hub id"):
        api.load_model("/no/such/checkpoint")


def test_media_budget_flags_in_every_command_that_reads_media(tmp_path, capsys):
    """--max-image-megapixels ... --max-videos-per-sample: the same flags in score, eval, serve and
    train; they give one MediaBudgets value, set on the loaded model's encoder for the run (encoding
    worker processes get it with the encoder: tests/test_pipeline.py), never module state."""
    import json

    from PIL import Image

    from mrrm.cli import score_file as score_cli
    from mrrm.data import budgets, media
    from mrrm.eval import benchmarks as mev
    from mrrm.rl import serve
    from mrrm.train import recipe as train

    flags = {"--" + f.replace("_", "-") for f in budgets.MEDIA_BUDGET_FLAGS}
    assert flags == set(media.MediaBudgets.FLAGS.values())
    for parser in (score_cli.build_parser(), mev.build_parser(), serve.build_parser()):
        assert flags <= {s for a in parser._actions for s in a.option_strings}
    assert set(budgets.MEDIA_BUDGET_FLAGS) <= {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert not [name for name in vars(media) if name.startswith("MAX_")]  # no module-level budgets

    # flags -> one value (megapixels -> pixels); None keeps the default; errors name the flag
    assert budgets.media_budgets_from_args({}) == media.DEFAULT_MEDIA_BUDGETS
    got = budgets.media_budgets_from_args(score_cli.build_parser().parse_args(
        ["--data", "d", "--out", "o", "--max-image-megapixels", "0.5", "--max-images-per-sample", "2"]))
    assert got == media.MediaBudgets(image_pixels=500_000, images_per_sample=2)
    with pytest.raises(ValueError, match="--max-images-per-sample must be a whole number"):
        budgets.media_budgets_from_args({"max_images_per_sample": 1.5})
    with pytest.raises(ValueError, match="--max-sample-megapixels must be at least one pixel"):
        budgets.media_budgets_from_args({"max_sample_megapixels": 1e-9})
    assert train.build_model(train.TrainConfig(max_videos_per_sample=2.0)).encoder.media_budgets == \
        media.MediaBudgets(videos_per_sample=2)

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"prompt": "p", "responses": ["a", "b"], "images": ["a.png"]},
            {"prompt": "p", "responses": ["a", "b"], "images": ["a.png", "a.png"]}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    default_encoder = api.load_model(device="cpu").encoder  # the cached default model, which the run uses
    out = tmp_path / "out.jsonl"
    assert score_cli.main(["--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress",
                           "--max-images-per-sample", "1"]) == 1  # a line not scored: exit 1
    errors = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert [e["line"] for e in errors] == [2] and "2 images, over the limit of 1 per sample" in errors[0]["error"]
    assert "(--max-images-per-sample" in errors[0]["error"]
    assert default_encoder.media_budgets == media.DEFAULT_MEDIA_BUDGETS  # for the run only: given back
    assert score_cli.main(["--data", str(data), "--out", str(tmp_path / "o2.jsonl"), "--max-image-megapixels", "-1"]) == 2
    assert "--max-image-megapixels must be a positive number" in capsys.readouterr().err
