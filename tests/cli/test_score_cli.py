"""`python -m mrrm.score` (mrrm.cli.score_file): JSONL in, scores + best out; bad lines by line number;
resume after an interruption without duplicates or losses.

Uses the built-in default model (a random tiny Qwen2-VL, fast on CPU) with images written by PIL
and one tiny video written by PyAV. Tests run main() in-process (on the same cached model as
mrrm.load(device="cpu")) except one end-to-end subprocess run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mrrm
from mrrm.cli import score_file as score_cli
from mrrm.cli.score_file import main

REPO = Path(__file__).resolve().parents[2]
SCORE_TOL = dict(rel=1e-4, abs=1e-7)  # chunking changes the packing, hence the rounding


@pytest.fixture(scope="module")
def model():
    return mrrm.load(device="cpu")  # the instance main(["--device", "cpu", ...]) gets from the cache


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A data directory with images (and a tiny video when PyAV can write one) under media/."""
    root = tmp_path_factory.mktemp("data")
    (root / "media").mkdir()
    for name, colour, size in (("red.png", (220, 20, 20), (40, 32)), ("green.png", (20, 200, 40), (24, 24)),
                               ("noise.jpg", None, (48, 40))):
        if colour is None:
            rng = np.random.default_rng(0)
            img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        else:
            img = Image.new("RGB", size, colour)
        img.save(root / "media" / name)
    video = None
    try:
        import av

        video = "media/clip.mp4"
        with av.open(str(root / video), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for i in range(8):
                frame = np.full((32, 32, 3), (i * 30, 255 - i * 30, 90), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except Exception:  # no PyAV or no encoder: the video sample is left out
        video = None
    return root, video


def good_samples(video):
    samples = [
        {"id": "t0", "prompt": "Name a colour.", "responses": ["red", "a shade of blue", "green!"], "meta": {"k": 1}},
        {"id": "i1", "prompt": "What colour is the square?", "image": "media/red.png",
         "responses": ["red", "green", "it is red", "blue"]},
        {"id": "i2", "prompt": "Describe the picture.", "image": "media/green.png", "responses": ["grass", "sky"]},
        {"id": "i3", "prompt": "Compare them.", "images": ["media/red.png", "media/noise.jpg"],
         "responses": ["left is red, right is noise", "both red", "both noise"], "rankings": [1, 2, 3]},
        {"id": "t4", "prompt": "2+2?", "responses": ["4", "5", "four", "22", "3.999"]},
        {"id": 5, "prompt": "And this one?", "image": "media/noise.jpg", "responses": ["static", "a cat"]},
        {"id": "t6", "prompt": "Say hi <|resp_sep|>", "responses": ["hi", "hello <|resp_sep|> there"]},
    ]
    if video:
        samples.append({"id": "v7", "prompt": "What happens in the video?", "video": video,
                        "responses": ["colours change", "nothing", "a dog runs"]})
    return samples


def write_jsonl(path: Path, lines) -> Path:
    """lines: dicts (dumped) or raw strings (written as they are)."""
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def absolute_media(sample: dict, root: Path) -> dict:
    s = dict(sample)
    for key in ("image", "video"):
        if key in s:
            s[key] = str(root / s[key])
    if "images" in s:
        s["images"] = [str(root / p) for p in s["images"]]
    return s


def run(data, out, *extra, batch_size=3):
    return main(["--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", str(batch_size),
                 "--no-progress", *map(str, extra)])


def without_results(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("scores", "best")}


def assert_same_output(got: list[dict], want: list[dict]):
    assert [without_results(r) for r in got] == [without_results(r) for r in want]
    for g, w in zip(got, want):
        assert g["scores"] == pytest.approx(w["scores"], **SCORE_TOL)
        assert g["best"] == w["best"]


# a mix of good and bad lines: (line content, expected reason fragment or None for good)
def mixed_lines(video):
    good = good_samples(video)
    return [
        (good[0], None),
        ('{"prompt": "broken", "responses": ["a", "b"]', "invalid JSON"),
        (good[1], None),
        ({"id": "np", "responses": ["a", "b"]}, "prompt"),
        ({"id": "mi", "prompt": "Look.", "image": "media/missing.png", "responses": ["a", "b"]}, "missing.png"),
        ("", None),  # a blank line: ignored, still counted in the line numbers
        (good[2], None),
        ({"id": "er", "prompt": "Empty?", "responses": []}, "non-empty list"),
        ({"id": "es", "prompt": "Empty string?", "responses": ["fine", ""]}, "response 1 is empty"),
        ('["a", "list"]', "JSON object"),
        (good[3], None),
        ({"id": "long", "prompt": "Long one.", "responses": ["word " * 5000, "short"]}, "max_length"),
        (good[4], None),
        (good[5], None),
    ]


def test_scores_equal_direct_scoring_best_is_argmax(model, media, tmp_path, monkeypatch):
    root, video = media
    samples = good_samples(video)
    data = write_jsonl(root / "good.jsonl", samples[:3] + [""] + samples[3:])  # a blank line in the middle
    monkeypatch.chdir(tmp_path)  # media paths must resolve against the input's directory, not the cwd
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 0
    got = read_jsonl(out)
    want = model.score([absolute_media(s, root) for s in samples])
    assert [without_results(r) for r in got] == samples  # every original field kept, input order
    for record, scores in zip(got, want):
        assert record["scores"] == pytest.approx(scores, **SCORE_TOL)
        assert len(record["scores"]) == len(record["responses"])
        assert record["best"] == int(np.argmax(record["scores"]))
    assert len({r["best"] for r in got}) > 1  # not all index 0: argmax is actually exercised
    assert not os.path.exists(str(out) + ".errors.jsonl")  # no bad samples, no errors file left behind


@pytest.mark.parametrize("mode,permutations", [("independent", 1), ("joint", 3)])
def test_mode_and_permutations_are_passed_through(model, media, tmp_path, mode, permutations):
    root, video = media
    samples = good_samples(None)[:5]
    data = write_jsonl(root / f"modes_{mode}.jsonl", samples)
    out = tmp_path / "scored.jsonl"
    assert run(data, out, "--mode", mode, "--permutations", permutations, "--max-batch-tokens", 400,
               batch_size=2) == 0
    got = [r["scores"] for r in read_jsonl(out)]
    want = model.score([absolute_media(s, root) for s in samples], mode=mode, permutations=permutations)
    plain = model.score([absolute_media(s, root) for s in samples])
    for g, w in zip(got, want):
        assert g == pytest.approx(w, **SCORE_TOL)
    assert any(w != pytest.approx(p, rel=1e-3) for w, p in zip(want, plain))  # the options change the scores


def test_bad_lines_reported_by_line_number_rest_scored(model, media, tmp_path, capsys):
    root, video = media
    lines = mixed_lines(video)
    data = write_jsonl(root / "mixed.jsonl", [content for content, _ in lines])
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 1  # finished, but not every line scored: exit 1 (the rest is written)
    captured = capsys.readouterr()

    expected_bad = {n: reason for n, (_, reason) in enumerate(lines, 1) if reason is not None}
    records = read_jsonl(str(out) + ".errors.jsonl")
    assert [r["line"] for r in records] == sorted(expected_bad)
    for r in records:
        assert expected_bad[r["line"]] in r["error"], r
        assert f"mixed.jsonl:{r['line']}: " in captured.err  # on stderr too
    ids = {r["line"]: r["id"] for r in records}
    assert ids[4] == "np" and ids[5] == "mi" and ids[2] is None

    good = [content for content, reason in lines if reason is None and content != ""]
    got = read_jsonl(out)
    assert [without_results(r) for r in got] == good
    want = model.score([absolute_media(s, root) for s in good])
    for record, scores in zip(got, want):
        assert record["scores"] == pytest.approx(scores, **SCORE_TOL)
    assert f"{len(good)} scored, {len(expected_bad)} bad" in captured.out
    assert f"{len(expected_bad)} line(s) could not be scored" in captured.err and "--allow-errors" in captured.err

    # --allow-errors: the same output and errors file, exit 0, the count still on stderr
    allowed = tmp_path / "allowed.jsonl"
    assert run(data, allowed, "--allow-errors") == 0
    assert f"{len(expected_bad)} line(s) could not be scored" in capsys.readouterr().err
    assert_same_output(read_jsonl(allowed), got)
    assert read_jsonl(str(allowed) + ".errors.jsonl") == records
    # a resume with nothing left: the earlier bad lines still make the exit status 1
    assert run(data, out) == 1 and run(data, out, "--allow-errors") == 0


def test_resume_after_a_crash_mid_run(model, media, tmp_path, monkeypatch, capsys):
    root, video = media
    lines = mixed_lines(video)
    data = write_jsonl(root / "crash.jsonl", [content for content, _ in lines])
    reference = tmp_path / "reference.jsonl"
    assert run(data, reference) == 1  # mixed_lines has bad lines

    real_score = model.score
    calls = []

    def crash_after_first_chunk(batch, **kw):
        calls.append(len(batch))
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real_score(batch, **kw)

    out = tmp_path / "scored.jsonl"
    monkeypatch.setattr(model, "score", crash_after_first_chunk)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, out)
    # the message names the chunk that failed: the line after the first chunk's lines
    said = capsys.readouterr()
    m = re.search(r"failed \(chunk starting at line (\d+)\); every finished chunk is saved", said.err + said.out)
    assert m is not None, said
    assert int(m.group(1)) > 1
    first_chunk = read_jsonl(out)
    assert 0 < len(first_chunk) < len(read_jsonl(reference))

    def counting(batch, **kw):
        calls.append(len(batch))
        return real_score(batch, **kw)

    calls.clear()
    monkeypatch.setattr(model, "score", counting)
    assert run(data, out) == 1
    assert_same_output(read_jsonl(out), read_jsonl(reference))
    assert read_jsonl(str(out) + ".errors.jsonl") == read_jsonl(str(reference) + ".errors.jsonl")
    # only the samples after the saved chunk were read and scored again (3 = the first chunk's samples)
    n_samples = sum(1 for c, _ in lines if isinstance(c, dict))
    assert sum(calls) == n_samples - 3

    calls.clear()
    assert run(data, out) == 1  # a finished run: nothing left, nothing duplicated (the bad lines still count)
    assert calls == []
    assert_same_output(read_jsonl(out), read_jsonl(reference))


def _tear(path: Path, keep_lines: int, torn: bool):
    """Keep the first keep_lines complete lines of path (plus half of the next one when torn)."""
    raw = path.read_bytes().splitlines(keepends=True)
    tail = raw[keep_lines][: len(raw[keep_lines]) // 2] if torn and keep_lines < len(raw) else b""
    path.write_bytes(b"".join(raw[:keep_lines]) + tail)


@pytest.mark.parametrize("state", ["torn_output", "torn_errors", "errors_ahead_of_output", "only_errors"])
def test_resume_from_a_killed_write(model, media, tmp_path, monkeypatch, state):
    """The states a SIGKILL can leave: a torn output line; a torn errors line; a chunk whose errors were
    written but not its scores; nothing scored yet but the first chunk's errors written."""
    root, video = media
    lines = mixed_lines(video)
    data = write_jsonl(root / "killed.jsonl", [content for content, _ in lines])
    reference = tmp_path / "reference.jsonl"
    assert run(data, reference) == 1  # mixed_lines has bad lines
    ref_errors = Path(str(reference) + ".errors.jsonl")

    out = tmp_path / "scored.jsonl"
    errors = Path(str(out) + ".errors.jsonl")
    out.write_bytes(reference.read_bytes())
    errors.write_bytes(ref_errors.read_bytes())
    Path(str(out) + ".meta.json").write_bytes(Path(str(reference) + ".meta.json").read_bytes())  # its settings
    # chunks of 3 JSON objects: lines 1-4 | 5-8 | 9-12 | 13-14
    # outputs t0 i1 | i2 | i3 | t4 5     errors (by line) 2 4 | 5 8 | 9 10 12 | -
    if state == "torn_output":      # killed while writing the 1st chunk's scores (its errors are complete)
        _tear(out, 1, torn=True)
        _tear(errors, 2, torn=False)
    elif state == "torn_errors":    # killed while writing the 2nd chunk's errors
        _tear(out, 2, torn=False)
        _tear(errors, 2, torn=True)
    elif state == "errors_ahead_of_output":  # the 3rd chunk's errors written, its scores not
        _tear(out, 3, torn=False)
    elif state == "only_errors":    # the 1st chunk's errors written, nothing scored
        _tear(out, 0, torn=False)
        _tear(errors, 2, torn=False)
    kept = out.read_bytes().count(b"\n")
    recorded = {json.loads(line)["line"] for line in errors.read_bytes().splitlines(keepends=True)
                if line.endswith(b"\n")}
    recorded_ids = {c.get("id") for n, (c, _) in enumerate(lines, 1) if n in recorded and isinstance(c, dict)}

    real_score = model.score
    scored = []
    monkeypatch.setattr(model, "score", lambda batch, **kw: scored.extend(batch) or real_score(batch, **kw))
    assert run(data, out) == 1
    assert_same_output(read_jsonl(out), read_jsonl(reference))
    assert errors.read_bytes() == ref_errors.read_bytes()  # every bad line once, in order
    # the samples scored again are exactly those without an output line (no duplicates, none lost)
    done_ids = {r.get("id") for r in read_jsonl(reference)[:kept]}
    remaining = [r for r in read_jsonl(reference) if r.get("id") not in done_ids]
    assert [s.get("id") for s in scored if s.get("id") not in {"np", "mi", "er", "es", "long"}] == \
        [r["id"] for r in remaining]
    assert not recorded_ids & {s.get("id") for s in scored}  # bad lines already recorded are not redone


def test_pairwise_records_are_scored_as_train_reads_them(model, media, tmp_path, capsys):
    """{prompt, chosen, rejected} (a record shape `mrrm train` takes) was refused ("responses" missing): now
    it is scored as responses [chosen, rejected], written back as it was read with "scores" [chosen's,
    rejected's], "best" and "preferred"; a resume checks it against its input like any other line."""
    root, _ = media
    pairs = [{"id": "p0", "prompt": "What colour is the square?", "image": "media/red.png", "chosen": "red",
              "rejected": "green", "source": "x"},
             {"id": "p1", "prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    ranked = good_samples(None)[0]
    data = write_jsonl(root / "pairs.jsonl", pairs + [ranked])
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 0
    got = read_jsonl(out)
    assert [without_results(r) for r in got] == [dict(p, preferred=r["preferred"]) for p, r in zip(pairs, got)] + \
        [ranked]
    want = model.score([absolute_media({"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]],
                                        **({"image": p["image"]} if "image" in p else {})}, root) for p in pairs])
    for record, scores in zip(got, want):
        assert record["scores"] == pytest.approx(scores, **SCORE_TOL)
        assert record["preferred"] == ("chosen" if scores[0] >= scores[1] else "rejected")
        assert record["best"] == ("chosen", "rejected").index(record["preferred"])
        assert "responses" not in record
    assert "preferred" not in got[2]  # a ranking record gets scores and best only
    capsys.readouterr()
    assert run(data, out) == 0 and read_jsonl(out) == got  # resumed: nothing left
    assert "nothing left to do" in capsys.readouterr().err


def test_a_single_response_sample_is_scored_with_one_warning(model, tmp_path, capsys):
    """A one-response sample is scored (its score alone: nothing to compare) and counted in one warning at
    the end of the run, not one per sample; a run without such samples has no warning."""
    lone = [{"id": f"one{i}", "prompt": "Name a colour.", "responses": ["red"]} for i in range(2)]
    two = {"id": "two", "prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = write_jsonl(tmp_path / "in.jsonl", lone + [two])
    out = tmp_path / "scored.jsonl"
    assert run(data, out, batch_size=1) == 0
    got = read_jsonl(out)
    assert [len(r["scores"]) for r in got] == [1, 1, 2] and got[0]["best"] == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 sample(s) had a single response" in err
    assert run(write_jsonl(tmp_path / "two.jsonl", [two]), tmp_path / "two_out.jsonl") == 0
    assert "warning" not in capsys.readouterr().err


def test_resume_refuses_an_output_of_another_input(media, tmp_path, capsys):
    root, video = media
    samples = good_samples(None)
    data_a = write_jsonl(root / "a.jsonl", samples[:4])
    data_b = write_jsonl(root / "b.jsonl", samples[1:5])
    out = tmp_path / "scored.jsonl"
    assert run(data_a, out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run(data_b, out) == 2
    assert "does not match" in capsys.readouterr().err
    assert out.read_bytes() == before  # left untouched
    assert run(data_b, out, "--overwrite") == 0
    assert [r["id"] for r in read_jsonl(out)] == [s["id"] for s in samples[1:5]]
    # an output longer than its input is refused too
    data_short = write_jsonl(root / "short.jsonl", samples[1:3])
    assert run(data_short, out) == 2
    assert "more lines" in capsys.readouterr().err


def test_plain_progress_and_summary_without_tqdm(media, tmp_path, monkeypatch, capsys):
    root, _ = media
    data = write_jsonl(root / "progress.jsonl", good_samples(None)[:4])
    monkeypatch.setattr(score_cli, "tqdm", None)
    monkeypatch.setattr(score_cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    out = tmp_path / "scored.jsonl"
    assert main(["--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if "samples/s" in line]
    assert len(progress) == 2 and "2/4 lines" in progress[0] and "4/4 lines" in progress[1]
    assert "4 scored, 0 bad" in captured.out and "samples/s" in captured.out


def test_usage_errors(media, tmp_path, capsys):
    root, _ = media
    data = write_jsonl(root / "usage.jsonl", good_samples(None)[:1])
    assert run(tmp_path / "nope.jsonl", tmp_path / "o.jsonl") == 2
    assert "no such file" in capsys.readouterr().err
    assert run(data, data) == 2
    assert "input file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--workers", "-1"])
    assert "expected an integer >= 0" in capsys.readouterr().err
    assert run(data, tmp_path / "o.jsonl", "--engine", "ray", "--workers", "2") == 2
    assert "--workers is for --engine local" in capsys.readouterr().err
    assert run(data, tmp_path / "o.jsonl", "--actors", "2") == 2
    assert "--actors is for --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()  # refused before anything is written


@pytest.mark.slow
def test_subprocess_end_to_end(model, media, tmp_path):
    root, video = media
    samples = good_samples(None)[:3]
    data = write_jsonl(root / "e2e.jsonl", [samples[0], "{not json", samples[1], samples[2]])
    out = tmp_path / "scored.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mrrm.score", "--data", str(data), "--out", str(out),
                           "--device", "cpu", "--batch-size", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # one line not scored
    assert "e2e.jsonl:2: invalid JSON" in proc.stderr and "1 line(s) could not be scored" in proc.stderr
    assert "3 scored, 1 bad" in proc.stdout
    got = read_jsonl(out)
    assert [without_results(r) for r in got] == samples
    want = model.score([absolute_media(s, root) for s in samples])
    for record, scores in zip(got, want):
        assert record["scores"] == pytest.approx(scores, **SCORE_TOL)
    assert read_jsonl(str(out) + ".errors.jsonl")[0]["line"] == 2


@pytest.mark.slow
def test_a_video_run_is_quiet_stderr_mrrms_lines_stdout_results(model, media, tmp_path):
    """`mrrm score` on a file with a video, in a fresh process: transformers warned about
    cap_pixels_per_frame on every video command and drew its "Loading weights" bar. Now stderr holds only
    mrrm's own progress lines and stdout only the summary of the results."""
    root, video = media
    if video is None:
        pytest.skip("PyAV cannot write the test video here")
    data = write_jsonl(root / "quiet.jsonl", [s for s in good_samples(video) if "video" in s or "image" in s][:3])
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "mrrm", "score", "--data", str(data), "--out",
                           str(tmp_path / "out.jsonl"), "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 3
    assert "cap_pixels_per_frame" not in done.stderr and "Loading weights" not in done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith("mrrm.score: ")] == [], done.stderr
    assert "warning" not in done.stderr.lower()
    out = done.stdout.splitlines()
    assert out[0].startswith("mrrm.score: done: 3 scored, 0 bad") and all(x.startswith("  ") for x in out[1:]), out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_is_reported_naming_the_file():
    """/dev/full fails every write with ENOSPC, as a full disk does: mrrm._io.writing names the file."""
    import errno

    from mrrm._io import WriteError, append_durable, writing

    with pytest.raises(WriteError, match=r"cannot write '/dev/full': No space left on device") as e:
        with writing("/dev/full"), open("/dev/full", "ab", buffering=0) as f:
            append_durable(f, [b"one line\n"])
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"


@pytest.mark.slow
def test_a_write_failing_mid_line_names_the_file_and_the_rerun_resumes(model, media, tmp_path):
    """The output file stops growing mid-write (a full disk; here RLIMIT_FSIZE, EFBIG): the command
    exits 1 with one line naming the file, the torn line is cut on the rerun, which finishes the job:
    the output equals a run that never failed."""
    from faults import file_size_limit

    root, _ = media
    samples = [dict(s, id=f"s{i}") for i, s in enumerate(good_samples(None)[:3] * 4)]
    data = write_jsonl(root / "disk.jsonl", samples)
    reference = tmp_path / "reference.jsonl"
    assert run(data, reference, batch_size=2) == 0
    size = len(reference.read_bytes())
    out = tmp_path / "scored.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mrrm.score", "--data", str(data), "--out", str(out), "--device", "cpu",
           "--batch-size", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(size // 2 + 7))
    assert proc.returncode == 1, proc.stderr
    assert f"cannot write {str(out)!r}: File too large" in proc.stderr and "rerun the same command" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert 0 < len(out.read_bytes()) < size and not out.read_bytes().endswith(b"\n")  # a torn last line
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_output(read_jsonl(out), read_jsonl(reference))


@pytest.mark.slow
def test_encoding_workers_write_what_in_process_encoding_writes(model, media, tmp_path):
    """--workers 2 (encoding in two worker processes ahead of the model): the same output and error
    files byte for byte (the same chunks are scored), bad samples with the encoder's reasons, and
    the media budgets given as flags applied in the workers too."""
    root, video = media
    lines = mixed_lines(video)
    data = write_jsonl(root / "workers.jsonl", [content for content, _ in lines])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli(out, *extra):
        done = subprocess.run([sys.executable, "-m", "mrrm.score", "--data", str(data), "--out", str(out), "--device",
                               "cpu", "--batch-size", "2", "--no-progress", "--allow-errors", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return out.read_bytes(), Path(str(out) + ".errors.jsonl").read_bytes()

    assert cli(tmp_path / "a.jsonl") == cli(tmp_path / "b.jsonl", "--workers", "2")
    one = ("--max-images-per-sample", "1")
    assert cli(tmp_path / "c.jsonl", *one) == cli(tmp_path / "d.jsonl", "--workers", "2", *one)
    assert b"over the limit of 1 per sample" in (tmp_path / "d.jsonl.errors.jsonl").read_bytes()


def test_ray_actor_scores_under_the_media_budgets_it_is_given(monkeypatch, tmp_path):
    """score_ray.ScoreActor (a Ray Data actor: its own process under Ray) receives the driver's MediaBudgets
    as a constructor argument and sets them on the encoder of the model it loads: a non-default budget
    refuses what the defaults pass. Ray itself is not needed to build one."""
    from mrrm.cli import score_ray
    from mrrm.data.media import DEFAULT_MEDIA_BUDGETS, MediaBudgets
    from mrrm.model.api import build_default_model

    monkeypatch.setattr(score_ray, "load_model", lambda *a, **kw: build_default_model())  # an unshared copy
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    raw = json.dumps({"prompt": "p", "responses": ["a", "b"], "images": ["a.png", "a.png"]})
    batch = {"line": np.array([1]), "raw": np.array([raw])}

    def reasons(budgets):
        actor = score_ray.ScoreActor(None, "cpu", None, None, None, 1, str(tmp_path), budgets)
        assert actor.model.encoder.media_budgets == (budgets or DEFAULT_MEDIA_BUDGETS)
        return [json.loads(r)["reason"] for r in actor(batch)["result"]]

    assert reasons(None) == [None]
    (reason,) = reasons(MediaBudgets(images_per_sample=1))
    assert "2 images, over the limit of 1 per sample (--max-images-per-sample" in reason


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes_and_resumes(model, media, tmp_path):
    """--engine ray (Ray Data, a local Ray with model actors): the local engine's records in its order
    (`best` equal, scores within rounding: the actor runs torch on one thread) and the same error
    records byte for byte, bad lines included; an interrupted run (output cut after 4 lines plus a
    torn one) resumes under Ray to the same file, byte for byte."""
    pytest.importorskip("ray.data")
    root, video = media
    lines = mixed_lines(video)
    data = write_jsonl(root / "ray.jsonl", [content for content, _ in lines])
    local, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli(out, *extra):
        return subprocess.run([sys.executable, "-m", "mrrm.score", "--data", str(data), "--out", str(out), "--device",
                               "cpu", "--batch-size", "2", "--no-progress", "--allow-errors", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    assert cli(local).returncode == 0
    done = cli(ray_out, "--engine", "ray")
    assert done.returncode == 0, done.stderr[-3000:]
    # the same records in the same order; scores equal up to the rounding of the actor's single thread
    assert_same_output(read_jsonl(ray_out), read_jsonl(local))
    assert Path(str(ray_out) + ".errors.jsonl").read_bytes() == Path(str(local) + ".errors.jsonl").read_bytes()
    first = ray_out.read_bytes()
    kept = first.splitlines(keepends=True)
    ray_out.write_bytes(b"".join(kept[:4]) + kept[4][:10])  # killed while writing line 5
    done = cli(ray_out, "--engine", "ray")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    assert ray_out.read_bytes() == first  # the same actors, the same chunks: the same bytes


def test_a_second_writer_of_the_same_out_is_refused(model, tmp_path, capsys):
    """Two score commands on one --out would interleave and duplicate lines: while one holds the
    output's lock (a flock on the output file itself), another is refused (exit 2, nothing written); no
    lock file is left behind."""
    import fcntl

    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a colour.", "responses": ["red", "blue"]}])
    out = tmp_path / "scored.jsonl"
    out.write_bytes(b"")
    with open(out, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's run, in effect
        assert run(data, out) == 2
        assert "is being written by another running command" in capsys.readouterr().err
        assert out.read_bytes() == b""
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert run(data, out) == 0
    assert len(read_jsonl(out)) == 1 and not os.path.exists(str(out) + ".lock")


def test_lone_surrogate_is_a_per_sample_error(model, tmp_path):
    """A lone surrogate ("\\ud800", valid JSON) in a prompt or response: that line is a bad sample, the
    rest of the file is scored (exit 1: not every line was); mrrm.score(errors="skip") gives None in its place."""
    good = {"prompt": "Name a colour.", "responses": ["red", "blue"]}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"prompt": "Hi \\ud800", "responses": ["a"]}\n'
                    + '{"prompt": "Hi", "responses": ["a \\udfff b"]}\n' + json.dumps(good) + "\n")
    out = tmp_path / "scored.jsonl"
    assert run(path, out) == 1
    assert len(read_jsonl(out)) == 2
    errors = read_jsonl(str(out) + ".errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3] and all("not valid Unicode" in e["error"] for e in errors)
    got = mrrm.score([good, {"prompt": "Hi \ud800", "responses": ["a"]}], model, errors="skip")
    assert got[1] is None and len(got[0]) == 2


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """An --out whose directory cannot be made (here: below a regular file) exits 2 naming it, before
    any model is loaded."""
    import mrrm.cli.score_file as sc

    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a colour.", "responses": ["red", "blue"]}])
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(sc, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert run(data, tmp_path / "afile" / "out.jsonl") == 2
    assert "cannot write there" in capsys.readouterr().err


def test_resume_without_its_errors_file_says_so(model, tmp_path, capsys):
    good = {"prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "", "responses": ["x"]}, good, good])
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 1
    os.remove(str(out) + ".errors.jsonl")  # the record of line 1's error is gone
    capsys.readouterr()
    assert run(data, out) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "errors file" in err and "is missing" in err


# -- issue 29: long lines, text budgets, workers that die (row 3) -----------------------------------------
def test_long_and_deeply_nested_lines_are_errors_of_their_line(model, tmp_path, capsys):
    """A line nested 200000 arrays deep (100 KB) made json raise RecursionError: exit 1 on every rerun,
    nothing written. A line over --max-line-bytes (default 16 MiB) is passed over in blocks, never held.
    Both are now errors of their line; the rest is scored (exit 1: two lines were not), and a rerun resumes past
    them."""
    max_line = 16 * 2**20  # mrrm._io.DEFAULT_MAX_LINE_BYTES
    good = {"id": "g", "prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = tmp_path / "in.jsonl"
    with open(data, "wb") as f:
        f.write(json.dumps(good).encode() + b"\n")
        f.write(b"[" * 200_000 + b"\n")
        f.write(b'{"id": "huge", "prompt": "p", "responses": ["' + b"x" * (max_line + 10) + b'"]}\n')
        f.write(json.dumps(dict(good, id="g2")).encode() + b"\n")
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 1
    assert [r["id"] for r in read_jsonl(out)] == ["g", "g2"]
    errors = read_jsonl(str(out) + ".errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3]
    assert "nested too deeply" in errors[0]["error"]
    assert f"over the limit of {max_line} bytes per line (--max-line-bytes)" in errors[1]["error"]
    before = out.read_bytes()
    assert run(data, out) == 1 and out.read_bytes() == before  # resumed: nothing left, nothing redone


@pytest.mark.slow
def test_a_line_longer_than_memory_is_never_held(model, tmp_path):
    """A 1 GiB line (a sparse file: no disk) under an address-space limit of the command's own size plus
    300 MB: reading it whole raised MemoryError (exit 1, every rerun); now it is passed over in 1 MiB blocks
    and recorded as an error of its line, and the lines after it are scored."""
    good = {"prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = tmp_path / "in.jsonl"
    with open(data, "wb") as f:
        f.write(json.dumps(dict(good, id="a")).encode() + b"\n" + b'{"prompt": "')
        f.seek(2**30, os.SEEK_CUR)  # a hole of 1 GiB of zero bytes, all on one line
        f.write(b'"}\n' + json.dumps(dict(good, id="b")).encode() + b"\n")
    out = tmp_path / "scored.jsonl"
    code = ("import resource, sys\n"
            "import mrrm\n"
            "from mrrm.cli.score_file import main\n"
            "m = mrrm.load(device='cpu')\n"
            "m.score([{'prompt': 'warm up', 'responses': ['a', 'b']}])\n"
            "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20),) * 2)\n"
            f"sys.exit(main(['--data', {str(data)!r}, '--out', {str(out)!r}, '--device', 'cpu', '--no-progress',\n"
            "               '--allow-errors']))\n")
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b"]
    (err,) = read_jsonl(str(out) + ".errors.jsonl")
    assert err["line"] == 2 and f"the line is {2**30 + 14} bytes, over the limit" in err["error"]


def test_text_budgets_refuse_before_tokenizing(model, tmp_path, monkeypatch):
    """--max-response-chars, --max-text-bytes and --max-line-bytes: a sample over one is an error naming the
    flag, found when its line is read (it never reaches the model or the tokenizer); the default budgets
    are the model's own (more characters never fit its max_length)."""
    good = {"id": "g", "prompt": "Name a colour.", "responses": ["red", "blue"]}
    lines = [good, {"id": "long-response", "prompt": "p", "responses": ["a" * 61, "b"]},
             {"id": "many-bytes", "prompt": "p", "responses": ["\u00e9" * 60, "\u00e8" * 60]},
             {"id": "long-line", "prompt": "p", "responses": ["ok"], "meta": "m" * 1200}, dict(good, id="g2")]
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    seen = []
    real_ids = model.encoder._ids
    monkeypatch.setattr(model.encoder, "_ids", lambda text: seen.append(len(text)) or real_ids(text))
    out = tmp_path / "scored.jsonl"
    assert run(data, out, "--max-response-chars", 60, "--max-text-bytes", 200, "--max-line-bytes", 1000) == 1
    assert [r["id"] for r in read_jsonl(out)] == ["g", "g2"]
    errors = {e["id"]: e["error"] for e in read_jsonl(str(out) + ".errors.jsonl")}
    assert "response 0 is 61 characters, over the text budget of 60 characters per response " \
           "(--max-response-chars" in errors["long-response"]
    assert "the text is 241 bytes (UTF-8), over the text budget of 200 bytes" in errors["many-bytes"]
    assert "over the limit of 1000 bytes per line (--max-line-bytes)" in errors[None]
    assert max(seen) < 200  # nothing over a budget was tokenized
    # the model's own budgets: more characters than its tokenizer could ever fit into max_length
    limit = model.encoder.max_text_chars
    data2 = write_jsonl(tmp_path / "in2.jsonl", [{"id": "big", "prompt": "p", "responses": ["x " * limit, "y"]}])
    seen.clear()
    out2 = tmp_path / "scored2.jsonl"
    assert run(data2, out2) == 1
    (err,) = read_jsonl(str(out2) + ".errors.jsonl")
    assert f"over the text budget of {limit} characters per response" in err["error"]
    assert f"more characters never fit max_length={model.config.max_length}" in err["error"] and not seen


@pytest.mark.slow
def test_workers_survive_a_tokenizer_abort_under_a_memory_limit(model, tmp_path):
    """The exit 134 of the issue, with --workers 2: a 10 MB response let through by raised text budgets
    makes the tokenizer abort ("memory allocation failed") in its worker under an address-space limit
    (the command's own size plus 800 MB; tokenizing it takes ~1.9 GB). That sample is an error naming
    the worker's death; the others are scored and the run exits 0 (before: BrokenProcessPool, exit 1)."""
    good = {"prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = write_jsonl(tmp_path / "in.jsonl", [dict(good, id="a"), {"id": "bomb", "prompt": "p",
                                                                     "responses": ["hello world " * 900_000, "y"]},
                                                dict(good, id="b"), dict(good, id="c")])
    out = tmp_path / "scored.jsonl"
    big = str(100_000_000)
    code = ("import resource, sys\n"
            "import mrrm\n"
            "from mrrm.cli.score_file import main\n"
            "mrrm.load(device='cpu')\n"
            "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (800 << 20),) * 2)\n"
            f"sys.exit(main(['--data', {str(data)!r}, '--out', {str(out)!r}, '--device', 'cpu', '--no-progress',\n"
            f"               '--allow-errors', '--workers', '2', '--batch-size', '2', '--max-text-chars', {big!r},\n"
            f"               '--max-response-chars', {big!r}, '--max-text-bytes', {big!r}, '--max-response-bytes', {big!r}]))\n")
    env = dict(os.environ, MALLOC_ARENA_MAX="2",
               PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]
    (err,) = read_jsonl(str(out) + ".errors.jsonl")
    assert err["id"] == "bomb" and "the encoding worker process died on this sample (killed by SIGABRT)" in err["error"]


# -- issue 29: resuming with other settings (row 7) --------------------------------------------------------
def test_resume_with_other_settings_is_refused_naming_each(model, tmp_path, capsys):
    """--out records the model (path or Hub id@commit, and a content fingerprint), --mode and --permutations
    in <out>.meta.json. A resume with others mixed models in one file (issue 29: best differed on 186 of
    299 lines);
    now it is refused before the model loads, naming each (old -> new), the output untouched. The same
    files under another path resume (a moved checkpoint); an output without a record resumes only with
    --resume-unrecorded."""
    import shutil

    from mrrm.model.api import DEFAULT_MODEL_DIR

    samples = [{"id": f"s{i}", "prompt": f"Question {i}?", "responses": ["yes", "no", "maybe"]} for i in range(5)]
    data = write_jsonl(tmp_path / "in.jsonl", samples[:3])
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 0
    write_jsonl(data, samples)  # two more samples to score
    before = out.read_bytes()
    capsys.readouterr()
    assert run(data, out, "--mode", "independent", "--permutations", 2) == 2
    err = capsys.readouterr().err
    assert "mode: 'joint' -> 'independent'" in err and "permutations: 1 -> 2" in err
    assert "--mode joint --permutations 1" in err  # how to resume with the recorded ones
    settings = json.loads((tmp_path / "scored.jsonl.meta.json").read_text())
    assert settings["model"] == "built-in default" and settings["mode"] == "joint" and settings["permutations"] == 1
    assert len(settings["model_fingerprint"]) == 16
    other = tmp_path / "other-model"
    shutil.copytree(DEFAULT_MODEL_DIR, other)
    (other / "mrrm_config.json").write_text((other / "mrrm_config.json").read_text().replace("}", ' }'))
    assert run(data, out, "--model", other) == 2
    err = capsys.readouterr().err
    assert f"model: 'built-in default' -> {str(other)!r}" in err and "model content fingerprint:" in err
    assert out.read_bytes() == before
    # the same files under another path: the model moved, the resume goes on
    copy = tmp_path / "copy-of-default"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    assert run(data, out, "--model", copy) == 0
    assert "the model moved" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(out)] == [s["id"] for s in samples]
    # no record at all: refused unless told
    os.remove(str(out) + ".meta.json")
    write_jsonl(data, samples + [dict(samples[0], id="s5")])
    assert run(data, out, "--model", copy) == 2
    assert "--resume-unrecorded" in capsys.readouterr().err
    assert run(data, out, "--model", copy, "--resume-unrecorded") == 0
    assert json.loads((tmp_path / "scored.jsonl.meta.json").read_text())["model"] == str(copy)
    assert len(read_jsonl(out)) == 6


# -- issue 29: symbolic links and the writer lock (row 8) ---------------------------------------------------
def test_outputs_are_never_written_through_a_symbolic_link(model, tmp_path, capsys):
    """A pre-created <out>.errors.jsonl link had its target truncated and overwritten; a dangling --out link
    was followed (its target created). Outputs are opened with O_NOFOLLOW: a link at an output's name is
    refused (exit 2) and nothing anywhere is written; the settings record replaces a link, never its
    target."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Name a colour.", "responses": ["red", "blue"]}])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "scored.jsonl"
    os.symlink(victim, str(out) + ".errors.jsonl")
    assert run(data, out) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n" and not out.exists()
    os.remove(str(out) + ".errors.jsonl")

    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "target.jsonl"
    dangling = tmp_path / "dangling.jsonl"
    os.symlink(target, dangling)
    assert run(data, dangling) == 2
    assert "--out" in capsys.readouterr().err and not target.exists()

    linked = tmp_path / "linked.jsonl"
    os.symlink(victim, linked)
    assert run(data, linked) == 2 and victim.read_text() == "precious\n"

    os.symlink(victim, str(out) + ".meta.json")
    assert run(data, out) == 0
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(str(out) + ".meta.json") and len(read_jsonl(out)) == 1


def test_the_writer_lock_is_keyed_by_the_files_identity(model, tmp_path, capsys):
    """The lock was `<out>.lock`, keyed by the name: the same file under another name (here a hard link)
    got a second writer (issue 29: 536 lines for 300 inputs, 236 duplicate ids). The lock is now the output file's
    own (flock: its device and inode), so the second writer is refused whatever name it uses."""
    import fcntl

    samples = [{"id": f"s{i}", "prompt": "Name a colour.", "responses": ["red", "blue"]} for i in range(4)]
    data = write_jsonl(tmp_path / "in.jsonl", samples[:2])
    out = tmp_path / "scored.jsonl"
    assert run(data, out) == 0
    write_jsonl(data, samples)
    alias = tmp_path / "alias.jsonl"
    os.link(out, alias)
    before = out.read_bytes()
    # a run writing `out`, as either version of the lock has it: the file itself and the old <out>.lock
    with open(out, "a+b") as held, open(str(out) + ".lock", "a+b") as held_name:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(held_name.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert run(data, alias) == 2
        err = capsys.readouterr().err
        assert "is being written by another running command, possibly under another name" in err
        assert out.read_bytes() == before


# -- issue 29: media whose container misstates its size, in one chunk (row 10) -------------------------------
@pytest.mark.slow
def test_media_that_misstate_their_size_cost_their_samples_under_a_memory_limit(model, tmp_path):
    """An ICO whose directory says 256x256 holding a 13000x13000 PNG, a TIFF of 16x16 in a 32768x32768
    tile and an AVI whose header says 64x64 with 4096x4096 frames, in one chunk, the command held to its
    own size plus 512 MB: they made `import av` fail and the command exit 1 on every rerun. Now each is
    an error of its sample, refused before the big allocation, and the chunk's other sample is scored."""
    pytest.importorskip("av")
    from faults import avi_of_changing_size, lying_ico, tiff_with_huge_tile

    (tmp_path / "m").mkdir()
    lying_ico(tmp_path / "m" / "icon.ico")
    tiff_with_huge_tile(tmp_path / "m" / "tile.tif")
    avi_of_changing_size(tmp_path / "m" / "clip.avi", 4096)
    good = {"prompt": "Name a colour.", "responses": ["red", "blue"]}
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ico", "prompt": "What is it?", "image": "m/icon.ico", "responses": ["a", "b"]},
        {"id": "tif", "prompt": "What is it?", "image": "m/tile.tif", "responses": ["a", "b"]},
        {"id": "avi", "prompt": "What happens?", "video": "m/clip.avi", "responses": ["a", "b"]},
        dict(good, id="ok")])
    out = tmp_path / "scored.jsonl"
    code = ("import resource, sys\n"
            "import mrrm\n"
            "from mrrm.cli.score_file import main\n"
            "mrrm.load(device='cpu').score([{'prompt': 'warm up', 'responses': ['a', 'b']}])\n"
            "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20),) * 2)\n"
            f"sys.exit(main(['--data', {str(data)!r}, '--out', {str(out)!r}, '--device', 'cpu', '--no-progress',\n"
            "               '--allow-errors']))\n")
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    errors = {e["id"]: e["error"] for e in read_jsonl(str(out) + ".errors.jsonl")}
    assert "ICO images are refused" in errors["ico"]
    assert "stored in 32768x32768 tiles" in errors["tif"]
    assert "which the decoder refuses" in errors["avi"]
