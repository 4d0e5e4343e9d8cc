"""python -m mrrm.train: losses decrease, gradients reach LoRA and the head only, validation before the
first step, exact resume after SIGKILL, and two gloo processes reproduce one process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from colour_task import COLOURS, _write_colour_task
from PIL import Image

from mrrm.errors import MrrmError
from mrrm.model import tiny
from mrrm.train.recipe import (
    DEMO_LOSS,
    DEMO_RESP_REPR,
    DEMO_STEPS,
    DEMO_VIDEO_FPS,
    LORA_LR,
    SCRATCH_LR,
    TrainConfig,
    _resolve_config,
    build_model,
    listwise_loss,
    parse_args,
    prepare,
    train,
)

# the built-in tiny backbone from scratch on test data: asked for by name (--data alone is refused)
SMALL = ["--base-model", "tiny", "--head-hidden", "64", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return _write_colour_task(str(tmp_path_factory.mktemp("colour")))


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["best", "plackett_luce", "bradley_terry"])
def test_each_loss_decreases_and_model_loads(colour_data, tmp_path, loss):
    out = str(tmp_path / "out")
    cfg = parse_args(["--data", colour_data, "--max-steps", "40", "--loss", loss, "--log-every", "1",
                      "--output-dir", out, "--eval-data", colour_data] + SMALL)
    summary = train(cfg)
    log = _log(out)
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < first - 0.05, (loss, first, last)
    assert summary["eval"]["best_of_n"] > 0.5  # chance is 0.25
    import mrrm

    model = mrrm.load(os.path.join(out, "model"))
    img = Image.new("RGB", (64, 64), COLOURS["blue"])
    scores = model.score({"prompt": "What colour is the image?", "image": img, "responses": list(COLOURS)})[0]
    assert len(scores) == 4 and all(np.isfinite(scores))


def test_resolve_config_fills_the_defaults_that_depend_on_other_fields():
    demo = _resolve_config(TrainConfig())
    assert (demo.lr, demo.max_steps, demo.loss, demo.resp_repr_mode, demo.video_fps) == \
        (SCRATCH_LR, DEMO_STEPS, DEMO_LOSS, DEMO_RESP_REPR, DEMO_VIDEO_FPS)
    own = _resolve_config(TrainConfig(base_model="some/model", data=["a.jsonl"]))
    assert (own.lr, own.max_steps, own.loss, own.resp_repr_mode, own.video_fps) == (LORA_LR, None, "best", "last", None)
    given = TrainConfig(lr=1e-3, max_steps=7, loss="bradley_terry", resp_repr_mode="last", video_fps=1.0)
    assert _resolve_config(given) == given


def test_gradients_reach_lora_and_head_only(tmp_path, colour_data):
    tok = tiny.build_tokenizer()
    base = str(tmp_path / "base")
    torch.manual_seed(0)
    tiny.build_backbone(tiny.build_config("qwen2_vl", tokenizer=tok)).save_pretrained(base)
    tiny.build_processor("qwen2_vl", tok).save_pretrained(base)
    cfg = TrainConfig(base_model=base, lora_r=4, lora_alpha=8, lora_dropout=0.0, head_hidden=16)
    model = build_model(cfg)
    samples = prepare(model, [colour_data], None, skip_bad=False)[0][0][:4]
    (inputs,) = list(model.micro_batches([s.encoded for s in samples], "joint", 4096))
    # make LoRA B non-zero so gradients also flow into A
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    loss = listwise_loss(model(inputs), inputs.packed.group_offsets, [s.rankings for s in samples], "best").mean()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "no gradient at all"
    assert all(("lora_" in n) or n.startswith("value_head") for n in with_grad), sorted(with_grad)[:5]
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert {"value_head.0.weight", "value_head.2.weight"} <= with_grad
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("visual" in n for n in frozen) and any("embed_tokens" in n for n in frozen)


def test_validation_lists_exactly_the_bad_samples(tmp_path, colour_data, capsys):
    d = os.path.dirname(colour_data)
    good = [json.loads(x) for x in open(colour_data)][:4]
    (tmp_path / "notvideo.mp4").write_bytes(b"this is not a video")
    for g in good:
        g["image"] = os.path.join(d, g["image"])
    bad_rank = dict(good[1], rankings=[1, 2])
    missing = dict(good[2], image=str(tmp_path / "nope.png"))
    not_video = {k: v for k, v in good[3].items() if k != "image"}
    not_video["video"] = str(tmp_path / "notvideo.mp4")
    lines = [json.dumps(good[0]), '{"prompt": "truncated", "respo', json.dumps(bad_rank), json.dumps(missing),
             json.dumps(not_video), json.dumps(good[0])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    model = build_model(TrainConfig(head_hidden=16))
    with pytest.raises(MrrmError, match="4 bad sample"):
        prepare(model, [str(path)], None, skip_bad=False)
    report = capsys.readouterr().out
    for line_no in (2, 3, 4, 5):
        assert f"mixed.jsonl:{line_no}" in report
    assert "mixed.jsonl:1" not in report and "mixed.jsonl:6" not in report
    assert "2 rankings for 4 responses" in report and "invalid JSON" in report
    per_file, bad = prepare(model, [str(path)], None, skip_bad=True)
    assert len(per_file[0]) == 2 and len(bad) == 4


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "mrrm.train"] + args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, colour_data):
    common = ["--data", colour_data, "--max-steps", "40", "--save-every", "5", "--keep-last", "3"] + SMALL
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _run(common + ["--output-dir", a]).wait(timeout=300) == 0
    proc = _run(common + ["--output-dir", b])
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(b, "checkpoints", "step-00000010")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(os.listdir(os.path.join(b, "checkpoints")))
    assert ckpts and not os.path.exists(os.path.join(b, "model")), "the run finished before the kill"
    assert _run(common + ["--output-dir", b]).wait(timeout=300) == 0
    sa = torch.load(os.path.join(a, "checkpoints", "step-00000040", "state.pt"), weights_only=False)
    sb = torch.load(os.path.join(b, "checkpoints", "step-00000040", "state.pt"), weights_only=False)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    # keep-last: only the newest 3 checkpoints remain
    assert len(os.listdir(os.path.join(b, "checkpoints"))) <= 3


@pytest.mark.slow
def test_demo_command_is_deterministic(tmp_path):
    """The same demo command twice, in two processes: the same data, losses, evaluation and weights,
    bit for bit (the README's demo numbers reproduce run to run)."""
    from safetensors.torch import load_file

    common = ["--demo-train-size", "96", "--demo-eval-size", "24", "--max-steps", "30", "--log-every", "1"]
    outs = [str(tmp_path / name) for name in ("a", "b")]
    for out in outs:
        assert _run(common + ["--output-dir", out]).wait(timeout=600) == 0
    logs = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "cpu_s")} for r in _log(out)]
            for out in outs]  # all but the wall-clock fields
    assert len(logs[0]) == 30 and logs[0] == logs[1]
    evals = [json.load(open(os.path.join(out, "summary.json")))["eval"] for out in outs]
    assert evals[0] == evals[1]
    heads = [load_file(os.path.join(out, "model", "value_head.safetensors")) for out in outs]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    backbones = [load_file(os.path.join(out, "model", "backbone", "model.safetensors")) for out in outs]
    assert all(torch.equal(backbones[0][k], backbones[1][k]) for k in backbones[0])


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, colour_data):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    common = ["--data", colour_data, "--max-steps", "5", "--log-every", "1"] + SMALL
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _run(common + ["--output-dir", one]).wait(timeout=300) == 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "mrrm.train"] + common + ["--output-dir", two],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    l1, l2 = _log(one), _log(two)
    assert len(l1) == len(l2) == 5
    for x, y in zip(l1, l2):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    assert l1[-1]["loss"] < l1[0]["loss"]


