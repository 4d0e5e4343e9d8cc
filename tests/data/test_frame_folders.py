"""Videos given as a folder of frame images outside mrrm.data.media itself: the reward server's --media-root
confinement (the folder and every frame it reads checked under the root), the sample fields the
authors' reference reads ("question", "sampling_interval"), and scoring with the built-in model."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mrrm.data import media
from mrrm.data.encoding import SampleError, _frame_interval


def frames(folder, n=4, size=(16, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)).save(folder / f"frame_{i + 1:04d}.png")
    return folder


def test_served_frame_folders_stay_under_the_media_root(tmp_path):
    from mrrm.rl.serve import ConfinedFolder, MediaRejected, load_video_field

    root = (tmp_path / "root").resolve()
    frames(root / "clips" / "c1")
    outside = frames(tmp_path / "outside")
    field = load_video_field("clips/c1", root, "sample 0 video 0")
    assert isinstance(field, ConfinedFolder)
    clip = media.load_video(field, max_frames=4)
    assert clip.num_frames == 4 and clip.path == "clips/c1"  # named as the client wrote it
    assert np.array_equal(clip.frames.numpy(), media.load_video(root / "clips" / "c1", max_frames=4).frames.numpy())
    field.close()
    # the folder itself: no escape through "..", an absolute path or a symlink
    for bad in ("../outside", str(outside)):
        with pytest.raises(MediaRejected) as e:
            load_video_field(bad, root, "sample 0 video 0")
        assert e.value.status == 403
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(MediaRejected, match="outside the media root"):
        load_video_field("link", root, "sample 0 video 0")
    # a frame inside the folder symlinked out of the root is refused when read, by name
    (root / "clips" / "c1" / "frame_0005.png").symlink_to(outside / "frame_0001.png")
    field = load_video_field("clips/c1", root, "sample 0 video 0")
    with pytest.raises(media.MediaError, match=r"clips/c1.*frame 'frame_0005.png'.*outside the media root"):
        media.load_video(field, max_frames=8)
    # a folder without frames is a per-sample media error naming it
    (root / "empty").mkdir()
    with pytest.raises(media.MediaError, match=r"frame folder 'empty': no frame images"):
        media.load_video(load_video_field("empty", root, "sample 0 video 0"))


@pytest.mark.parametrize("sample, expected", [
    ({}, 4.0), ({"sampling_interval": 2}, 2.0), ({"fps": "0.5"}, 0.5),          # the reference's float(...)
    ({"sampling_interval": 1.5, "fps": 9}, 1.5),
])
def test_frame_interval_fields(sample, expected):
    assert _frame_interval(sample, 0, None) == expected


@pytest.mark.parametrize("value", [0, -1, "soon", float("nan"), True, [2]])
def test_frame_interval_errors_name_the_sample(value):
    with pytest.raises(SampleError, match=r"sample 3 \(id='s3'\): 'sampling_interval' must be a positive number"):
        _frame_interval({"sampling_interval": value}, 3, "s3")


@pytest.mark.slow
def test_the_model_scores_frame_folders_and_the_question_field(tmp_path):
    import mrrm

    folder = frames(tmp_path / "clip", n=6, size=(32, 32))
    model = mrrm.load(device="cpu")
    responses = ["it moves up", "it moves down", "it stays"]
    by_prompt = model.score({"prompt": "Which way?", "video": str(folder), "responses": responses})[0]
    by_question = model.score({"question": "Which way?", "video": str(folder), "responses": responses})[0]
    assert by_prompt == by_question and len(by_prompt) == 3
    # an explicit interval equal to the default (4.0 s) scores the same (the built-in Qwen2-VL backbone has
    # no time positions; its video_metadata still carries fps = 1 / interval)
    spaced = model.score({"prompt": "Which way?", "video": str(folder), "sampling_interval": 4.0,
                          "responses": responses})[0]
    assert spaced == by_prompt
    from mrrm.data.encoding import BatchError
    (tmp_path / "none").mkdir()
    with pytest.raises(BatchError, match=r"sample 1 \(id='b'\): frame folder .*none.*no frame images"):
        model.score([{"prompt": "x", "video": str(folder), "responses": ["a"]},
                     {"id": "b", "prompt": "x", "video": str(tmp_path / "none"), "responses": ["a"]}])
