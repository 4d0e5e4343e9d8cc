"""What a training run writes besides its model (issue 31): --report-to trackers (TensorBoard, W&B offline),
config.yaml and a rerun from it that reproduces the run, curves.png, and the final joint-vs-single line."""
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from mrrm.errors import ConfigError
from mrrm.train.recipe import (
    CURVES_FILE,
    TrainConfig,
    _resolve_config,
    check_trackers,
    main,
    parse_args,
    report_targets,
    scoring_line,
    train,
    write_curves,
)
from mrrm.train.recipe import (
    RUN_CONFIG_FILE as CONFIG_FILE,
)

# a short demo run: tiny splits, a few steps, every step logged
SHORT_DEMO = ["--demo-train-size", "96", "--demo-eval-size", "40", "--max-steps", "6", "--log-every", "1",
              "--eval-every", "3"]
# log.jsonl fields that are wall-clock measurements (everything else must reproduce bit for bit)
WALL_CLOCK = {"tokens_per_s", "elapsed_s", "cpu_s", "joint_s", "single_s", "speedup"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _without_wall_clock(record):
    if isinstance(record, dict):
        return {k: _without_wall_clock(v) for k, v in record.items() if k not in WALL_CLOCK}
    return record


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------
def test_report_to_takes_names_comma_lists_and_none():
    assert TrainConfig().report_to == [] and parse_args([]).report_to == []
    assert parse_args(["--report-to", "tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    assert parse_args(["--report-to", "wandb", "TensorBoard"]).report_to == ["wandb", "tensorboard"]
    assert parse_args(["--report-to", "none"]).report_to == []
    assert report_targets("wandb") == ["wandb"] and report_targets(None) == []  # a YAML string, a YAML null
    with pytest.raises(SystemExit):
        parse_args(["--report-to", "mlflow"])
    with pytest.raises(ConfigError, match="pick one"):
        report_targets(["none", "wandb"])


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_extra(tmp_path, monkeypatch, capsys, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` does when the package is missing
    with pytest.raises(ConfigError, match=re.escape(f"pip install 'mrrm[{name}]'")):
        check_trackers([name])
    out = tmp_path / "out"
    assert main(["--report-to", name, "--output-dir", str(out)]) == 2  # refused before anything loads or is written
    assert f"mrrm[{name}]" in capsys.readouterr().err and not out.exists()


def test_curves_png_from_a_log_and_one_line_without_matplotlib(tmp_path, monkeypatch):
    records = [{"step": s, "loss": 2.0 / s, "acc": min(1.0, s / 60), "lr": 1e-3} for s in range(1, 61)]
    records += [{"step": 30, "eval": {"best_of_n": 0.4, "n": 10}}, {"step": 60, "final": True, "eval": {"best_of_n": 0.7}}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = []
    path = write_curves(str(tmp_path), log=lines.append)
    assert path == str(tmp_path / CURVES_FILE) and open(path, "rb").read(8) == PNG_MAGIC
    assert Image.open(path).size[0] > 500 and lines == [f"curves: {path}"]
    os.remove(path)
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    lines = []
    assert write_curves(str(tmp_path), log=lines.append) is None
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0] and not os.path.exists(path)


def test_scoring_line():
    c = {"samples": 400, "joint_s": 1.9, "single_s": 6.08, "speedup": 3.2, "joint_flops": 10, "single_flops": 34,
         "flops_ratio": 3.4}
    assert scoring_line(c) == "held-out (400 samples): joint 1.90 s vs single 6.08 s (3.2x faster), FLOPs 3.4x fewer"


# ---------------------------------------------------------------------------------------------
# a short demo run with both trackers, and its rerun from config.yaml
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """(args, output dir, summary, stdout) of a short demo run reporting to TensorBoard and W&B (offline)."""
    out = str(tmp_path_factory.mktemp("tracked") / "a")
    args = SHORT_DEMO + ["--report-to", "tensorboard,wandb", "--output-dir", out]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            summary = train(parse_args(args))
    return args, out, summary, printed.getvalue()


@pytest.mark.slow
def test_a_run_writes_its_trackers_config_curves_and_the_joint_vs_single_line(tracked_run):
    args, out, summary, printed = tracked_run
    tb = os.path.join(out, "tensorboard")
    assert any(f.startswith("events.out.tfevents.") and os.path.getsize(os.path.join(tb, f)) > 0 for f in os.listdir(tb))
    runs = [d for d in os.listdir(os.path.join(out, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(os.path.join(out, "wandb"))
    files = os.listdir(os.path.join(out, "wandb", runs[0]))
    assert any(f.endswith(".wandb") and os.path.getsize(os.path.join(out, "wandb", runs[0], f)) > 0 for f in files), files

    # config.yaml: every field, resolved, and --config takes it back as the same TrainConfig
    saved = yaml.safe_load(open(os.path.join(out, CONFIG_FILE)))
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)}
    loaded = parse_args(["--config", os.path.join(out, CONFIG_FILE)])
    assert loaded.threads >= 1 and loaded.lr is not None and loaded.loss is not None and loaded.max_steps == 6
    assert loaded == dataclasses.replace(_resolve_config(parse_args(args)), threads=loaded.threads)

    with open(os.path.join(out, CURVES_FILE), "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    assert Image.open(os.path.join(out, CURVES_FILE)).size[0] > 500

    # the final record and the last line: the held-out set scored jointly and singly, both ratios > 1
    final = _records(out)[-1]
    assert final["final"] and final["eval"] == summary["eval"] and final["scoring"] == summary["scoring"]
    c = final["scoring"]
    assert c["samples"] == 40 and c["speedup"] > 1 and c["flops_ratio"] > 1 and c["single_flops"] > c["joint_flops"]
    last = printed.strip().splitlines()[-1]
    assert last == scoring_line(c), last
    m = re.fullmatch(r"held-out \(40 samples\): joint [\d.]+ s vs single [\d.]+ s \(([\d.]+)x faster\), FLOPs ([\d.]+)x fewer",
                     last)
    assert m and float(m.group(1)) > 1 and float(m.group(2)) > 1, last
    assert printed.splitlines()[0].startswith("threads: ")


@pytest.mark.slow
def test_rerun_from_the_saved_config_reproduces_the_run(tracked_run, tmp_path):
    """`python -m mrrm.train --config a/config.yaml --output-dir b`, in a new process: the same log.jsonl
    byte for byte but for its wall-clock fields, and the same weights, file for file."""
    _, a, _, _ = tracked_run
    b = str(tmp_path / "b")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OMP_WAIT_POLICY")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    res = subprocess.run([sys.executable, "-m", "mrrm.train", "--config", os.path.join(a, CONFIG_FILE), "--output-dir", b],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OMP_WAIT_POLICY=PASSIVE" in res.stdout.splitlines()[0]  # the command line's threads sleep while waiting
    lines = [[json.dumps(_without_wall_clock(r)) for r in _records(out)] for out in (a, b)]
    assert len(lines[0]) == 6 + 1 + 1 and lines[0] == lines[1]  # 6 steps, the evaluation at step 3, the final record
    for rel in (os.path.join("model", "value_head.safetensors"), os.path.join("model", "backbone", "model.safetensors")):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    saved_b = yaml.safe_load(open(os.path.join(b, CONFIG_FILE)))
    saved_a = yaml.safe_load(open(os.path.join(a, CONFIG_FILE)))
    assert {k: v for k, v in saved_b.items() if k != "output_dir"} == {k: v for k, v in saved_a.items() if k != "output_dir"}
