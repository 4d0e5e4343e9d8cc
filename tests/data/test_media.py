"""mrrm.data.media: image sources, video decoding and sampling (decord and PyAV), fingerprints.

Every file is made on the fly in tmp_path. Videos are written with PyAV (libx264, crf 0) with one
solid colour per frame, so a decoded frame is identified by its nearest reference colour.
"""
import base64
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrrm.data import media
from mrrm.data.media import MediaError, VideoClip, load_image, load_video, media_fingerprint, sample_frame_indices

HAS_DECORD = media._decord() is not None
requires_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not importable")
FILE_BACKENDS = ["pyav", pytest.param("decord", marks=requires_decord)]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def pixels():
    return np.random.RandomState(0).randint(0, 256, size=(12, 16, 3), dtype=np.uint8)


@pytest.fixture
def png(tmp_path, pixels):
    path = tmp_path / "img.png"
    path.write_bytes(_encode(pixels))
    return path


def colour(i: int) -> np.ndarray:
    """Frame i's solid colour: 24 colours far apart (> 40 levels) in RGB."""
    return np.array([(i * 10) % 256, (255 - i * 10) % 256, (i * 37 + 50) % 256], dtype=np.uint8)


COLOURS = np.stack([colour(i) for i in range(64)]).astype(np.int32)


def write_video(path: Path, num_frames: int, fps: int = 12, size: int = 32, faststart: bool = False) -> Path:
    """libx264 (with B-frames) in the container the suffix names."""
    av = pytest.importorskip("av")
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(num_frames):
            frame = np.broadcast_to(colour(i), (size, size, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(frames: torch.Tensor, num_colours: int = 24) -> list[int]:
    """Which reference colour each decoded [F, 3, H, W] frame shows (checked to be close)."""
    means = frames.double().mean(dim=(2, 3)).numpy()  # [F, 3]
    dist = np.abs(means[:, None, :] - COLOURS[None, :num_colours, :]).max(axis=2)  # [F, C]
    ids = dist.argmin(axis=1)
    assert (dist[np.arange(len(ids)), ids] <= 6).all(), dist.min(axis=1)
    return ids.tolist()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """24 frames of 32x32 at 12 fps: 2 seconds."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 24)


def qwen_vl_utils_nframes(total_frames, video_fps, fps, min_frames, max_frames, factor=2):
    """qwen-vl-utils' smart_nframes (fps branch) as published, the oracle for sample_frame_indices."""
    def ceil_by_factor(n, f):
        return math.ceil(n / f) * f

    def floor_by_factor(n, f):
        return math.floor(n / f) * f

    min_frames = ceil_by_factor(min_frames, factor)
    max_frames = floor_by_factor(min(max_frames, total_frames), factor)
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    return floor_by_factor(nframes, factor)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def test_image_sources_give_identical_pixels(tmp_path, png, pixels, monkeypatch):
    data = png.read_bytes()
    b64 = base64.b64encode(data).decode()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "rel.png").write_bytes(data)
    sources = {
        "str path": str(png),
        "Path": png,
        "relative + base_dir": "sub/rel.png",
        "relative Path + base_dir": Path("sub") / "rel.png",
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "base64": b64,
        "base64, wrapped lines": "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
        "base64, url-safe without padding": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "data URL": "data:image/png;base64," + b64,
        "PIL": Image.fromarray(pixels),
        "array": pixels,
        "HF dict with bytes": {"bytes": data, "path": "ignored.png"},
        "HF dict with path": {"bytes": None, "path": "sub/rel.png"},
    }
    for name, src in sources.items():
        image = load_image(src, base_dir=tmp_path)
        assert isinstance(image, Image.Image) and image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), pixels, err_msg=name)
    monkeypatch.chdir(sub)  # without base_dir a relative path is relative to the working directory
    np.testing.assert_array_equal(np.asarray(load_image("rel.png")), pixels)


def test_image_is_a_new_loaded_copy(pixels):
    original = Image.fromarray(pixels)
    image = load_image(original)
    assert image is not original
    image.putpixel((0, 0), (1, 2, 3))
    np.testing.assert_array_equal(np.asarray(original), pixels)


def test_image_modes_convert_to_rgb():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    out = np.asarray(load_image(_encode(rgba)))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)  # onto white
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(np.asarray(load_image(_encode(gray))), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))
    jpeg = load_image(_encode(np.full((8, 8, 3), 128, np.uint8), "JPEG", quality=95))
    assert jpeg.mode == "RGB" and np.abs(np.asarray(jpeg).astype(int) - 128).max() <= 2