@pytest.mark.slow
def test_demo_task_needs_the_pixels(tmp_path):
    """The same short run learns the colour family with the images and stays near chance without."""
    from mrrm.train import demo

    train_path = str(demo.generate(800, 11, str(tmp_path / "train"), families=["colour"]))
    eval_path = str(demo.generate(200, 12, str(tmp_path / "eval"), families=["colour"]))
    common = ["--data", train_path, "--eval-data", eval_path, "--max-steps", "300", "--lr", "5e-4", "--warmup-steps", "0",
              "--head-hidden", "64", "--loss", DEMO_LOSS, "--resp-repr-mode", DEMO_RESP_REPR,  # the demo's recipe
              "--base-model", "tiny"]
    with_media = train(parse_args(common + ["--output-dir", str(tmp_path / "media")]))["eval"]
    control = train(parse_args(common + ["--drop-media", "--output-dir", str(tmp_path / "control")]))["eval"]
    assert with_media["per_family"]["colour"] >= 0.8, with_media
    assert control["best_of_n"] <= 0.40, control
    assert with_media["best_of_n"] >= control["best_of_n"] + 0.2


def test_parquet_data_trains_and_bad_parquet_is_reported(tmp_path, colour_data, capsys):
    """A parquet file in the Hugging Face layout (images as {"bytes", "path"} structs) trains like the
    JSONL it came from; a truncated parquet file is a validation error naming the file, not a crash."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = os.path.dirname(colour_data)
    rows = [json.loads(x) for x in open(colour_data)]
    for r in rows:
        with open(os.path.join(d, r["image"]), "rb") as f:
            r["image"] = {"bytes": f.read(), "path": None}
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = str(tmp_path / "out")
    train(parse_args(["--data", path, "--max-steps", "3", "--output-dir", out] + SMALL))
    assert len(_log(out)) >= 1 and os.path.exists(os.path.join(out, "model", "mrrm_config.json"))

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(open(path, "rb").read()[:200])
    model = build_model(TrainConfig(head_hidden=16))
    per_file, bad = prepare(model, [str(broken), path], None, skip_bad=True)
    assert len(bad) == 1 and "broken.parquet" in str(bad[0]) and "unreadable parquet" in bad[0].reason
    assert len(per_file[1]) == len(rows)


def _steps(out):
    return [r["step"] for r in _log(out) if "loss" in r]


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_refuses_changed_settings_and_logs_each_step_once(tmp_path, colour_data, capsys):
    out = str(tmp_path / "run")
    common = ["--data", colour_data, "--save-every", "2", "--keep-last", "5", "--log-every", "1",
              "--output-dir", out] + SMALL
    train(parse_args(common + ["--max-steps", "6"]))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step-00000002", "step-00000004", "step-00000006"]
    assert all(os.path.exists(os.path.join(out, "checkpoints", c, "checksums.sha256")) for c in ckpts)
    # flip 64 bytes in the newest checkpoint, empty the one before: resume falls back to step 2, naming both
    newest = os.path.join(out, "checkpoints", "step-00000006", "state.pt")
    raw = bytearray(open(newest, "rb").read())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 64])
    open(newest, "wb").write(bytes(raw))
    open(os.path.join(out, "checkpoints", "step-00000004", "state.pt"), "wb").close()
    shutil.rmtree(os.path.join(out, "model"))
    capsys.readouterr()
    train(parse_args(common + ["--max-steps", "8"]))
    said = capsys.readouterr().out
    assert "step-00000006 skipped: " + os.path.join(out, "checkpoints", "step-00000006", "state.pt") + \
        ": does not match its SHA-256" in said
    assert "step-00000004 skipped" in said and "resumed from" in said and "step-00000002 (step 2)" in said
    assert _steps(out) == list(range(1, 9))  # steps 3-6 redone, each logged once
    # a different batch size is refused (the checkpoint's steps would not be this run's), unless forced
    with pytest.raises(MrrmError, match="other settings: batch_size 16 -> 8"):
        train(parse_args(common + ["--max-steps", "10", "--batch-size", "8"]))
    train(parse_args(common + ["--max-steps", "10", "--batch-size", "8", "--force-resume"]))
    assert _steps(out)[-1] == 10 and len(_steps(out)) == len(set(_steps(out)))


def test_no_intact_checkpoint_is_an_error_naming_them(tmp_path):
    from mrrm.train.recipe import load_intact_checkpoint

    d = tmp_path / "checkpoints" / "step-00000003"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"")
    with pytest.raises(MrrmError, match=r"no intact checkpoint to resume from: .*step-00000003 \(no checksums.sha256"):
        load_intact_checkpoint(str(tmp_path), log=lambda *a: None)
    with pytest.raises(MrrmError, match=r"no intact checkpoint to resume from: .*step-00000003 \(state.pt does not load"):
        load_intact_checkpoint(str(tmp_path), log=lambda *a: None, unverified=True)
    assert load_intact_checkpoint(str(tmp_path / "elsewhere")) == (None, None)


def test_unwritable_output_dir_is_named_before_anything_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MrrmError, match=r"--output-dir .*afile/out.*: cannot write there"):
        train(parse_args(["--output-dir", str(tmp_path / "afile" / "out"), "--max-steps", "1"]))


@pytest.mark.slow
def test_a_failed_checkpoint_write_names_the_file_keeps_the_last_one_and_resumes(tmp_path, colour_data):
    """A checkpoint write that fails mid-file (the disk is full; here every file is held to 1 MB by
    RLIMIT_FSIZE, so torch.save's zip writer fails) ends the run with one line naming the file, no
    half-written temp left; the previous checkpoint is intact and a rerun resumes from it."""
    from faults import file_size_limit

    out = str(tmp_path / "run")
    common = ["--data", colour_data, "--save-every", "2", "--log-every", "1", "--output-dir", out] + SMALL
    assert _run(common + ["--max-steps", "2"]).wait(timeout=300) == 0
    proc = _run(common + ["--max-steps", "4"], preexec_fn=file_size_limit(1 << 20))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("mrrm.train: cannot write ") and "step-00000004.tmp/state.pt" in last
    assert "checkpoints written before are intact" in last and "Traceback" not in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000002"]
    proc = _run(common + ["--max-steps", "4"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(os.listdir(os.path.join(out, "checkpoints")))[-1] == "step-00000004"
    assert _steps(out) == [1, 2, 3, 4]


def test_a_sharding_request_that_would_not_be_honoured_is_refused():
    """accelerate configs asking for FSDP or DeepSpeed: refused with a message saying what the run
    would have been (on CPU accelerate silently runs DDP), and refused where they are active, until
    mrrm.train trains correctly under them; plain data-parallel runs pass."""
    from mrrm.train.recipe import check_sharding_request

    check_sharding_request({}, "DistributedType.MULTI_CPU")
    check_sharding_request({"ACCELERATE_USE_FSDP": "false"}, "DistributedType.NO")
    with pytest.raises(MrrmError, match="asks for FSDP but this run is MULTI_CPU .*silently train unsharded"):
        check_sharding_request({"ACCELERATE_USE_FSDP": "true"}, "DistributedType.MULTI_CPU")
    with pytest.raises(MrrmError, match="asks for DEEPSPEED but this run is NO"):
        check_sharding_request({"ACCELERATE_USE_DEEPSPEED": "true"}, "DistributedType.NO")
    with pytest.raises(MrrmError, match="accelerate's FSDP is not supported.*pass --fsdp"):
        check_sharding_request({"ACCELERATE_USE_FSDP": "true"}, "DistributedType.FSDP")


@pytest.mark.slow
def test_the_shipped_fsdp_example_config_is_refused_on_cpu(tmp_path, colour_data):
    """`accelerate launch --config_file examples/accelerate_fsdp.yaml` on this CPU machine: it used
    to print "done" after an unsharded DDP run; now every rank stops before loading, naming why."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(["accelerate", "launch", "--config_file", os.path.join(repo, "examples", "accelerate_fsdp.yaml"),
                           "--num_processes", "2", "-m", "mrrm.train", "--data", colour_data, "--max-steps", "1",
                           "--output-dir", str(tmp_path / "out")] + SMALL,
                          capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert done.returncode != 0
    assert "asks for FSDP but this run is MULTI_CPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "model").exists()


