"""Faults an operator meets, made real for a child process: `file_size_limit(n)` is a preexec_fn under
which every write past n bytes of one file fails with EFBIG ("File too large"), the way a full disk
fails writes with ENOSPC: at the OS level, mid-write, inside C++ writers (torch.save) as well."""
import resource
import signal


def file_size_limit(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


class AbortingEncoder:
    """A stand-in for an Encoder in worker processes (mrrm.data.pipeline): encodes a sample to its "id", and
    aborts the process (SIGABRT, as a native library failing an allocation does) on a sample with
    "abort": true. Picklable, importable by the spawned workers (tests/ is on their sys.path)."""

    def encode(self, sample, index=0, *, media_dir=None):
        import os

        if sample.get("abort"):
            os.abort()
        return sample["id"]


# -- media whose container misstates what it holds (issue 29, row 10) ---------------------------------------
def png_bytes(width: int, height: int) -> bytes:
    """A valid RGB PNG of zeros, compressed row by row (a 13000x13000 one is ~0.5 MB; nothing that size is
    ever held here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def lying_ico(path, inner_size: int = 13000):
    """An ICO whose directory says 256x256 (width and height bytes 0) holding an inner_size^2 PNG."""
    import struct

    inner = png_bytes(inner_size, inner_size)
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22)
                     + inner)
    return path


def tiff_with_huge_tile(path, size: int = 16, tile: int = 32768):
    """A ~150-byte deflate TIFF of size x size pixels stored in one tile x tile tile: libtiff allocates the
    whole tile (1 GB at 32768) before it finds the data short."""
    import struct
    import zlib

    data = zlib.compress(b"\x00" * 64)
    entries = [(256, 3, size), (257, 3, size), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
               (322, 3, tile), (323, 3, tile), (324, 4, None), (325, 4, len(data))]
    data_at = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = data_at if value is None else value
        out += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    path.write_bytes(out + struct.pack("<I", 0) + data)
    return path


def avi_of_changing_size(path, big: int, frames: int = 32, small: int = 64):
    """An MJPEG AVI whose first frame (and so its header, as FFmpeg probes it) is small x small and whose
    other frames are big x big."""
    import io
    from fractions import Fraction

    import av
    from PIL import Image

    def jpeg(side):
        buf = io.BytesIO()
        Image.new("RGB", (side, side)).save(buf, "JPEG", quality=50)
        return buf.getvalue()

    first, rest = jpeg(small), jpeg(big)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width = stream.height = small
        stream.pix_fmt = "yuvj420p"
        stream.time_base = Fraction(1, 8)
        for i in range(frames):
            packet = av.Packet(first if i == 0 else rest)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 8)
            container.mux(packet)
    return path


def ts_of_changing_size(path, big: int = 1024, small: int = 64):
    """An MPEG transport stream whose resolution changes in-band: 16 frames of small x small, then 16 of
    big x big (two streams one after the other, as broadcast streams do)."""
    import av
    import numpy as np

    parts = []
    for side, start in ((small, 0), (big, 16)):
        part = path.with_name(f"{path.stem}.{side}.ts")
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for i in range(16):
                frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 40 * (i % 4), np.uint8), format="rgb24")
                frame.pts = start + i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        parts.append(part.read_bytes())
        part.unlink()
    path.write_bytes(b"".join(parts))
    return path


# A child process that loads one medium under an address-space limit set just above what it already
# holds (so the limit means the same on any machine): prints one JSON line {"error", "type", "charged",
# "grew_mb"}. MALLOC_ARENA_MAX keeps glibc from reserving a 64 MB arena per thread under the limit.
_LOAD_UNDER_LIMIT = r"""
import json, resource, sys
from mrrm.data import media
def vm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
path, kind, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
resource.setrlimit(resource.RLIMIT_AS, (vm() + headroom,) * 2)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
budget = media.PixelBudget(2**29, "the test's budget")
out = {"error": None, "type": None}
try:
    with budget:
        if kind == "image":
            media.load_image(path)
        else:
            media.load_video(path, fps=8.0, max_frames=32, backend=None if kind == "video" else kind)
except BaseException as e:
    out = {"error": str(e), "type": type(e).__name__}
out["charged"] = budget.used
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) >> 10
print(json.dumps(out))
"""


def load_under_memory_limit(path, kind: str = "image", headroom_mb: int = 256) -> dict:
    """mrrm.data.media.load_image / load_video (kind "video", or a backend name) of `path` in a child process
    under an address-space limit of what it holds after importing mrrm.data.media plus `headroom_mb`."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _LOAD_UNDER_LIMIT, str(path), kind, str(headroom_mb)],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(lines[-1])
