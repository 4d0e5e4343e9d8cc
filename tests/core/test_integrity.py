"""Issue 29, rows 1, 6, 7 and 11: nothing mrrm reads back runs pickled code, every file a resume or a verified
load reads is covered by a checksum manifest, and a resume with settings that change the model or the data is
refused naming each one.

The attacker of these tests can write every file of a run directory or a checkpoint: a crafted pickle comes
with its checksums recomputed (mrrm's `checksums.sha256` and the older `state.sha256` alike). What stops it is
that nothing is unpickled beyond tensors and plain values; what the manifests stop is damage."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import struct

import pytest
import torch

from mrrm import integrity
from mrrm.errors import MrrmError

# a bare pickle.dump writes protocol 4, which torch's restricted reader warns about before refusing it
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _RunsCode:
    """A pickle that, when loaded with torch.load(weights_only=False), creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _recompute_checksums(directory):
    """What an attacker does after swapping a file: the checksum files there made to match again (sha256sum's
    format for checksums.sha256, the bare digest of state.pt for an older mrrm's state.sha256)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        rel = os.path.relpath(path, directory)
        if os.path.isfile(path) and rel not in ("checksums.sha256", "state.sha256"):
            lines.append(f"{hashlib.sha256(open(path, 'rb').read()).hexdigest()}  {rel}\n")
    if os.path.exists(os.path.join(directory, "checksums.sha256")):
        with open(os.path.join(directory, "checksums.sha256"), "w") as fh:
            fh.writelines(lines)
    if os.path.exists(os.path.join(directory, "state.sha256")):
        with open(os.path.join(directory, "state.sha256"), "w") as fh:
            fh.write(hashlib.sha256(open(os.path.join(directory, "state.pt"), "rb").read()).hexdigest() + "\n")


def _flip(path, offset=None, count=16):
    raw = bytearray(open(path, "rb").read())
    at = len(raw) // 2 if offset is None else offset
    raw[at:at + count] = bytes(b ^ 0xFF for b in raw[at:at + count])
    open(path, "wb").write(bytes(raw))


def _tiny_checkpoint(out, step=1, extra=None):
    """A training checkpoint of a small module, as mrrm.train writes it; `extra` (a folder) moved in as
    deepspeed/ the way a DeepSpeed run's partition files are."""
    from mrrm.train.recipe import save_checkpoint

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(str(out), step, model, opt, sched, {"epoch": 0, "offset": 4}, keep_last=5,
                           signature={"seed": 0}, extra_dir=extra)


