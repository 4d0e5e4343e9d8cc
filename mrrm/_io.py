"""Durable append-only JSONL files, shared by the resumable tools (python -m mrrm.score, mrrm.eval):
each chunk is fsynced before the next is computed, and a line torn by a kill is cut on restart."""
from __future__ import annotations

import os
from typing import IO


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
    """One chunk, made durable before the next is read."""
    if lines:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())
