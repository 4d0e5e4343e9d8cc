"""Files the commands read and write, shared by python -m mrrm.score, mrrm.eval, mrrm.prefgraph and
the data readers:

- `bounded_lines`: the lines of a file, each at most `max_bytes` long in memory; a longer line is
  passed over in blocks and reported as an `OverlongLine` (its length), never held whole.
- `parse_json_line`: a line -> (JSON value, None) or (None, why not), nesting too deep included.
- `open_output` / `write_atomic`: outputs opened without following a symbolic link at their name
  (O_NOFOLLOW), new files created exclusively (O_EXCL), and a writer lock keyed by the file's identity
  (flock on the open file: the same inode reached through any alias is the same lock).
- durable append-only JSONL: each chunk is fsynced before the next is computed, and a line torn by a
  kill is cut on restart; `writing`: a failed write (a full disk, a quota, a read-only file system)
  reported naming the file."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from typing import IO, Any, Iterator, NamedTuple

from mrrm.errors import OutputError, WriteError

# The longest input line read into memory (bytes, without its line end). Parsing one costs up to ~25x its
# size in Python objects (a 16 MiB line of `[{},{},...]` grew the peak RSS by 399 MB): a longer line is a
# per-line error, passed over without being held. Room for a sample's text under the text budgets and an
# inline (base64) image or two; `--max-line-bytes` raises it.
DEFAULT_MAX_LINE_BYTES = 16 * 2**20
_BLOCK = 1 << 20


class OverlongLine(NamedTuple):
    """A line longer than the reader's limit, passed over: only its length (bytes, line end excluded)."""

    length: int
    limit: int

    def reason(self, flag: str = "--max-line-bytes") -> str:
        return (f"the line is {self.length} bytes, over the limit of {self.limit} bytes per line ({flag}); "
                "it was not read into memory")


def bounded_lines(f: IO[bytes], max_bytes: int) -> Iterator[bytes | OverlongLine]:
    """The lines of a binary file from its current position, each as bytes (with its line end) when at
    most `max_bytes` long, else as an OverlongLine passed over in blocks (memory stays O(max_bytes)).
    `f.tell()` after a line is the start of the next one."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    while True:
        raw = f.readline(max_bytes + 2)  # room for the line end: "\r\n"
        if not raw:
            return
        if raw.endswith(b"\n") or len(raw) < max_bytes + 2:  # the whole line (the last may lack "\n")
            content = len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
            if content <= max_bytes:
                yield raw
                continue
            yield OverlongLine(content, max_bytes)
            continue
        length = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(_BLOCK)
            if not raw:
                break
            length += len(raw)
        yield OverlongLine(length - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0), max_bytes)


def parse_json_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for a line holding JSON, else (None, why not). Nesting deeper than the interpreter's
    recursion limit is an error of the line (RecursionError), not of the run."""
    try:
        return json.loads(raw), None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, f"invalid JSON: {e}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply to parse (arrays or objects inside each other)"


def _describe_link(path: str) -> str:
    try:
        return f" (a symbolic link to {os.readlink(path)!r})"
    except OSError:
        return " (a symbolic link)"


def open_output(path: str | os.PathLike, what: str = "output") -> tuple[int, bool]:
    """Open `path` for reading and appending without following a symbolic link at its name: a new file
    is created exclusively (O_CREAT | O_EXCL), an existing one must be a regular file. Returns (fd,
    created). OutputError for a symbolic link (dangling or not) or anything but a regular file: writing
    through one would truncate or grow a file somewhere else."""
    path = os.fspath(path)
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(2):  # created or opened; a file appearing between the two tries once more
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            continue  # removed in between: create it
        except OSError as e:
            if e.errno == errno.ELOOP or os.path.islink(path):
                raise OutputError(f"{what} {path!r} is a symbolic link{_describe_link(path)}: outputs are written only "
                                  "to regular files opened without following links; give the file's real path, or "
                                  "remove the link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{what} {path!r} is not a regular file; give a file path")
        return fd, False
    raise OutputError(f"{what} {path!r} kept appearing and disappearing while it was opened; rerun")


def lock_output(fd: int, path: str, what: str = "output") -> None:
    """An exclusive lock on the open file `fd` for as long as it stays open (flock): keyed by the file
    itself (device + inode), so another writer reaching the same file by any name (a symbolic link to
    its folder, a hard link) is refused. OutputError when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        st = os.fstat(fd)
        raise OutputError(f"{what} {path!r} (device {st.st_dev}, inode {st.st_ino}) is being written by another "
                          "running command, possibly under another name; wait for it or choose another output") from None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step: written to a new temporary file beside it (created
    exclusively, never through a link), fsynced, then renamed over `path` (a symbolic link at `path`
    is replaced, its target left alone). A failure leaves `path` as it was."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    with writing(path):
        for attempt in range(100):
            tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}.{attempt}")
            try:
                fd = os.open(tmp, flags, 0o666)
                break
            except FileExistsError:
                continue
        else:
            raise OutputError(f"cannot create a temporary file beside {path!r}: 100 names taken")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


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


def cut_torn_tail(path_or_fd: str | int) -> int:
    """Truncate a file we append to after its last newline (a write cut short by a kill leaves a
    line without one). Takes a path or an open file descriptor (read and write; left open, its
    offset moved). Returns the number of bytes removed."""
    if isinstance(path_or_fd, int):
        opened = os.fdopen(os.dup(path_or_fd), "r+b", buffering=0)
    else:
        opened = open(path_or_fd, "r+b")
    with opened as f:
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