@pytest.fixture(scope="module")
def mixed_media_data(tmp_path_factory):
    """24 demo samples alternating an image family (colour) and a video family (motion): with
    --max-batch-tokens 120 an image pass holds two samples and a video pass one, so in a step one
    rank may run images only, the other a video, each a different number of passes."""
    from mrrm.train import demo

    d = tmp_path_factory.mktemp("mixed")
    return str(demo.generate(24, 3, d, families=["colour", "motion"]))


def _torchrun(args, out, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "mrrm.train"] + args + ["--output-dir", out],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _state(out, step):
    return torch.load(os.path.join(out, "checkpoints", f"step-{step:08d}", "state.pt"), weights_only=False)


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_matches_ddp_saves_full_checkpoints_and_resumes(tmp_path, mixed_media_data):
    """--fsdp (FSDP2 fully_shard over 2 gloo ranks) with mixed-media ranks and unequal pass counts:
    the 3 steps' losses and pre-clip gradient norms equal DDP's, the checkpoint holds the full model
    (keys and values of the DDP run's), model/ loads with mrrm.load and scores as DDP's model/, and a
    resume from step 2 redoes step 3 bit for bit."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    import mrrm

    common = ["--data", mixed_media_data, "--eval-data", mixed_media_data, "--max-steps", "3", "--save-every", "2",
              "--log-every", "1", "--batch-size", "5", "--max-batch-tokens", "120"] + SMALL
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    _torchrun(common, ddp)
    res = _torchrun(common + ["--fsdp"], fsdp)
    assert "FSDP2: 2 decoder layers sharded over 2 processes" in res.stdout + res.stderr
    l1, l2 = _log(ddp), _log(fsdp)
    steps1, steps2 = [r for r in l1 if "loss" in r], [r for r in l2 if "loss" in r]
    assert len(steps1) == len(steps2) == 3
    for x, y in zip(steps1, steps2):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-6, (x, y)
        assert y["grad_norm"] > 0
    a, b = _state(ddp, 3), _state(fsdp, 3)
    assert sorted(a["model"]) == sorted(b["model"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    assert all(isinstance(k, str) for k in b["optimizer"]["state"])  # by parameter name
    samples = [json.loads(x) for x in open(mixed_media_data)][:4]
    media_dir = os.path.dirname(mixed_media_data)
    sa = mrrm.load(os.path.join(ddp, "model")).score(samples, media_dir=media_dir)
    sb = mrrm.load(os.path.join(fsdp, "model")).score(samples, media_dir=media_dir)
    assert [x for row in sa for x in row] == pytest.approx([x for row in sb for x in row], abs=1e-6)
    # resume: the step-3 checkpoint and model/ gone, the rerun continues from step 2
    shutil.rmtree(os.path.join(fsdp, "checkpoints", "step-00000003"))
    shutil.rmtree(os.path.join(fsdp, "model"))
    res = _torchrun(common + ["--fsdp"], fsdp)
    assert "resumed from" in res.stdout + res.stderr
    c = _state(fsdp, 3)
    for k in b["model"]:
        assert torch.equal(b["model"][k], c["model"][k]), k
    assert [r["step"] for r in _log(fsdp) if "loss" in r] == [1, 2, 3]
    # a sharded checkpoint is not resumed without --fsdp (its optimizer state is keyed by name)
    shutil.rmtree(os.path.join(fsdp, "checkpoints", "step-00000003"))
    with pytest.raises(MrrmError, match="was written by a run with --fsdp; resume it the same way"):
        train(parse_args(common + ["--output-dir", fsdp]))


@pytest.mark.slow
def test_a_rank_that_draws_no_sample_neither_hangs_nor_changes_the_result(tmp_path, mixed_media_data):
    """--batch-size 1 on 2 ranks: rank 1 never draws a sample. DDP used to hang (a bare backward
    never reached the all-reduce); now that rank runs a zero-loss pass, under DDP and FSDP, and both
    match one process."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    common = ["--data", mixed_media_data, "--max-steps", "3", "--log-every", "1", "--batch-size", "1",
              "--max-batch-tokens", "120"] + SMALL
    one = str(tmp_path / "one")
    assert _run(common + ["--output-dir", one]).wait(timeout=300) == 0
    _torchrun(common, str(tmp_path / "ddp"))
    _torchrun(common + ["--fsdp"], str(tmp_path / "fsdp"))
    ref = [r for r in _log(one) if "loss" in r]
    for other in ("ddp", "fsdp"):
        got = [r for r in _log(str(tmp_path / other)) if "loss" in r]
        assert len(got) == 3
        for x, y in zip(ref, got):
            assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-6, (other, x, y)