# -- row 1: no pickle from any file a run or a user hands us ------------------------------------------------
def test_row1_a_crafted_state_pt_with_recomputed_checksums_never_runs_code(tmp_path):
    """Resume reads checkpoints/step-*/state.pt: a crafted pickle (its checksums recomputed) is refused by
    name and runs nothing; the torch files of every other load path are read the same way (a static check
    over mrrm/: every torch.load has weights_only=True, and nothing unpickles a file)."""
    from mrrm.train.recipe import load_intact_checkpoint

    ckpt = _tiny_checkpoint(tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCode(marker), "step": 1}, os.path.join(ckpt, "state.pt"))
    _recompute_checksums(ckpt)
    said, refused = [], None
    try:
        load_intact_checkpoint(str(tmp_path / "run"), log=said.append)
    except MrrmError as e:
        refused = str(e)
    assert not marker.exists(), "the crafted state.pt ran code on resume"
    assert re.search(r"step-00000001/state.pt: refused: it holds more than tensors", refused or ""), refused
    assert "Nothing from it was run" in said[0]
    # the same restricted reader for any torch file: zip and legacy torch.save formats, a bare pickle
    for name, write in (("zip.pt", lambda p: torch.save(_RunsCode(marker), p)),
                        ("legacy.pt", lambda p: torch.save(_RunsCode(marker), p, _use_new_zipfile_serialization=False)),
                        ("raw.pkl", lambda p: __import__("pickle").dump(_RunsCode(marker), open(p, "wb")))):
        write(str(tmp_path / name))
        with pytest.raises(integrity.UnsafeFileError, match=re.escape(str(tmp_path / name)) + ": refused"):
            integrity.load_torch_file(str(tmp_path / name))
        assert not marker.exists(), name
    # every torch.load call in the package is restricted, and nothing unpickles a file (pickle.loads of the
    # encoder that mrrm.data.pipeline itself sends to its worker processes reads no file)
    import ast

    loads = 0
    for path in glob.glob(os.path.join(REPO, "mrrm", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = getattr(node.func.value, "id", None)
            if (owner, node.func.attr) == ("torch", "load"):
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
            assert (owner, node.func.attr) not in (("pickle", "load"), ("pickle", "Unpickler")), \
                f"{path}:{node.lineno}: unpickles a file"
    assert loads >= 2  # mrrm.integrity.load_torch_file and the authors' value_head.pt


def test_row1_value_head_pt_of_the_authors_layout_never_runs_code(tmp_path):
    """The authors' value_head.pt (a plain state dict) is read with weights_only=True: a crafted one is a
    clear error naming it, and runs nothing."""
    from mrrm.model.checkpoints import _load_value_head

    marker = tmp_path / "code-ran"
    torch.save({"weight": _RunsCode(marker)}, tmp_path / "value_head.pt")
    with pytest.raises(ValueError, match="value_head.pt: cannot be read as a torch state dict"):
        _load_value_head(str(tmp_path), {"resp_repr_mode": "last", "value_head_hidden_dim": None,
                                         "value_head_activation": "silu"}, 8)
    assert not marker.exists()


# -- row 6: every file a resume reads is covered by a manifest ----------------------------------------------
def test_row6_every_file_of_a_checkpoint_is_verified_partitions_included(tmp_path):
    """DeepSpeed's partition files (deepspeed/) are covered by the checkpoint's checksums.sha256 with
    state.pt: a flipped byte in one, a file missing or a file added makes the resume skip that checkpoint,
    naming the file, and fall back to an older intact one; a checkpoint without a manifest is resumed only
    with --resume-unverified (said in the log), else skipped naming the flag."""
    from mrrm.train.recipe import load_intact_checkpoint

    out = tmp_path / "run"
    for step in (1, 2):
        extra = tmp_path / f"ds{step}"
        (extra / "zero").mkdir(parents=True)
        for rank in (0, 1):
            torch.save({"optimizer_state_dict": {"fp32": torch.arange(64.0) + step}},
                       extra / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        _tiny_checkpoint(out, step, extra=str(extra))
    newest = out / "checkpoints" / "step-00000002"
    lines = (newest / "checksums.sha256").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == [
        "deepspeed/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt", "state.pt"]
    partition = newest / "deepspeed" / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    good = partition.read_bytes()
    _flip(str(partition), offset=len(good) - 100, count=1)
    said = []
    path, state = load_intact_checkpoint(str(out), log=said.append)
    assert path.endswith("step-00000001") and state["step"] == 1
    assert "step-00000002 skipped" in said[0] and \
        "deepspeed/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt: does not match its SHA-256" in said[0], said
    partition.write_bytes(good)
    assert load_intact_checkpoint(str(out), log=said.append)[0].endswith("step-00000002")
    (newest / "deepspeed" / "zero" / "extra.pt").write_bytes(b"x")  # a file added after the save
    said.clear()
    assert load_intact_checkpoint(str(out), log=said.append)[0].endswith("step-00000001")
    assert "zero/extra.pt: not listed in" in said[0]
    os.remove(newest / "deepspeed" / "zero" / "extra.pt")
    # no manifest: skipped unless --resume-unverified, never resumed silently
    os.remove(newest / "checksums.sha256")
    said.clear()
    assert load_intact_checkpoint(str(out), log=said.append)[0].endswith("step-00000001")
    assert "no checksums.sha256 to verify its files against; pass --resume-unverified" in said[0]
    said.clear()
    assert load_intact_checkpoint(str(out), log=said.append, unverified=True)[0].endswith("step-00000002")
    assert "resuming it UNVERIFIED (--resume-unverified)" in said[0]
    # an older mrrm's state.sha256 covers state.pt only: enough without partitions, not with them
    os.remove(out / "checkpoints" / "step-00000001" / "checksums.sha256")
    with open(newest / "state.sha256", "w") as fh:
        fh.write(integrity.sha256_file(str(newest / "state.pt")) + "\n")
    with pytest.raises(MrrmError, match="covers state.pt but not deepspeed/; pass --resume-unverified"):
        load_intact_checkpoint(str(out), log=lambda *a: None)
    shutil.rmtree(newest / "deepspeed")
    assert load_intact_checkpoint(str(out), log=lambda *a: None)[0].endswith("step-00000002")


def test_manifest_format_is_sha256sum_and_refuses_paths_outside(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"weights")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("hidden folders are no part of a model")
    integrity.write_manifest(str(tmp_path))
    assert (tmp_path / "checksums.sha256").read_text() == \
        f"{hashlib.sha256(b'weights').hexdigest()}  a/w.bin\n"
    assert integrity.verify_manifest(str(tmp_path)) == ["a/w.bin"]
    (tmp_path / "checksums.sha256").write_text(f"{'0' * 64}  ../outside\n")
    with pytest.raises(integrity.ChecksumError, match=r"checksums.sha256:1: '../outside' is not a plain path"):
        integrity.verify_manifest(str(tmp_path))
    (tmp_path / "checksums.sha256").write_text("not a line\n")
    with pytest.raises(integrity.ChecksumError, match=r"checksums.sha256:1: not a sha256sum line"):
        integrity.verify_manifest(str(tmp_path))
    os.remove(tmp_path / "checksums.sha256")
    with pytest.raises(integrity.NoManifest, match="no checksums.sha256"):
        integrity.verify_manifest(str(tmp_path))
    # a linked folder is covered like any other (loaders follow the link); a link back up is not walked twice
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    elsewhere.mkdir()
    (elsewhere / "x.bin").write_bytes(b"x")
    os.symlink(elsewhere, tmp_path / "a" / "linked")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    integrity.write_manifest(str(tmp_path))
    assert integrity.verify_manifest(str(tmp_path)) == ["a/linked/x.bin", "a/w.bin"]
    (elsewhere / "y.bin").write_bytes(b"y")
    with pytest.raises(integrity.ChecksumError, match="a/linked/y.bin: not listed"):
        integrity.verify_manifest(str(tmp_path))


# -- row 7: a resume with settings that change the model or the data -----------------------------------------
@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    from colour_task import _write_colour_task

    return _write_colour_task(str(tmp_path_factory.mktemp("colour")), n=16)


@pytest.mark.slow
def test_row7_resume_with_changed_settings_is_refused_naming_each(tmp_path, colour_data):
    """Settings that change the model or the data refuse a resume, naming each (old -> new): the model's
    (resp_repr_mode, head_activation) and the optimizer state's (lr) even with --force-resume; the data's
    (video_fps, max_length) unless --force-resume, which then records them in model/'s training record.
    Cadence settings change freely. A checkpoint without its manifest is refused unless --resume-unverified."""
    from mrrm.train.recipe import parse_args, train

    out = str(tmp_path / "run")
    common = ["--data", colour_data, "--base-model", "tiny", "--eval-data", colour_data, "--head-hidden", "16",
              "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "0", "--save-every", "1", "--keep-last", "5",
              "--output-dir", out]
    train(parse_args(common + ["--max-steps", "1"]))
    for flags, said in ((["--resp-repr-mode", "first"], "resp_repr_mode 'last' -> 'first'"),
                        (["--head-activation", "gelu"], "head_activation 'silu' -> 'gelu'"),
                        (["--lr", "1e-3", "--force-resume"], "lr 0.002 -> 0.001")):
        with pytest.raises(MrrmError, match="settings a resume cannot change: " + re.escape(said)):
            train(parse_args(common + ["--max-steps", "2"] + flags))
    with pytest.raises(MrrmError, match=re.escape("other settings: video_fps None -> 1.0, max_length 4096 -> 512;")):
        train(parse_args(common + ["--max-steps", "2", "--video-fps", "1", "--max-length", "512"]))
    # logging cadence is free; --force-resume continues with the new data settings and says so in model/
    train(parse_args(common + ["--max-steps", "2", "--video-fps", "1", "--max-length", "512", "--force-resume",
                               "--log-every", "1"]))
    record = json.load(open(os.path.join(out, "model", "mrrm_config.json")))["training"]
    assert record["resumed"] == [{"step": 1, "changed": {"video_fps": [None, 1.0], "max_length": [4096, 512],
                                                         "max_steps": [1, 2]}}]
    assert "eval" in record  # added after model/ was saved, and the file rehashed in model/'s manifest:
    assert integrity.verify_manifest(os.path.join(out, "model"))
    # a checkpoint without its manifest (and with flipped bytes) is not resumed silently
    newest = os.path.join(out, "checkpoints", "step-00000002")
    os.remove(os.path.join(newest, "checksums.sha256"))
    _flip(os.path.join(newest, "state.pt"), offset=200)
    for older in ("step-00000001",):
        os.remove(os.path.join(out, "checkpoints", older, "checksums.sha256"))
    with pytest.raises(MrrmError, match="step-00000002 \\(no checksums.sha256 .*pass --resume-unverified"):
        train(parse_args(common + ["--max-steps", "3", "--video-fps", "1", "--max-length", "512"]))


# -- row 11: mrrm.load(..., verify=True) ------------------------------------------------------------------------
def _data_region(path):
    """The offset of a safetensors file's first tensor byte (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def test_row11_verify_catches_flipped_weight_bytes_in_both_layouts(tmp_path):
    """Bytes flipped in the data region of model.safetensors load silently and change the scores; with
    verify=True (mrrm.load, and --verify on the commands) the load is refused naming the file. The authors'
    layout is covered the same way; a checkpoint without a manifest is a clear error with verify=True."""
    import mrrm
    from mrrm._args import add_model_args
    from mrrm.model.api import build_default_model, load_model

    model = build_default_model()
    sample = {"prompt": "What colour is the image?", "responses": ["red", "a blue square", "green"]}
    good = model.score(sample)[0]
    ckpt = tmp_path / "rm"
    model.save_pretrained(str(ckpt))
    assert mrrm.load(str(ckpt), verify=True).score(sample)[0] == pytest.approx(good, abs=1e-6)
    weights = ckpt / "backbone" / "model.safetensors"
    _flip(str(weights), offset=_data_region(weights) + 64, count=4096)
    damaged = mrrm.load(str(ckpt)).score(sample)[0]
    assert damaged != pytest.approx(good, abs=1e-4)  # what verification is for: a silent change of scores
    with pytest.raises(integrity.ChecksumError, match="backbone/model.safetensors: does not match its SHA-256"):
        mrrm.load(str(ckpt), verify=True)
    # --verify on every command that takes --model (their shared arguments), honoured by load_model
    import argparse

    ap = argparse.ArgumentParser()
    add_model_args(ap)
    args = ap.parse_args(["--model", str(ckpt), "--verify"])
    assert args.verify and not ap.parse_args([]).verify
    with pytest.raises(integrity.ChecksumError, match="model.safetensors"):
        load_model(args.model, device="cpu", verify=args.verify)
    from mrrm.eval import benchmarks as mrrm_eval

    opts = {**mrrm_eval.DEFAULT_OPTIONS, "model": str(ckpt), "device": "cpu", "verify": True}
    with pytest.raises(integrity.ChecksumError, match="model.safetensors: does not match"):
        mrrm_eval._default_scorer(opts)
    # the authors' layout: value_head.pt and the merged model's files
    ref = tmp_path / "ref"
    model.save_pretrained(str(ref), layout="reference")
    assert "value_head.pt" in integrity.read_manifest(str(ref))
    mrrm.load(str(ref), verify=True)
    _flip(str(ref / "value_head.pt"), offset=os.path.getsize(ref / "value_head.pt") - 40, count=1)
    with pytest.raises(integrity.ChecksumError, match="value_head.pt: does not match"):
        mrrm.load(str(ref), verify=True)
    # no manifest: verify=True says so and what to do; a model card added by push_to_hub is no file a loader reads
    (ref / "README.md").write_text("model card")
    os.remove(ref / "checksums.sha256")
    with pytest.raises(integrity.ChecksumError, match="has no checksums.sha256 .*save it again with save_pretrained"):
        mrrm.load(str(ref), verify=True)
    # the shipped default model carries its manifest
    assert mrrm.load(verify=True) is mrrm.load()


def test_verify_flag_reaches_the_model_load_of_every_command(monkeypatch, capsys):
    """--verify (mrrm._args.add_model_args) is in every command that takes --model, and each passes it to the
    load: score (local and Ray actors), eval, serve. A flag a command ignored would claim a check never made."""
    from mrrm.cli import score_file as score_cli
    from mrrm.cli import score_ray
    from mrrm.eval import benchmarks as mev
    from mrrm.model import api
    from mrrm.rl import serve

    def fake_load(model=None, **kw):
        raise ValueError(f"load_model called with verify={kw.get('verify')}")

    for module in (api, score_cli, score_ray, serve, mev):
        monkeypatch.setattr(module, "load_model", fake_load, raising=False)
    for parser in (score_cli.build_parser(), mev.build_parser(), serve.build_parser()):
        assert "--verify" in {s for a in parser._actions for s in a.option_strings}
    args = score_cli.build_parser().parse_args(["--data", "in.jsonl", "--out", "out.jsonl", "--verify"])
    with pytest.raises(score_cli.CLIError, match="verify=True"):
        score_cli._load_model(args)
    with pytest.raises(ValueError, match="verify=True"):
        score_ray.ScoreActor(None, "cpu", None, None, None, 1, None, None, verify=True)
    with pytest.raises(ValueError, match="verify=True"):
        mev._default_scorer({**mev.DEFAULT_OPTIONS, "verify": True})
    with pytest.raises(SystemExit, match="verify=True"):
        serve.main(["--verify", "--device", "cpu"])