def test_an_existing_path_wins_over_base64(tmp_path, pixels):
    (tmp_path / "abcd").write_bytes(_encode(pixels))  # "abcd" is also valid base64 (of 3 bytes)
    np.testing.assert_array_equal(np.asarray(load_image("abcd", base_dir=tmp_path)), pixels)
    with pytest.raises(MediaError, match="not found"):
        load_image("abcd", base_dir=tmp_path / "elsewhere")  # decodes as base64, but not to an image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_file_names_the_path(tmp_path, pixels, fmt):
    data = _encode(np.repeat(np.repeat(pixels, 4, 0), 4, 1), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(MediaError, match="image bytes.*truncated"):
        load_image(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(MediaError, match="truncated"):
        load_image(lazy)  # a lazily opened PIL image fails here, not later


def test_not_an_image_missing_and_directory_name_the_path(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(MediaError, match="not an image") as info:
        load_image(str(text))
    assert str(text) in str(info.value)
    with pytest.raises(MediaError, match="not found") as info:
        load_image("missing.png", base_dir=tmp_path)
    assert str(tmp_path / "missing.png") in str(info.value)
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match="not found"):
        load_image({"path": "missing.png", "bytes": None}, base_dir=tmp_path)


def test_bad_image_sources():
    with pytest.raises(MediaError, match="image bytes.*not an image"):
        load_image(b"definitely not an image")
    with pytest.raises(MediaError, match="image bytes: empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="data URL"):
        load_image("data:image/png;base64,!!!not base64!!!")
    with pytest.raises(MediaError, match="data URL.*not an image"):
        load_image("data:image/png;base64," + base64.b64encode(b"plain text").decode())
    with pytest.raises(MediaError, match="only base64 data URLs"):
        load_image("data:text/plain,hello")
    with pytest.raises(MediaError, match="no network"):
        load_image("https://example.com/cat.png")
    with pytest.raises(MediaError, match="neither an existing file nor base64"):
        load_image("A" * 1000)
    with pytest.raises(MediaError, match="unsupported type int"):
        load_image(3)
    with pytest.raises(MediaError, match="neither 'bytes' nor 'path'"):
        load_image({"bytes": None, "path": None})
    with pytest.raises(MediaError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(MediaError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    assert issubclass(MediaError, ValueError)


# --------------------------------------------------------------------------------------------------
# Frame sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total, source_fps, kwargs, expected", [
    (24, 12, {}, [0, 8, 15, 23]),                                  # 2 s at 2 fps
    (24, 12, {"fps": 12}, list(range(24))),                       # every frame
    (24, 12, {"fps": 6}, [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]),
    (24, 12, {"fps": 12, "max_frames": 6}, [0, 5, 9, 14, 18, 23]),
    (24, 12, {"fps": 12, "max_frames": 7}, [0, 5, 9, 14, 18, 23]),  # floored to a multiple of 2
    (24, 12, {"fps": 0.1}, [0, 8, 15, 23]),                        # min_frames = 4
    (24, 12, {"fps": 0.1, "min_frames": 5}, [0, 5, 9, 14, 18, 23]),  # min_frames rounded up to 6
    (3, 12, {}, [0, 2]),                                            # never more frames than exist
    (5, 30, {}, [0, 1, 3, 4]),
    (1, 12, {}, [0, 0]),                                            # padded up to frame_factor
    (1, 12, {"frame_factor": 4, "max_frames": 8}, [0, 0, 0, 0]),
    (3, 12, {"frame_factor": 4, "max_frames": 8}, [0, 1, 2, 2]),
    (24, 12, {"frame_factor": 1, "fps": 1.5}, [0, 8, 15, 23]),
])
def test_sample_frame_indices(total, source_fps, kwargs, expected):
    assert sample_frame_indices(total, source_fps, **kwargs) == expected


def test_sample_frame_indices_matches_qwen_vl_utils():
    rng = np.random.RandomState(0)
    for _ in range(500):
        total = int(rng.randint(2, 3000))
        source_fps = float(rng.choice([1, 8, 12.5, 23.976, 24, 25, 29.97, 30, 60]))
        fps = float(rng.choice([0.5, 1, 2, 4]))
        min_frames = int(rng.randint(1, 16))
        max_frames = int(rng.randint(2, 200))
        indices = sample_frame_indices(total, source_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
        n = qwen_vl_utils_nframes(total, source_fps, fps, min_frames, max_frames)
        expected = torch.linspace(0, total - 1, n).round().long().tolist()
        assert indices == expected, (total, source_fps, fps, min_frames, max_frames)
        assert len(indices) % 2 == 0 and indices == sorted(indices) and 0 <= indices[0] and indices[-1] < total


def test_sampling_arguments_are_checked():
    with pytest.raises(ValueError, match="fps"):
        sample_frame_indices(24, 12, fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(24, 12, max_frames=1)
    with pytest.raises(ValueError, match="frame_factor"):
        sample_frame_indices(24, 12, frame_factor=0)
    with pytest.raises(ValueError, match="total_frames"):
        sample_frame_indices(0, 12)
    with pytest.raises(ValueError, match="source_fps"):
        sample_frame_indices(24, 0)


# --------------------------------------------------------------------------------------------------
# Videos from files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_video_file_default_sampling(video, backend):
    clip = load_video(video, backend=backend)
    assert isinstance(clip, VideoClip) and clip.backend == backend
    assert clip.frames.dtype == torch.uint8 and tuple(clip.frames.shape) == (4, 3, 32, 32)
    assert clip.frame_indices == (0, 8, 15, 23)
    assert frame_ids(clip.frames) == [0, 8, 15, 23]
    assert clip.source_fps == pytest.approx(12.0)
    assert clip.sample_fps == pytest.approx(2.0)
    assert clip.duration_s == pytest.approx(2.0)
    assert clip.source_num_frames == 24 and clip.num_frames == 4
    assert clip.path == str(video)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("kwargs, expected", [
    ({"fps": 12}, list(range(24))),
    ({"fps": 6}, [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]),
    ({"fps": 12, "max_frames": 7}, [0, 5, 9, 14, 18, 23]),
    ({"fps": 1, "min_frames": 8}, [0, 3, 7, 10, 13, 16, 20, 23]),
])
def test_video_file_fps_and_max_frames(video, backend, kwargs, expected):
    clip = load_video(video, backend=backend, **kwargs)
    assert list(clip.frame_indices) == expected
    assert frame_ids(clip.frames) == expected
    assert clip.sample_fps == pytest.approx(12.0 * len(expected) / 24)
    assert clip.num_frames % 2 == 0


@requires_decord
def test_decord_and_pyav_give_the_same_frames(video):
    by_decord = load_video(video, fps=12, backend="decord")
    by_pyav = load_video(video, fps=12, backend="pyav")
    assert by_decord.frame_indices == by_pyav.frame_indices
    assert by_decord.sample_fps == by_pyav.sample_fps and by_decord.source_fps == by_pyav.source_fps
    diff = (by_decord.frames.int() - by_pyav.frames.int()).abs().max().item()
    assert diff <= 2  # bit-identical in practice; the two libraries' RGB conversions could differ


def test_video_auto_backend_relative_path_and_env(video, monkeypatch):
    clip = load_video(video.name, base_dir=video.parent)
    assert clip.backend == ("decord" if HAS_DECORD else "pyav") and clip.path == str(video)
    monkeypatch.setenv("MRRM_VIDEO_BACKEND", "pyav")
    assert load_video(video).backend == "pyav"


def test_decord_failure_falls_back_to_pyav(video, monkeypatch):
    def broken_decord(path, choose):
        raise RuntimeError("decord could not read it")

    monkeypatch.setattr(media, "_decord", lambda: object())  # "decord is importable"
    monkeypatch.setitem(media._READERS, "decord", broken_decord)
    clip = load_video(video)
    assert clip.backend == "pyav" and frame_ids(clip.frames) == [0, 8, 15, 23]
    with pytest.raises(MediaError, match="decord could not read it"):
        load_video(video, backend="decord")  # a forced backend does not fall back


@pytest.mark.parametrize("suffix", ["mkv", "mov", "avi"])
def test_other_containers(tmp_path, suffix):
    """mkv declares no frame count (PyAV counts packets); decord misreads seeks in AVI with B-frames,
    so the automatic choice sends AVI to PyAV."""
    path = write_video(tmp_path / f"clip.{suffix}", 24)
    expected = [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    for backend in ["pyav", None]:
        clip = load_video(path, fps=6, backend=backend)
        assert list(clip.frame_indices) == expected and frame_ids(clip.frames) == expected, (suffix, backend)
        assert clip.source_fps == pytest.approx(12.0) and clip.source_num_frames == 24
    if suffix == "avi":
        assert clip.backend == "pyav"


@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("num_frames, expected", [(1, [0, 0]), (2, [0, 1]), (3, [0, 2]), (5, [0, 1, 3, 4])])
def test_short_videos_have_even_frame_counts(tmp_path, backend, num_frames, expected):
    path = write_video(tmp_path / f"short{num_frames}.mp4", num_frames)
    clip = load_video(path, backend=backend)
    assert list(clip.frame_indices) == expected
    assert frame_ids(clip.frames) == expected
    assert clip.num_frames % 2 == 0
    sampled = len(set(expected)) if num_frames == 1 else len(expected)
    assert clip.sample_fps == pytest.approx(12.0 * sampled / num_frames)


@pytest.mark.parametrize("backend", [None, *FILE_BACKENDS])
def test_bad_video_files_name_the_path(tmp_path, video, backend):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    with pytest.raises(MediaError, match="cannot read as a video") as info:
        load_video(text, backend=backend)
    assert str(text) in str(info.value)

    missing = tmp_path / "missing.mp4"
    with pytest.raises(MediaError, match="not found") as info:
        load_video(missing, backend=backend)
    assert str(missing) in str(info.value)
    with pytest.raises(MediaError, match="not found"):
        load_video("missing.mp4", base_dir=tmp_path, backend=backend)

    data = write_video(tmp_path / "whole.mp4", 48, size=64, faststart=True).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # header intact, frames missing
    with pytest.raises(MediaError, match="cut.mp4.*cannot read as a video"):
        load_video(cut, fps=24, backend=backend)

    still = tmp_path / "still.mp4"
    still.write_bytes(_encode(np.zeros((8, 8, 3), np.uint8)))  # ffmpeg would read it as one frame
    with pytest.raises(MediaError, match="still.mp4.*cannot read as a video"):
        load_video(still, backend=backend)

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        load_video(empty, backend=backend)
    # a folder is a video given as frame images: this one holds none
    with pytest.raises(MediaError, match="frame folder .*: no frame images"):
        load_video(tmp_path, backend=backend)


def test_video_argument_errors(video):
    with pytest.raises(ValueError, match="backend"):
        load_video(video, backend="opencv")
    with pytest.raises(ValueError, match="fps"):
        load_video(video, fps=-1)
    with pytest.raises(MediaError, match="unsupported type"):
        load_video(42)
    with pytest.raises(MediaError, match="URLs"):
        load_video("https://example.com/clip.mp4")


# --------------------------------------------------------------------------------------------------
# Videos from frame lists
# --------------------------------------------------------------------------------------------------


def _solid(i: int, size=(8, 10)) -> np.ndarray:
    return np.broadcast_to(colour(i), (*size, 3)).copy()


def test_frame_list_of_pil_images_and_arrays(tmp_path):
    frames = [Image.fromarray(_solid(i)) if i % 2 else _solid(i) for i in range(5)]
    (tmp_path / "f2.png").write_bytes(_encode(_solid(2)))
    frames[2] = "f2.png"  # any load_image source works
    clip = load_video(frames, base_dir=tmp_path)
    assert clip.backend == "frames" and clip.path is None
    assert tuple(clip.frames.shape) == (6, 3, 8, 10) and clip.frames.dtype == torch.uint8
    assert clip.frame_indices == (0, 1, 2, 3, 4, 4)  # last frame repeated to a multiple of 2
    assert frame_ids(clip.frames) == [0, 1, 2, 3, 4, 4]
    assert clip.sample_fps == 2.0 and clip.source_fps == 2.0 and clip.duration_s == 2.5
    assert clip.source_num_frames == 5
    fast = load_video([_solid(i) for i in range(4)], frames_fps=4.0)
    assert fast.frame_indices == (0, 1, 2, 3) and fast.sample_fps == 4.0 and fast.duration_s == 1.0


def test_frame_list_thinned_to_max_frames():
    stack = np.stack([_solid(i) for i in range(10)])
    for src in (list(stack), stack):  # a list of frames, or one [F, H, W, 3] array
        clip = load_video(src, max_frames=5, min_frames=100, fps=30)  # fps/min_frames: file-only
        assert clip.frame_indices == (0, 3, 6, 9)  # floor(5 / 2) * 2 = 4 frames, evenly spaced
        assert frame_ids(clip.frames) == [0, 3, 6, 9]
        assert clip.sample_fps == pytest.approx(2.0 * 4 / 10)
    assert load_video(stack[:1]).frame_indices == (0, 0)


def test_frame_list_errors_name_the_frame():
    with pytest.raises(MediaError, match="zero frames"):
        load_video([])
    with pytest.raises(MediaError, match="zero frames"):
        load_video(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="frame 2 of the frame list: size 4x4 differs from frame 0's 10x8"):
        load_video([_solid(0), _solid(1), _solid(2, size=(4, 4))])
    with pytest.raises(MediaError, match="frame 1 of the frame list.*not an image"):
        load_video([_solid(0), b"not an image"])
    with pytest.raises(MediaError, match="frame 1 of the frame list.*not found"):
        load_video([_solid(0), "no/such/frame.png"])
    with pytest.raises(MediaError, match="frame 0 of the frame list.*uint8"):
        load_video([np.zeros((4, 4, 3), np.float32)])


def test_clip_feeds_the_qwen2_vl_video_processor(video):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    clip = load_video(video, fps=6)
    processor = transformers.Qwen2VLVideoProcessor(cap_pixels_per_frame=False)
    out = processor(videos=[clip.frames], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[clip.num_frames // 2, 24, 24]]  # 32x32 -> 336x336 (min_pixels)
    channels_last = processor(videos=[clip.frames.permute(0, 2, 3, 1).numpy()], return_tensors="pt")
    torch.testing.assert_close(out["pixel_values_videos"], channels_last["pixel_values_videos"])
    metadata = transformers.video_utils.VideoMetadata(**clip.video_metadata())
    assert metadata.timestamps[:2] == pytest.approx([0.0, 2 / 12])


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def test_fingerprint_agrees_across_encoded_sources(tmp_path, png, video):
    data = png.read_bytes()
    b64 = base64.b64encode(data).decode()
    same = {
        media_fingerprint(png),
        media_fingerprint(str(png)),
        media_fingerprint("img.png", base_dir=tmp_path),
        media_fingerprint(data),
        media_fingerprint(b64),
        media_fingerprint("data:image/png;base64," + b64),
        media_fingerprint({"bytes": data, "path": None}),
        media_fingerprint({"bytes": None, "path": str(png)}),
    }
    assert len(same) == 1
    fingerprint = same.pop()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert media_fingerprint(data + b"\0") != fingerprint
    assert media_fingerprint(video) == media_fingerprint(video.read_bytes()) != fingerprint
    assert media_fingerprint(b"abc") == "a8041e48648fe7f6"  # stable across runs and machines


def test_fingerprint_of_pixels_and_lists(png, pixels):
    from_path, from_bytes = load_image(png), load_image(png.read_bytes())
    assert media_fingerprint(from_path) == media_fingerprint(from_bytes)
    other = pixels.copy()
    other[0, 0, 0] ^= 1
    assert media_fingerprint(Image.fromarray(other)) != media_fingerprint(from_path)
    assert media_fingerprint(pixels) == media_fingerprint(pixels.copy()) != media_fingerprint(other)
    assert media_fingerprint([pixels, other]) != media_fingerprint([other, pixels])
    with pytest.raises(MediaError, match="not found"):
        media_fingerprint(png.parent / "missing.mp4")
    with pytest.raises(MediaError, match="unsupported type"):
        media_fingerprint(1.5)


def test_image_pixel_budget_is_checked_before_decoding(tmp_path, monkeypatch):
    """A tiny PNG declaring 81 megapixels is refused from its header (nothing decoded); the limit is
    MediaBudgets.image_pixels (default 50 MP), passed as `budgets=`."""
    from PIL import Image as PILImage
    from PIL import ImageFile

    from mrrm.data import media as m
    path = tmp_path / "huge.png"
    PILImage.new("L", (9000, 9000)).save(path, optimize=True)  # 81 MP of black: a few hundred KB
    assert path.stat().st_size < 1_000_000
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(m.MediaError, match=r"9000x9000 = 81.0 megapixels, over the limit of 50 megapixels "
                                           r"\(--max-image-megapixels; MediaBudgets.image_pixels\)"):
        m.load_image(path)
    assert decoded == []  # refused from the header: the pixels were never decoded
    assert m.load_image(path, budgets=m.MediaBudgets(image_pixels=100_000_000)).size == (9000, 9000) and decoded


@pytest.mark.parametrize("backend", [None, "pyav"])
def test_video_budgets_are_checked_before_decoding(tmp_path, monkeypatch, backend):
    """Frame size from the container's header, and the sampled frames' pixels, against
    MediaBudgets.video_frame_pixels / video_pixels before any reader decodes a frame."""
    from mrrm.data import media as m

    path = write_video(tmp_path / "v.mp4", num_frames=24, size=32)
    calls = []
    for name, reader in list(m._READERS.items()):
        monkeypatch.setitem(m._READERS, name, lambda p, choose, _r=reader, _n=name: calls.append(_n) or _r(p, choose))
    small_frames = m.MediaBudgets(video_frame_pixels=32 * 32 - 1)
    with pytest.raises(m.MediaError, match=r"frames of 32x32 are over the limit of 1023 pixels "
                                           r"\(--max-video-frame-megapixels; MediaBudgets.video_frame_pixels\)"):
        m.load_video(path, backend=backend, budgets=small_frames)
    assert calls == []  # refused from the header: no reader ran
    small_video = m.MediaBudgets(video_pixels=4 * 32 * 32 - 1)  # 2 s at 2 fps: 4 frames sampled
    with pytest.raises(m.MediaError, match=r"frames of 32x32 would decode to .* over the limit .*--max-video-megapixels"):
        m.load_video(path, backend=backend, fps=2.0, max_frames=8, budgets=small_video)
    assert len(calls) == 1  # the first reader stopped at its frame choice; no fallback to another
    assert m.load_video(path, backend=backend, fps=2.0, max_frames=8).frames.shape[-2:] == (32, 32)


def test_pixel_budget_nests_and_gives_back():
    """A PixelBudget charges its parent too; a refusal by either charges nothing; release() returns
    what was charged up the chain; `temporary` marks a shared pool."""
    pool = media.PixelBudget(100, "the pool", shared=True)
    a = media.PixelBudget(60, "request a", parent=pool)
    b = media.PixelBudget(60, "request b", parent=pool)
    a.charge(50, "x")
    with pytest.raises(media.OverBudget, match="y: decoding .* take request a over its limit") as own:
        a.charge(20, "y")
    assert not own.value.temporary and (a.used, pool.used) == (50, 50)
    with pytest.raises(media.OverBudget, match="z: .* take the pool over its limit") as shared:
        b.charge(51, "z")
    assert shared.value.temporary and (b.used, pool.used) == (0, 50)
    a.release()
    assert (a.used, pool.used) == (0, 0)
    b.charge(51, "z")
    assert pool.used == 51
    with pytest.raises(ValueError, match="positive int"):
        media.PixelBudget(0, "none")


def test_media_are_charged_from_headers_before_decoding(tmp_path, png, pixels, monkeypatch):
    """load_image / load_video inside a PixelBudget charge the pixels they would decode BEFORE any
    decoding (a refused video's reader stops at its frame choice); a video whose first reader fails is charged once."""
    path = write_video(tmp_path / "v.mp4", num_frames=24, size=32)  # 2 s at 12 fps
    calls = []
    for name, reader in list(media._READERS.items()):
        monkeypatch.setitem(media._READERS, name, lambda p, choose, _r=reader, _n=name: calls.append(_n) or _r(p, choose))
    h, w = pixels.shape[:2]
    with media.PixelBudget(h * w + 4 * 32 * 32 - 1, "the test's budget") as budget:
        load_image(png)
        assert budget.used == h * w
        with pytest.raises(media.OverBudget, match=r"video file .*v.mp4.*: decoding its 0.004096 megapixels .* limit of 0.004287"):
            load_video(path, fps=2.0, max_frames=8)  # 4 frames of 32x32: one pixel too many
    assert len(calls) == 1 and budget.used == h * w  # the reader stopped at its frame choice; no fallback
    load_image(png)  # outside the with: charged to nothing
    assert budget.used == h * w

    def failing(p, choose):
        choose(24, 12.0)
        raise media._ReadFailure("broken on purpose")
    monkeypatch.setitem(media._READERS, "decord", failing)
    with media.PixelBudget(10**6, "b") as budget:
        clip = load_video(path, fps=2.0, max_frames=8, backend=None)
    assert budget.used == clip.frames.shape[0] * 32 * 32  # once, though two readers planned the frames


def test_a_sample_s_media_together_are_budgeted(tmp_path, pixels):
    """MediaBudgets.sample_pixels (the encoder's media_budgets): all of one sample's images and frames
    together, refused per sample before the one that would cross it is decoded; the next sample starts afresh."""
    from mrrm.data.encoding import SampleError
    from mrrm.model.api import build_default_model

    model = build_default_model()
    b64 = base64.b64encode(_encode(pixels)).decode()
    h, w = pixels.shape[:2]
    assert model.encoder.set_media_budgets(sample_pixels=2 * h * w) == media.MediaBudgets(sample_pixels=2 * h * w)
    two = {"prompt": "p", "responses": ["a", "b"], "images": [b64] * 2}
    model.encoder.encode(two, 0)
    model.encoder.encode(two, 1)  # the budget is per sample
    with pytest.raises(SampleError, match=r"sample 2: base64 image string: decoding .* take the sample's media "
                                          r"\(--max-sample-megapixels; MediaBudgets.sample_pixels\) over its limit"):
        model.encoder.encode({**two, "images": [b64] * 3}, 2)


def test_media_budgets_are_a_value_not_module_state(tmp_path, pixels):
    """MediaBudgets is one frozen, validated value passed explicitly: two encoders with different budgets in
    one process (and threads) treat the same image differently, whichever ran last; the defaults are untouched."""
    import copy
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from mrrm.data.encoding import SampleError
    from mrrm.model.api import build_default_model

    assert not [name for name in vars(media) if name.startswith("MAX_")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        media.DEFAULT_MEDIA_BUDGETS.image_pixels = 1
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="media budget image_pixels .*--max-image-megapixels.* positive int"):
            media.MediaBudgets(image_pixels=bad)
    h, w = pixels.shape[:2]
    path = tmp_path / "a.png"
    path.write_bytes(_encode(pixels))
    small = media.MediaBudgets(image_pixels=h * w - 1)
    assert load_image(path).size == (w, h)
    with pytest.raises(MediaError, match=r"over the limit of .* \(--max-image-megapixels; MediaBudgets.image_pixels\)"):
        load_image(path, budgets=small)
    assert load_image(path).size == (w, h)  # nothing left behind

    strict = build_default_model().encoder
    lenient = copy.copy(strict)  # the same tokenizer and processor, its own budgets
    strict.set_media_budgets(small)
    assert lenient.media_budgets == media.DEFAULT_MEDIA_BUDGETS
    sample = {"prompt": "p", "responses": ["a", "b"], "images": ["a.png"]}

    def outcome(encoder):
        try:
            encoder.encode(sample, 0, media_dir=str(tmp_path))
            return "ok"
        except SampleError as e:
            return "refused" if "--max-image-megapixels" in e.reason else e.reason

    assert [outcome(e) for e in (strict, lenient, strict, lenient)] == ["refused", "ok", "refused", "ok"]
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(outcome, [strict, lenient] * 4)) == ["refused", "ok"] * 4
    with pytest.raises(TypeError, match="MediaBudgets"):
        strict.set_media_budgets({"image_pixels": 1})


@pytest.mark.slow
def test_a_small_file_of_huge_frames_is_refused_not_a_crash(tmp_path):
    """The 31 KB mp4 of 64 black 3072x3072 frames that made decord abort the interpreter (std::bad_alloc)
    under a 6 GB address-space limit: refused from its header, in a child process held to that limit."""
    import subprocess
    import sys

    av = pytest.importorskip("av")
    path = tmp_path / "big.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 3072
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        black = np.zeros((3072, 3072, 3), np.uint8)
        for _ in range(64):
            for packet in stream.encode(av.VideoFrame.from_ndarray(black, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size < 100_000
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from mrrm.data import media\n"
            "try:\n"
            f"    media.load_video({str(path)!r})\n"
            "except media.MediaError as e:\n"
            "    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "frames of 3072x3072 are over the limit" in done.stdout


# --------------------------------------------------------------------------------------------------
# Videos given as a folder of frame images (MM-RLHF-RewardBench, the authors' MR2Bench video data)
# --------------------------------------------------------------------------------------------------


def _frame_folder(folder: Path, n: int, size=(10, 8), fmt="png", name="frame_{:04d}") -> Path:
    """n solid frames, frame i of colour colour(i), named name.format(i + 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.broadcast_to(colour(i), (size[1], size[0], 3)).copy()).save(
            folder / f"{name.format(i + 1)}.{fmt}")
    return folder


def test_frame_folder_order_thinning_and_timestamps(tmp_path):
    folder = _frame_folder(tmp_path / "clip", 10)
    (folder / "notes.txt").write_text("not a frame")  # ignored, as the reference's *.png glob ignores it
    clip = load_video(folder, max_frames=4)
    # thinned like a frame list (thin_frame_list: evenly spaced, both ends kept)
    assert clip.frame_indices == tuple(media.thin_frame_list(10, 4)) == (0, 3, 6, 9)
    assert frame_ids(clip.frames) == [0, 3, 6, 9] and clip.backend == "frames" and clip.path == str(folder)
    # the authors' timestamps: frame k at k * sampling_interval seconds (default 4.0)
    meta = clip.video_metadata()
    assert meta["fps"] == 0.25 and meta["total_num_frames"] == 10 and meta["duration"] == 40.0
    assert [i / meta["fps"] for i in meta["frames_indices"]] == [0.0, 12.0, 24.0, 36.0]
    assert load_video(folder, max_frames=4, frame_interval=0.5).video_metadata()["fps"] == 2.0
    # relative to base_dir; the same pixels as the frame list of the same files
    rel = load_video("clip", base_dir=tmp_path, max_frames=4)
    as_list = load_video(sorted(str(p) for p in folder.glob("*.png")), max_frames=4)
    assert torch.equal(rel.frames, clip.frames) and torch.equal(as_list.frames, clip.frames)
    # an odd count is padded by repeating the last frame, as a frame list is
    assert load_video(_frame_folder(tmp_path / "three", 3)).frame_indices == (0, 1, 2, 2)
    with pytest.raises(ValueError, match="frame_interval"):
        load_video(folder, frame_interval=0)


def test_frame_folder_file_name_order(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    # play order is the file-name order (MM-RLHF's eval sorts the names), whatever the suffix or its case
    for i, name in [(2, "b.png"), (0, "a.JPG"), (3, "c.jpeg"), (1, "a0.png")]:
        Image.fromarray(np.broadcast_to(colour(i), (8, 10, 3)).copy()).save(
            folder / name, format="JPEG" if "j" in name.lower() else "PNG", quality=100)
    (folder / "d.gif").write_bytes(b"GIF89a")  # not a frame suffix: ignored
    (folder / "sub.png").mkdir()                # a folder named like a frame: ignored
    assert media.list_frame_folder(folder) == ["a.JPG", "a0.png", "b.png", "c.jpeg"]
    assert frame_ids(load_video(folder).frames) == [0, 1, 2, 3]


def test_frame_folder_is_thinned_and_budgeted_before_decoding(tmp_path, monkeypatch):
    folder = _frame_folder(tmp_path / "long", 50, size=(32, 32))
    decoded = []
    real = media._decode_image
    monkeypatch.setattr(media, "_decode_image", lambda fp, label, **kw: decoded.append(Path(fp).name) or real(fp, label, **kw))
    clip = load_video(folder, max_frames=8)
    assert clip.num_frames == 8 and len(decoded) == 8  # 8 of 50 files decoded
    assert decoded == [f"frame_{i + 1:04d}.png" for i in media.thin_frame_list(50, 8)]
    decoded.clear()
    # the video limits, from the kept frames' headers, before any frame is decoded
    with pytest.raises(MediaError, match=r"frame folder .*long.*frame 'frame_0001.png': 32x32 is over the limit"):
        load_video(folder, max_frames=8, budgets=media.MediaBudgets(video_frame_pixels=32 * 32 - 1))
    with pytest.raises(MediaError, match=r"frame folder .*long.*8 frames of 32x32 would decode to"):
        load_video(folder, max_frames=8, budgets=media.MediaBudgets(video_pixels=8 * 32 * 32 - 1))
    budget = media.PixelBudget(8 * 32 * 32 - 1, "the test budget")
    with budget, pytest.raises(media.OverBudget, match="the test budget"):
        load_video(folder, max_frames=8)
    assert decoded == [] and budget.used == 0
    with media.PixelBudget(8 * 32 * 32, "enough") as enough:
        load_video(folder, max_frames=8)
    assert enough.used == 8 * 32 * 32  # charged once, for the kept frames (not per frame again)


def test_frame_folder_errors_name_the_folder_and_frame(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(MediaError, match=r"frame folder .*empty.*: no frame images \(.jpeg, .jpg, .png files\)"):
        load_video(empty)
    bad = _frame_folder(tmp_path / "bad", 4)
    whole = (bad / "frame_0003.png").read_bytes()
    (bad / "frame_0003.png").write_bytes(whole[:45])
    with pytest.raises(MediaError, match=r"frame folder .*bad.*frame 'frame_0003.png': corrupt or truncated"):
        load_video(bad)
    (bad / "frame_0003.png").write_bytes(b"plain text, not a png")
    with pytest.raises(MediaError, match=r"frame 'frame_0003.png': not an image"):
        load_video(bad)
    mixed = _frame_folder(tmp_path / "mixed", 3)
    Image.new("RGB", (12, 8)).save(mixed / "frame_0002.png")
    with pytest.raises(MediaError, match=r"frame 'frame_0002.png': size 12x8 differs from frame 'frame_0001.png'"):
        load_video(mixed)
    (mixed / "frame_0004.png").symlink_to(tmp_path / "nowhere.png")  # dangling: refused, not skipped
    (mixed / "frame_0002.png").unlink()
    with pytest.raises(MediaError, match=r"frame 'frame_0004.png': file not found"):
        load_video(mixed)
    with pytest.raises(MediaError, match="not found"):
        media.list_frame_folder(tmp_path / "missing")


def test_frame_folder_fingerprint(tmp_path):
    folder = _frame_folder(tmp_path / "clip", 3)
    fp = media_fingerprint(folder)
    assert fp == media_fingerprint(str(folder)) == media_fingerprint("clip", base_dir=tmp_path)
    (folder / "notes.txt").write_text("ignored")
    assert media_fingerprint(folder) == fp
    Image.new("RGB", (10, 8), (1, 2, 3)).save(folder / "frame_0002.png")
    assert media_fingerprint(folder) != fp
    (folder / "frame_0002.png").rename(folder / "frame_0009.png")  # the same pixels in another place
    assert media_fingerprint(folder) not in (fp,)


# --------------------------------------------------------------------------------------------------
# Containers that misstate what they hold (issue 29, row 10): budgets from the size that is decoded
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ico", "tiff_tile", "avi_4096", "avi_2048", "ts"])
def test_a_container_that_misstates_its_size_is_refused_under_a_memory_limit(tmp_path, case):
    """Each medium in a child process held to what it holds after importing mrrm.data.media plus 256 MB: an ICO
    whose directory says 256x256 holding a 13000x13000 PNG (PIL decodes it inside Image.open: +645 MB);
    a 150-byte TIFF of 16x16 in a 32768x32768 tile (libtiff allocates the tile: +1 GB); AVIs whose header
    (and first frame) say 64x64 with frames of 4096x4096 (over the per-frame limit: the decoder's own
    max_pixels refuses them) or 2048x2048 (within it: the size check on each decoded frame); an MPEG-TS
    whose resolution changes in-band (decord would rescale it silently: TS goes to PyAV). Each is refused
    by name, with nothing decoded past the first differing frame."""
    from faults import avi_of_changing_size, load_under_memory_limit, lying_ico, tiff_with_huge_tile, ts_of_changing_size

    if case == "ico":
        path, kind, expect = lying_ico(tmp_path / "icon.ico"), "image", r"ICO images are refused"
    elif case == "tiff_tile":
        path, kind, expect = (tiff_with_huge_tile(tmp_path / "tiny.tif"), "image",
                              r"16x16 stored in 32768x32768 tiles .* over the limit of 50 megapixels")
    elif case == "avi_4096":
        pytest.importorskip("av")
        path, kind, expect = (avi_of_changing_size(tmp_path / "big.avi", 4096), "video",
                              r"a frame over the limit of 8294400 pixels .*which the decoder refuses")
    elif case == "avi_2048":
        pytest.importorskip("av")
        path, kind, expect = (avi_of_changing_size(tmp_path / "mid.avi", 2048), "video",
                              r"frame 1 is 2048x2048 but the stream's header says 64x64")
    else:
        pytest.importorskip("av")
        path, kind, expect = (ts_of_changing_size(tmp_path / "changing.ts"), "video",
                              r"frame 16 is 1024x1024 but the stream's header says 64x64")
    got = load_under_memory_limit(path, kind, headroom_mb=256)
    assert got["type"] == "MediaError", got
    assert re.search(expect, got["error"]), got
    assert got["grew_mb"] < 100, got  # refused before the big allocation, not saved by the limit
    assert got["charged"] <= 64 * 64 * 32  # at most the declared size was charged


def test_refused_image_formats_are_named_wherever_the_image_comes_from(tmp_path):
    """An ICO (its directory cannot be trusted, and PIL decodes it while opening) is refused by name as a
    path, as bytes and as base64; the formats mrrm reads still load."""
    import base64

    from faults import lying_ico

    ico = lying_ico(tmp_path / "small.ico", inner_size=64)
    for src in (str(ico), ico.read_bytes(), base64.b64encode(ico.read_bytes()).decode()):
        with pytest.raises(MediaError, match="ICO images are refused"):
            media.load_image(src)
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM"):
        assert media.load_image(_encode(np.zeros((6, 5, 3), np.uint8), fmt)).size == (5, 6)
