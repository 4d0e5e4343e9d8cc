"""Durable append-only JSONL files, shared by the resumable tools (python -m mrrm.score, mrrm.eval):
each chunk is fsynced before the next is computed, and a line torn by a kill is cut on restart.
And `writing`: a failed write (a full disk, a quota, a read-only file system) reported naming the file."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import IO


class WriteError(OSError):
    """A file could not be written; str() names the file, the cause and the free space there."""

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror}"


def _free_space(path: str) -> str:
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return f"{shutil.disk_usage(probe).free / 1e6:.1f} MB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Any failure inside (while writing `path`) -> WriteError naming it. A full disk reaches Python
    as ENOSPC from write() with no file name, as a RuntimeError from torch.save's zip writer
    ("unexpected pos"), as a SafetensorError, ...: all are reported the same way, with the cause."""
    path = os.fspath(path)
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the writer raises, the caller learns which file
        code = getattr(e, "errno", None) or errno.EIO
        cause = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e).strip()[:200]}"
        raise WriteError(code, f"{cause} ({_free_space(path)})", path) from e


def cut_torn_tail(path: str) -> int:
    """Truncate a file we append to after its last newline (a write cut short by a kill leaves a
    line without one). Returns the number of bytes removed."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, pos = 0, size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def append_durable(f: IO[bytes], lines: list[bytes]) -> None:
    """One chunk, made durable before the next is read. `f` should be unbuffered (buffering=0): a
    failed write (a full disk) then leaves nothing buffered for close() to fail on again."""
    if lines:
        data = memoryview(b"".join(lines))
        while data:  # an unbuffered file may take part of it per call
            data = data[f.write(data):]
        f.flush()
        os.fsync(f.fileno())