def test_fsdp_needs_a_distributed_launch(tmp_path, colour_data):
    with pytest.raises(MrrmError, match="--fsdp shards the model over the processes of a distributed launch"):
        train(parse_args(["--data", colour_data, "--max-steps", "1", "--fsdp", "--output-dir", str(tmp_path)] + SMALL))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_gloo_ranks_matches_ddp_and_resumes(tmp_path, mixed_media_data, stage):
    """--deepspeed with the shipped configs (examples/deepspeed_zero2.json, deepspeed_zero3.json) on
    DeepSpeed's CPU accelerator (2 gloo ranks), mixed-media ranks and unequal pass counts: losses and
    gradient norms equal DDP's, one optimizer step per training step (DeepSpeed's global_steps), the
    held-out evaluation (every rank under ZeRO-3) and model/'s scores equal DDP's, and a resume from
    step 2 (DeepSpeed's partitions in the checkpoint's deepspeed/) redoes step 3 bit for bit.
    ZeRO-3: the parameters are partitioned (each rank's fp32 partition holds half the model; the
    persistence threshold is set to 0 so that the tiny model's small tensors are partitioned too, as
    a real model's are), one vision-tower call per pass, and the checkpoint's state.pt holds the full
    model gathered from the partitions."""
    pytest.importorskip("deepspeed")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    import mrrm

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                          f"deepspeed_zero{stage}.json")
    if stage == 3:
        cfg = json.load(open(config))
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        config = str(tmp_path / "zero3.json")
        with open(config, "w") as fh:
            json.dump(cfg, fh)
    common = ["--data", mixed_media_data, "--eval-data", mixed_media_data, "--max-steps", "3", "--save-every", "2",
              "--log-every", "1", "--batch-size", "5", "--max-batch-tokens", "120"] + SMALL
    ddp, ds = str(tmp_path / "ddp"), str(tmp_path / "ds")
    _torchrun(common, ddp)
    res = _torchrun(common + ["--deepspeed", config], ds)
    assert f"DeepSpeed ZeRO-{stage} over 2 processes" in res.stdout + res.stderr
    for x, y in zip([r for r in _log(ddp) if "loss" in r], [r for r in _log(ds) if "loss" in r], strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-6, (x, y)
        assert y["grad_norm"] > 0
    summary = [json.load(open(os.path.join(d, "summary.json"))) for d in (ddp, ds)]
    assert summary[0]["eval"] == summary[1]["eval"] and summary[1]["eval"]["n"] == 24
    zero = os.path.join(ds, "checkpoints", "step-00000003", "deepspeed", "zero")
    engine_state = torch.load(os.path.join(zero, "mp_rank_00_model_states.pt" if stage == 2 else
                                           "zero_pp_rank_0_mp_rank_00_model_states.pt"), weights_only=False)
    assert engine_state["global_steps"] == 3
    full = _state(ds, 3)["model"]
    assert set(full) == set(_state(ddp, 3)["model"])
    if stage == 3:
        numel = sum(v.numel() for v in full.values())
        for rank in (0, 1):
            optim = torch.load(os.path.join(zero, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
                               weights_only=False)["optimizer_state_dict"]
            assert sum(t.numel() for t in optim["fp32_flat_groups"]) == pytest.approx(numel / 2, abs=2)
    samples = [json.loads(x) for x in open(mixed_media_data)][:4]
    media_dir = os.path.dirname(mixed_media_data)
    sa = mrrm.load(os.path.join(ddp, "model")).score(samples, media_dir=media_dir)
    sb = mrrm.load(os.path.join(ds, "model")).score(samples, media_dir=media_dir)
    assert [x for row in sa for x in row] == pytest.approx([x for row in sb for x in row], abs=1e-6)
    b = _state(ds, 3)
    shutil.rmtree(os.path.join(ds, "checkpoints", "step-00000003"))
    shutil.rmtree(os.path.join(ds, "model"))
    res = _torchrun(common + ["--deepspeed", config], ds)
    assert "resumed from" in res.stdout + res.stderr
    c = _state(ds, 3)
    for k in b["model"]:
        assert torch.equal(b["model"][k], c["model"][k]), k


class _RunsCode:
    """A pickle that creates `marker` when DeepSpeed's own loader (torch.load(weights_only=False)) reads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.slow
def test_deepspeed_partitions_are_verified_and_never_unpickle_code(tmp_path, colour_data):
    """Issue 29 rows 1 and 6 on a real ZeRO-2 run (2 gloo ranks). A flipped byte in one rank's optimizer
    partition: the resume skips that checkpoint naming the file and resumes the one before (it used to
    resume the damaged one silently). A partition swapped for a crafted pickle, the checkpoint's
    checksums recomputed: the resume stops naming the file, and the pickle runs nothing (DeepSpeed's own
    loader would run it)."""
    pytest.importorskip("deepspeed")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    from mrrm.integrity import write_manifest

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                          "deepspeed_zero2.json")
    out = str(tmp_path / "ds")
    common = ["--data", colour_data, "--save-every", "1", "--keep-last", "5", "--log-every", "1",
              "--deepspeed", config] + SMALL
    _torchrun(common + ["--max-steps", "2"], out)
    step2 = os.path.join(out, "checkpoints", "step-00000002")
    part = os.path.join(step2, "deepspeed", "zero", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    raw = bytearray(open(part, "rb").read())
    raw[-200] ^= 0x01  # one bit of the fp32 partition's bytes
    open(part, "wb").write(bytes(raw))
    res = _torchrun(common + ["--max-steps", "3"], out)
    said = res.stdout + res.stderr
    assert f"checkpoint {step2} skipped: {part}: does not match its SHA-256" in said, said[-3000:]
    assert "step-00000001 (step 1)" in said
    # a crafted partition with the checksums made to match
    step3 = os.path.join(out, "checkpoints", "step-00000003")
    crafted = os.path.join(step3, "deepspeed", "zero", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, crafted, _use_new_zipfile_serialization=False)
    if os.path.exists(os.path.join(step3, "checksums.sha256")):
        write_manifest(step3)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "mrrm.train"] + common
                         + ["--max-steps", "4", "--output-dir", out], env=env, capture_output=True, text=True,
                         timeout=300)
    assert not marker.exists(), "a crafted DeepSpeed partition ran code on resume"
    assert res.returncode != 0
    assert f"cannot resume DeepSpeed's partitions: {crafted}: refused" in res.stderr, res.stderr[-3000:]


def test_zero3_is_refused_where_the_vision_tower_cannot_run_once_per_pass(families):
    """Molmo2 takes images and videos in separate passes and calls its vision tower per media kind."""
    pytest.importorskip("deepspeed")
    from model_fixtures import require_native

    from mrrm.train.sharding import prepare_zero3

    require_native("molmo2")
    with pytest.raises(MrrmError, match="ZeRO-3 is not supported for molmo2"):
        prepare_zero3(families("molmo2").model)


def test_deepspeed_config_files(tmp_path):
    """The shipped ZeRO-3 config reads as stage 3; a stage out of 0-3 is refused."""
    pytest.importorskip("deepspeed")
    from mrrm.train.sharding import deepspeed_config

    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                           "deepspeed_zero3.json")
    assert deepspeed_config(shipped, max_grad_norm=1.0, bf16=False)["zero_optimization"]["stage"] == 3
    bad = tmp_path / "zero4.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(MrrmError, match="stage must be 0-3, got 4"):
        deepspeed_config(str(bad), max_grad_norm=1.0, bf16=False)


def test_training_files_without_a_base_model_are_refused(tmp_path, monkeypatch, capsys):
    """--data without --base-model trained the built-in tiny demo backbone on the user's data and exited 0
    (loss flat): now a ConfigError (exit 2) naming --base-model, and `--base-model tiny` the opt-in, which
    the training record's command keeps so that it reruns; the no-argument demo needs neither."""
    import shlex

    from mrrm.errors import ConfigError
    from mrrm.train.recipe import main, training_record

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--data without --base-model would train the built-in tiny demo backbone"):
        parse_args(["--data", "mine.jsonl"])
    assert main(["--data", "mine.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "Pass --base-model PATH or a Hugging Face Hub id" in err and "--base-model tiny" in err
    (tmp_path / "run.yaml").write_text("data: [mine.jsonl]\n")  # a config file is held to the same rule
    with pytest.raises(ConfigError, match="without --base-model"):
        parse_args(["--config", str(tmp_path / "run.yaml")])
    assert parse_args([]).base_model is None  # the built-in demo
    assert parse_args(["--base-model", "org/model", "--data", "mine.jsonl"]).base_model == "org/model"
    cfg = parse_args(["--data", "mine.jsonl", "--base-model", "tiny", "--max-steps", "3"])
    assert cfg.base_model is None and cfg.data == ["mine.jsonl"]
    command = training_record(cfg, 3)["command"]
    assert "--base-model tiny" in command and parse_args(shlex.split(command)[3:]) == cfg
    (tmp_path / "tiny").mkdir()  # a directory of that name: which one is meant is asked
    with pytest.raises(ConfigError, match=r"pass --base-model \./tiny"):
        parse_args(["--data", "mine.jsonl", "--base-model", "tiny"])


@pytest.mark.slow
def test_deepspeed_logs_to_stderr_not_among_the_results():
    """DeepSpeed's logger wrote to stdout: its "Setting accelerator to CPU" line (logged while it is imported,
    which accelerate does when a model is saved, even without --deepspeed) landed among `mrrm train`'s results.
    After sharding.deepspeed_logs_to_stderr() (the command's first step) its lines go to stderr, whoever
    imports it."""
    pytest.importorskip("deepspeed")
    code = ("import logging\n"
            "from mrrm.train.sharding import deepspeed_logs_to_stderr\n"
            "deepspeed_logs_to_stderr()\n"
            "import deepspeed  # as accelerate's extract_model_from_parallel does\n"
            "logging.getLogger('DeepSpeed').warning('a later line')\n"
            "print('the result')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "the result\n"
    assert "a later line" in done.stderr
