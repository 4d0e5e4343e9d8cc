"""Every error mrrm raises derives from MrrmError, and each is importable from `mrrm` (mrrm.MediaError,
...). The standard class each also derives from says what kind of problem it is (ValueError: bad input,
OSError: a file, RuntimeError: a process), so existing `except ValueError` code keeps working. Library
functions raise these; only the commands' `main`s turn them into messages and exit codes.
"""
from __future__ import annotations


class MrrmError(Exception):
    """The base of every mrrm error."""


class ConfigError(MrrmError, ValueError):
    """A run's settings (flags, configuration files, the launch environment, a checkpoint to resume) that
    cannot give the run asked for; the message names the setting and the fix."""


class DataError(MrrmError, ValueError):
    """Training or evaluation data that cannot be used as given (bad samples without --skip-bad, no usable
    sample at all); the message names the samples."""


# mrrm._io
class OutputError(MrrmError, ValueError):
    """An output path that cannot be written safely: a symbolic link, not a regular file, or held by
    another running writer. str() names the path and the fix."""


class WriteError(MrrmError, OSError):
    """A file could not be written; str() names the file, the cause and the free space there."""

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror}"


# mrrm.integrity
class ChecksumError(MrrmError, ValueError):
    """A file does not match its manifest, is missing, or is not covered by one; str() names it."""


class NoManifest(ChecksumError):
    """The directory has no manifest at all (saved before mrrm wrote one, or by other code)."""


class UnsafeFileError(MrrmError, ValueError):
    """A torch file that holds more than tensors and plain values (pickled code references)."""


# mrrm.data.media
class MediaError(MrrmError, ValueError):
    """Media could not be read: the message says which (path, "image bytes", "frame 3 of the frame
    list", ...) and why (missing file, not an image, corrupt or truncated, not a video, ...)."""


class OverBudget(MediaError):
    """Decoding this medium would take a PixelBudget over its limit (nothing of it was decoded).
    `budget` is the one exceeded; `temporary` is True for a budget shared by concurrent work (a
    server's in-flight pool): retrying later may succeed."""

    def __init__(self, message: str, budget):
        super().__init__(message)
        self.budget = budget

    @property
    def temporary(self) -> bool:
        return self.budget.shared


# mrrm.data.encoding
class SampleError(MrrmError, ValueError):
    """A sample that cannot be scored: names its index (and id) and the reason."""

    def __init__(self, index: int, reason: str, sample_id=None):
        self.index, self.reason, self.sample_id = index, reason, sample_id
        where = f"sample {index}" + (f" (id={sample_id!r})" if sample_id is not None else "")
        super().__init__(f"{where}: {reason}")


class BatchError(MrrmError, ValueError):
    """Several bad samples, all reported at once (validation runs before any compute)."""

    def __init__(self, errors: list[SampleError]):
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} bad sample(s):\n  {lines}")


# mrrm.data.pipeline
class WorkerDied(MrrmError, RuntimeError):
    """The encoding workers cannot run at all (a fresh worker died before taking any sample)."""


# mrrm.eval.benchmarks
class RowError(MrrmError, ValueError):
    """A benchmark row that cannot be evaluated (reported by id and location, then skipped)."""


# mrrm.rl.queries
class QueryError(MrrmError, ValueError):
    """A query or prompt that cannot be taken apart (the message says which and why)."""


# mrrm.rl.grpo
class GroupError(MrrmError):
    """A group that cannot be scored as the trainer meant it. `status`: the HTTP status the reward
    server answers with. Never a reward: the message names the cause and the fix."""

    status = 409


class GroupIncomplete(GroupError):
    """Fewer rollouts of a prompt than the group size arrived within the group timeout."""

    status = 504


class GroupOverfull(GroupError):
    """More rollouts of a prompt than the group size arrived within the window: the trainer's samples
    per prompt differ from the group size (or one prompt appears twice in a batch)."""


class GroupConflict(GroupError):
    """The rows of one group disagree: one uid given to two prompts, or two group sizes."""


class RolloutRejected(GroupError):
    """This rollout's own input is invalid; it still counts as one of its group's arrivals, and the rest
    of the group is scored without it."""

    status = 422


class PendingFull(GroupError):
    """A new group would hold more than max_pending responses (a group already open is never refused)."""

    status = 429


# mrrm.rl.serve
class MediaRejected(MrrmError):
    """A media value the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class QueueFull(MrrmError):
    pass


# mrrm.cli.score_file
class CLIError(MrrmError):
    """A usage error or an inconsistent output file: reported in one line, exit status 2."""


__all__ = [
    "MrrmError", "ConfigError", "DataError", "OutputError", "WriteError", "ChecksumError", "NoManifest",
    "UnsafeFileError", "MediaError", "OverBudget", "SampleError", "BatchError", "WorkerDied", "RowError",
    "QueryError", "GroupError", "GroupIncomplete", "GroupOverfull", "GroupConflict", "RolloutRejected",
    "PendingFull", "MediaRejected", "QueueFull", "CLIError",
]
