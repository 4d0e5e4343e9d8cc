"""`python -m mrrm.score`: score a JSONL file of samples (best-of-N selection, rejection sampling).

    python -m mrrm.score --data in.jsonl --out scored.jsonl [--model PATH] [--mode joint|independent|single]
        [--permutations k] [--max-batch-tokens N] [--batch-size 64] [--media-dir DIR] [--errors PATH]
        [--max-line-bytes N] [--max-text-chars N] [--max-response-chars N] [--max-text-bytes N]
        [--max-response-bytes N]

Input: one sample per line in the published schema ({"prompt", "responses": [...], optional "image" /
"images" / "video" / "videos", "id", any other fields}), or a pairwise record {"prompt", "chosen",
"rejected", ...}: every record shape `mrrm train` takes (mrrm.data.records.normalize). Blank lines are
ignored. Image and video paths resolve relative to --media-dir (default: the input file's directory).

Progress: a tqdm bar on a terminal; otherwise (stderr redirected, or no tqdm) a plain line on
stderr every 10 s. Both show samples/s; --no-progress turns them off.

Output: each good sample is written back, all its fields kept, with "scores" (one float per
response) and "best" (the index of the top score, the first one on ties) added, in input order. A
pairwise record gets "scores" [chosen's, rejected's], "best" and "preferred": "chosen" or "rejected"
(the one the model scores higher; "chosen" on a tie). A sample with one response gets its score, and
one warning at the end of the run counts such samples (nothing was compared).

Streaming: the input is read line by line and scored in chunks of --batch-size samples; each chunk
is appended to --out, flushed and fsynced before the next one is read, so a kill loses at most the
chunk in flight.

Bad samples (invalid JSON, not a JSON object, missing prompt, empty responses, unreadable image or
video, too many tokens, non-finite scores) are reported by 1-based line number and reason on stderr
and in the errors file (default <out>.errors.jsonl, one {"line", "id", "error"} object per line;
removed at the end of a run that had none), and the rest are still scored.

Long input: a line over --max-line-bytes (default 16 MiB) is an error of that line, passed over in
blocks and never held whole; text over the text budgets (--max-text-chars, --max-response-chars,
--max-text-bytes, --max-response-bytes; default the model's: more characters never fit its
max_length) is an error of that sample, found before anything is tokenized. With --workers, a worker
process that dies on a sample (a native crash, the memory limit) costs that sample (an error naming
how the worker died), not the run.

Outputs are opened without following a symbolic link at their name (a link is refused; new files are
created exclusively), and one run at a time may write them: each output is locked by its identity
(device and inode), so a second run reaching the same file under another name is refused too.

Resume: rerunning with the same --out continues where the last run stopped. Done are the lines in
--out and the lines in the errors file: the k-th output line belongs to the k-th input line that is
neither blank nor in the errors file, which is exact because each chunk's errors are written before
its scores. A torn last line (a write cut short by a kill) is cut off and its sample scored again.
Every output line is checked against its input line, so resuming onto the output of another input
is refused (use --overwrite to start over). The model (its path or Hub id@commit and a content
fingerprint), --mode and --permutations are recorded in <out>.meta.json; a resume with other ones
is refused naming each (old -> new). An --out without that record (written by an older mrrm) is
resumed only with --resume-unrecorded.

Exit status: 0 when every line was scored; 1 when the whole input was processed but some lines could not
be scored (they are in the errors file; --allow-errors makes this 0, the count still on stderr), or a
write failed; 2 on a usage error or an output that does not match the input; 130 when interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Iterator, NamedTuple

from mrrm._args import (
    add_model_args,
    add_text_budget_args,
    add_workers_arg,
    doc_epilog,
    positive_int,
    text_budget_overrides,
)
from mrrm._io import (
    OutputError,
    OverlongLine,
    WriteError,
    append_durable,
    bounded_lines,
    cut_torn_tail,
    lock_output,
    open_output,
    parse_json_line,
    write_atomic,
    writing,
)
from mrrm.cli.score_ray import RayScorer
from mrrm.common import top_choice
from mrrm.data.budgets import add_media_budget_args, budgets_applied, media_budgets_from_args
from mrrm.data.encoding import TextBudgets
from mrrm.data.pipeline import ChunkScorer
from mrrm.data.records import normalize
from mrrm.errors import CLIError
from mrrm.model.api import load_model, model_identity, skip_reason

try:
    from tqdm import tqdm
except ImportError:  # tqdm comes with mrrm[model]; without it a plain periodic line is printed
    tqdm = None

PROG = "mrrm.score"
RESULT_FIELDS = ("scores", "best", "preferred")
SETTINGS_SUFFIX = ".meta.json"  # the settings record beside --out
# what a resume must share with the run that wrote --out (the record also says which tool wrote it)
RECORDED_SETTINGS = ("model", "model_fingerprint", "mode", "permutations")
PLAIN_PROGRESS_INTERVAL_S = 10.0


# -- argument parsing -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrrm score", description="Score every response of every sample in a JSONL file "
                                 "(best-of-N selection, rejection sampling).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc_epilog(__doc__, "Input:"))
    ap.add_argument("--data", required=True,
                    help="input JSONL, one sample per line: {prompt, responses, ...} or {prompt, chosen, rejected}")
    ap.add_argument("--out", required=True, help="output JSONL (appended to when resuming)")
    add_model_args(ap)
    add_media_budget_args(ap)
    ap.add_argument("--permutations", type=positive_int, default=1,
                    help="average each score over k cyclic orders of the responses (default 1)")
    ap.add_argument("--batch-size", type=positive_int, default=64,
                    help="samples read, scored and written per chunk (default 64)")
    ap.add_argument("--media-dir", default=None,
                    help="base directory of relative image/video paths (default: the input file's directory)")
    ap.add_argument("--errors", default=None, help="errors JSONL (default: <out>.errors.jsonl)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over instead of resuming an existing --out (off by default: a rerun resumes)")
    ap.add_argument("--resume-unrecorded", action="store_true",
                    help="resume an --out that has no settings record (<out>.meta.json; written by an mrrm before "
                         "it kept one), taking this run's model, --mode and --permutations as the ones it was "
                         "scored with")
    add_text_budget_args(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines (shown by default, on stderr)")
    ap.add_argument("--allow-errors", action="store_true",
                    help="exit 0 when some lines could not be scored (their count goes to stderr); off by default: "
                         "the rest is scored and written, and the exit status is 1")
    add_workers_arg(ap)
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local: this process; ray: model actors on a Ray cluster via Ray Data (mrrm[ray]) (default: local)")
    ap.add_argument("--ray-address", default=None,
                    help="the Ray cluster to join (default: start a local one; 'auto': the running one)")
    ap.add_argument("--actors", type=positive_int, default=None,
                    help="--engine ray: model replicas (default: one per GPU, else all CPUs but one)")
    return ap


# -- files ----------------------------------------------------------------------------------------
def _count_lines(path: str) -> int:
    """Number of lines (a last line without a newline counts), read in blocks: the file is never
    held in memory."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _dumps(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _canonical(obj: dict) -> str:
    """A sample without the fields this tool adds, for comparing an input line with its output line."""
    return json.dumps({k: v for k, v in obj.items() if k not in RESULT_FIELDS}, sort_keys=True, ensure_ascii=False)


def _reader(fd: int):
    """A buffered reader of an output opened by open_output, from its start (its own descriptor: the
    output's stays open for appending)."""
    f = os.fdopen(os.dup(fd), "rb")
    f.seek(0)
    return f


def _read_error_lines(path: str, fd: int) -> set[int]:
    """The input line numbers recorded in an errors file (a torn last line is cut off first)."""
    cut = cut_torn_tail(fd)
    if cut:
        _log(f"dropped a torn last line ({cut} bytes) of {path}: a write cut short")
    done = set()
    with _reader(fd) as f:
        for k, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
                done.add(int(record["line"]))
            except (ValueError, KeyError, TypeError):
                raise CLIError(f"{path}:{k} is not an errors record ({{\"line\": n, ...}}); "
                               "fix or remove the file, or pass --overwrite") from None
    return done


class _ResumeCheck:
    """Walks the lines already in --out alongside the input, checking each against its input line."""

    def __init__(self, out_path: str, out_fd: int, data_path: str, errors_path: str | None = None,
                 errors_created: bool = False):
        self.out_path, self.data_path = out_path, data_path
        # a resume without the errors file: the bad lines it listed now look unscored
        self.missing_errors = errors_path if errors_created else None
        self.f = _reader(out_fd)
        self.count = 0
        self._next = self.f.readline()

    @property
    def pending(self) -> bool:
        return bool(self._next)

    def consume(self, lineno: int, raw: bytes) -> None:
        k = self.count + 1
        where = f"{self.out_path}:{k} does not match {self.data_path}:{lineno}"
        hint = "(a different input, or another tool wrote to it); pass --overwrite to start over or use another --out"
        if self.missing_errors:
            hint += (f". The errors file {self.missing_errors} is missing: if it was deleted, the bad lines it listed "
                     "now look unscored; restore it, or pass --overwrite")
        try:
            out = json.loads(self._next)
        except ValueError:
            raise CLIError(f"{self.out_path}:{k} is not valid JSON; pass --overwrite to start over") from None
        if isinstance(raw, OverlongLine):
            raise CLIError(f"{where}: the input line is {raw.length} bytes, over --max-line-bytes {raw.limit}, but an "
                           f"earlier run scored it: resume with --max-line-bytes {raw.length} or more") from None
        sample, error = parse_json_line(raw)
        if error is not None:
            raise CLIError(f"{where}: the input line is not valid JSON {hint}") from None
        if not isinstance(out, dict) or not isinstance(sample, dict) or _canonical(out) != _canonical(sample):
            raise CLIError(f"{where} {hint}")
        self.count = k
        self._next = self.f.readline()

    def close(self) -> None:
        self.f.close()


# -- progress -------------------------------------------------------------------------------------
def _log(msg: str, bar=None) -> None:
    line = f"{PROG}: {msg}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class _Progress:
    """A tqdm bar over input lines when tqdm is installed and stderr is a terminal; else (no tqdm,
    or stderr going to a log file) a plain stderr line every PLAIN_PROGRESS_INTERVAL_S seconds.
    Both show samples/s of this run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.done, self.enabled = total, initial, enabled
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and tqdm is not None and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="sample", desc=PROG, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, lines: int, scored: int, bad: int) -> None:
        self.done += lines
        if self.bar is not None:
            self.bar.set_postfix(scored=scored, bad=bad, refresh=False)
            self.bar.update(lines)
        elif self.enabled:
            now = time.perf_counter()
            if now - self.last >= PLAIN_PROGRESS_INTERVAL_S or self.done >= self.total:
                self.last = now
                rate = (scored + bad) / max(now - self.start, 1e-9)
                _log(f"{self.done}/{self.total} lines, {scored} scored, {bad} bad, {rate:.1f} samples/s")

    def write(self, msg: str) -> None:
        _log(msg, self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- scoring --------------------------------------------------------------------------------------
def parse_line(raw: bytes | OverlongLine, budgets=None) -> tuple[dict | None, str | None]:
    """(sample, None) for a line holding a JSON object within the text budgets (an
    mrrm.data.encoding.TextBudgets, or None), else (the sample or None, why not). A line passed over as too
    long (OverlongLine) is an error without having been read."""
    if isinstance(raw, OverlongLine):
        return None, raw.reason()
    sample, error = parse_json_line(raw)
    if error is not None:
        return None, error
    if not isinstance(sample, dict):
        return None, f"a line must be a JSON object (a sample), got {type(sample).__name__}"
    over = budgets.check_sample(model_view(sample)) if budgets is not None else None
    return sample, over


def model_view(sample: dict) -> dict:
    """The sample as the model scores it: a pairwise record {prompt, chosen, rejected} (the shape
    `mrrm train` also takes, mrrm.data.records.normalize) as responses [chosen, rejected]; any other
    record as it is. The output line is always the record as it was read."""
    return normalize(sample)


def _sample_id(sample):
    return sample.get("id", sample.get("ID")) if isinstance(sample, dict) else None


def _blank(raw) -> bool:
    return isinstance(raw, bytes) and not raw.strip()


class _Run:
    def __init__(self, model, args, data_path: str, out_path: str, errors_path: str, media_dir: str,
                 progress: _Progress, out_f: IO[bytes], err_f: IO[bytes], scorer=None, budgets=None):
        self.model, self.args, self.media_dir, self.scorer = model, args, media_dir, scorer
        self.budgets = budgets
        self.data_path, self.out_path, self.errors_path = data_path, out_path, errors_path
        self.progress, self.out_f, self.err_f = progress, out_f, err_f
        self.scored = self.bad = 0
        self.single = 0  # samples scored with one response: a score, no comparison
        self.lines_since_update = 0
        self.chunk_start: int | None = None  # the first line of the chunk being scored
        # the chunk being filled: valid samples, and the bad lines read meanwhile
        self.samples: list[tuple[int, dict]] = []
        self.errors: list[tuple[int, Any, str]] = []

    def add_line(self, lineno: int, raw: bytes | OverlongLine) -> None:
        self.lines_since_update += 1
        sample, error = parse_line(raw, self.budgets)
        if error is None:
            self.samples.append((lineno, sample))
        else:
            self.errors.append((lineno, _sample_id(sample), error))
        if len(self.samples) >= self.args.batch_size:
            self.flush()

    def skip_line(self) -> None:
        self.lines_since_update += 1

    def _score(self, samples) -> list[tuple[list[float] | None, str | None]]:
        """(scores or None, why None) per sample: the --engine ray scorer, or the model here."""
        if self.scorer is not None:
            return self.scorer(samples)
        scores = self.model.score([model_view(s) for _, s in samples], mode=self.args.mode,
                                  max_batch_tokens=self.args.max_batch_tokens,
                                  permutations=self.args.permutations, errors="skip", media_dir=self.media_dir)
        if len(scores) != len(samples):
            raise RuntimeError(f"the model returned {len(scores)} results for {len(samples)} samples")
        return [(s, None) for s in scores]

    def flush(self) -> None:
        """Score the chunk; write its errors, then its scores (the order resuming relies on)."""
        samples, errors = self.samples, self.errors
        if not samples and not errors and not self.lines_since_update:
            return
        self.samples, self.errors = [], []
        # the chunk's first line, for the "failed (chunk starting at line N)" hint until it is written
        self.chunk_start = min([ln for ln, _ in samples] + [e[0] for e in errors], default=None)
        results = self._score(samples) if samples else []
        out_lines = []
        for i, ((lineno, sample), (s, reason)) in enumerate(zip(samples, results)):
            sid = _sample_id(sample)
            if s is None:
                errors.append((lineno, sid, reason or skip_reason(self.model, model_view(sample), i, self.media_dir)))
            elif not all(math.isfinite(x) for x in s):
                errors.append((lineno, sid, f"non-finite score(s) {s}"))
            else:
                record = dict(sample)
                record["scores"] = [float(x) for x in s]
                record["best"] = top_choice(s, ties="first")
                if model_view(sample) is not sample:  # a pairwise record: scores of [chosen, rejected]
                    record["preferred"] = ("chosen", "rejected")[record["best"]]
                self.single += len(s) == 1
                out_lines.append(_dumps(record))
        errors.sort(key=lambda e: e[0])
        for lineno, sid, reason in errors:
            self.progress.write(f"{self.data_path}:{lineno}: " + (f"[id={sid!r}] " if sid is not None else "") + reason)
        with writing(self.errors_path):
            append_durable(self.err_f, [_dumps({"line": lineno, "id": sid, "error": reason})
                                        for lineno, sid, reason in errors])
        with writing(self.out_path):
            append_durable(self.out_f, out_lines)
        self.scored += len(out_lines)
        self.bad += len(errors)
        self.progress.update(self.lines_since_update, self.scored, self.bad)
        self.lines_since_update = 0
        self.chunk_start = None


def _load_model(args):
    try:
        return load_model(args.model, device=args.device, dtype=args.dtype, mode=args.mode, verify=args.verify)
    except ValueError as e:
        raise CLIError(str(e)) from None


class _Paths(NamedTuple):
    data: str
    out: str
    errors: str
    media_dir: str
    settings: str


def _check_paths(args) -> _Paths:
    data = os.path.abspath(args.data)
    out = os.path.abspath(args.out)
    errors = os.path.abspath(args.errors) if args.errors else out + ".errors.jsonl"
    settings = out + SETTINGS_SUFFIX
    media_dir = os.path.abspath(args.media_dir) if args.media_dir else os.path.dirname(data)
    if not os.path.isfile(data):
        raise CLIError(f"--data {args.data!r}: no such file")
    if args.media_dir and not os.path.isdir(media_dir):
        raise CLIError(f"--media-dir {args.media_dir!r}: no such directory")
    for name, path in (("--out", out), ("--errors", errors)):
        if os.path.isdir(path):
            raise CLIError(f"{name} {path!r} is a directory")
        if path == data or (os.path.exists(path) and os.path.samefile(path, data)):
            raise CLIError(f"{name} is the input file {args.data!r}; write the results elsewhere")
    if out == errors:
        raise CLIError("--out and --errors name the same file")
    if errors == settings:
        raise CLIError(f"--errors names the settings record of --out ({settings}); choose another file")
    return _Paths(data, out, errors, media_dir, settings)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine == "ray" and args.workers:
        _log("error: --workers is for --engine local (under --engine ray the actors encode)")
        return 2
    if args.engine == "local" and args.actors:
        _log("error: --actors is for --engine ray")
        return 2
    try:
        media_budgets_from_args(args)  # checked before anything is read; set on the model's encoder when it loads
    except ValueError as e:
        _log(f"error: {e}")
        return 2
    try:
        return _main(args)
    except CLIError as e:
        _log(f"error: {e}")
        return 2
    except WriteError as e:  # the lines written before are durable: a rerun resumes after them
        _log(f"error: {e}; the lines written so far are kept: make room and rerun the same command to resume")
        return 1


# -- the run --------------------------------------------------------------------------------------
@dataclass
class _State:
    """What the pass over the input leaves for the interruption messages and the summary."""
    progress: _Progress | None = None
    run: _Run | None = None
    resumed_scored: int = 0
    resumed_bad: int = 0
    t0: float = 0.0  # when scoring started (after the done lines), for the rate


@dataclass
class _Outputs:
    """--out and the errors file, opened by open_output (no link followed) and locked by identity for
    the whole run; `created`: this run made the file (it did not exist)."""
    out_fd: int
    out_created: bool
    err_fd: int | None = None
    err_created: bool = False

    def has_content(self) -> bool:
        return os.fstat(self.out_fd).st_size > 0 or (self.err_fd is not None and os.fstat(self.err_fd).st_size > 0)

    def close(self, paths: _Paths, keep_created: bool) -> None:
        """Close both (releasing the locks); files this run created and left empty go too, unless kept."""
        for fd, created, path in ((self.err_fd, self.err_created, paths.errors),
                                  (self.out_fd, self.out_created, paths.out)):
            if fd is None:
                continue
            if created and not keep_created and os.fstat(fd).st_size == 0:
                _unlink_if_same(path, fd)
            os.close(fd)


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove `path` if it still names the open file `fd` (never a file put there since)."""
    try:
        if os.path.samestat(os.lstat(path), os.fstat(fd)):
            os.unlink(path)
    except OSError:
        pass


def _open_outputs(paths: _Paths) -> _Outputs:
    """Open --out and the errors file without following links and lock each by its identity, before the
    model loads: a missing or read-only output directory, a link at an output's name, or another run
    writing the same file (under any name) is refused here, by name (CLIError)."""
    outputs = None
    what, path = "--out", paths.out
    try:
        for labelled in (("--out", paths.out), ("--errors", paths.errors)):
            what, path = labelled
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        what, path = "--out", paths.out
        fd, created = open_output(paths.out, "--out")
        outputs = _Outputs(fd, created)
        lock_output(fd, paths.out, "--out")
        what, path = "--errors", paths.errors
        outputs.err_fd, outputs.err_created = open_output(paths.errors, "errors file")
        lock_output(outputs.err_fd, paths.errors, "errors file")
    except OutputError as e:
        if outputs is not None:
            outputs.close(paths, keep_created=False)
        raise CLIError(str(e)) from None
    except OSError as e:
        if outputs is not None:
            outputs.close(paths, keep_created=False)
        raise CLIError(f"{what} {path!r}: cannot write there ({e.strerror or type(e).__name__})") from None
    return outputs


def _main(args) -> int:
    paths = _check_paths(args)
    outputs = _open_outputs(paths)
    done = False
    try:
        code = _run_locked(args, paths, outputs)
        done = True
        return code
    finally:
        outputs.close(paths, keep_created=done)  # the locks go with the descriptors


# -- the settings record --------------------------------------------------------------------------
def _settings(args) -> dict:
    """What decides the scores of this run: the model (path or Hub id@commit, content fingerprint), the
    mode and the permutations."""
    try:
        identity = model_identity(args.model)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        raise CLIError(str(e)) from None
    return {"written_by": PROG, **identity, "mode": args.mode or "joint", "permutations": args.permutations}


def _read_settings(path: str) -> dict | None:
    """The settings record at `path` (None when there is none), read without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if os.path.islink(path):
            raise CLIError(f"the settings record {path!r} is a symbolic link; remove it (or pass --overwrite)") from None
        raise CLIError(f"cannot read the settings record {path!r} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read(1 << 20))
        except ValueError:
            record = None
    if not isinstance(record, dict):
        raise CLIError(f"the settings record {path!r} is not a JSON object; restore it, or pass --overwrite")
    return record


def _write_settings(path: str, settings: dict) -> None:
    write_atomic(path, (json.dumps(settings, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _settings_flags(record: dict) -> str:
    model = record.get("model")
    flag = "" if model in (None, "built-in default") else f"--model {model} "
    return f"{flag}--mode {record.get('mode')} --permutations {record.get('permutations')}"


def _check_settings(args, paths: _Paths, outputs: _Outputs, settings: dict) -> None:
    """Before a resume: the outputs must have been scored with these settings. Refuses (CLIError) naming
    every setting that differs (old -> new), or an output with lines but no record; records the settings
    when the outputs are still empty."""
    if not outputs.has_content():
        return  # nothing scored yet: _prepare_outputs writes this run's record
    old = _read_settings(paths.settings)
    if old is None:
        if not args.resume_unrecorded:
            raise CLIError(f"{paths.out} has scored lines but no record of the model, --mode and --permutations they "
                           f"were scored with ({paths.settings} is missing: written by an older mrrm, or deleted), so "
                           "scores of another model could mix into it unseen. If it was scored with exactly these "
                           "settings, rerun with --resume-unrecorded (they are recorded from then on); else pass "
                           "--overwrite or use another --out")
        _log(f"resuming {paths.out} without a settings record (--resume-unrecorded): recording this run's "
             f"{_settings_flags(settings)} as its settings")
        _write_settings(paths.settings, settings)
        return
    differ = [k for k in RECORDED_SETTINGS if old.get(k) != settings[k]]
    if differ == ["model"]:  # the same files under another path (a moved or copied checkpoint)
        _log(f"the model moved: {old.get('model')} -> {settings['model']} (same content fingerprint "
             f"{settings['model_fingerprint']}); resuming")
        _write_settings(paths.settings, settings)
        return
    if differ:
        changes = "; ".join(f"{'model content fingerprint' if k == 'model_fingerprint' else k}: "
                            f"{old.get(k)!r} -> {settings[k]!r}" for k in differ)
        raise CLIError(f"{paths.out} was scored with other settings ({changes}); resuming would mix them in one "
                       f"file. Resume with the recorded ones ({_settings_flags(old)}), or pass --overwrite to "
                       "start over, or use another --out")


def _run_locked(args, paths: _Paths, outputs: _Outputs) -> int:
    resuming = not outputs.out_created and not args.overwrite
    settings = _settings(args)
    if resuming:
        _check_settings(args, paths, outputs, settings)  # before the model loads: a refusal costs nothing

    t_load = time.perf_counter()
    model = _load_model(args) if args.engine == "local" else None  # --engine ray: the actors load it
    load_s = time.perf_counter() - t_load
    # the flags' budgets on the model's encoder for the run (encoding workers get them with it)
    with budgets_applied(model, text=text_budget_overrides(args), media=media_budgets_from_args(args)) as applied:
        budgets = applied.text
        if model is None:  # --engine ray: the actors apply the model's budgets; the flags given are checked here too

            budgets = TextBudgets(**text_budget_overrides(args))
        return _score_locked(args, paths, outputs, settings, resuming, model, budgets, load_s)


def _score_locked(args, paths: _Paths, outputs: _Outputs, settings: dict, resuming: bool, model, budgets,
                  load_s: float) -> int:
    done_errors = _prepare_outputs(args, paths, outputs, resuming, settings)
    check = _ResumeCheck(paths.out, outputs.out_fd, paths.data, paths.errors, outputs.err_created) \
        if resuming else None
    state = _State()
    try:
        _score_file(model, args, paths, outputs, done_errors, check, state, budgets)
    except KeyboardInterrupt:
        if state.progress is not None:
            state.progress.close()
        _log(f"interrupted; every finished chunk is saved in {paths.out}: rerun the same command to resume")
        return 130
    except CLIError:
        raise
    except WriteError:  # main says which file and how to go on
        if state.progress is not None:
            state.progress.close()
        raise
    except BaseException:
        if state.progress is not None:
            state.progress.close()
        run = state.run
        start = None if run is None else run.chunk_start or (run.samples[0][0] if run.samples else None)
        at = f" (chunk starting at line {start})" if start is not None else ""
        _log(f"failed{at}; every finished chunk is saved in {paths.out}: rerun the same command to resume")
        raise
    finally:
        if check is not None:
            check.close()
    state.progress.close()
    seconds = time.perf_counter() - state.t0
    if state.run.bad + state.resumed_bad == 0 and os.fstat(outputs.err_fd).st_size == 0:
        _unlink_if_same(paths.errors, outputs.err_fd)
    print(f"{PROG}: {_summary(state, paths, seconds, load_s)}", flush=True)
    if state.run.single:
        _log(f"warning: {state.run.single} sample(s) had a single response: each got its score, but nothing was "
             "compared (scoring one response jointly is scoring it alone; its best is 0)")
    return _exit_status(args, paths, state.run.bad + state.resumed_bad)


def _exit_status(args, paths: _Paths, bad: int) -> int:
    """0 when every line of the input was scored; else 1, or 0 with --allow-errors (the count on stderr
    either way)."""
    if not bad:
        return 0
    if args.allow_errors:
        _log(f"{bad} line(s) could not be scored (listed in {paths.errors}); exit status 0 (--allow-errors)")
        return 0
    _log(f"{bad} line(s) could not be scored (listed in {paths.errors}); the others are scored in {paths.out}. "
         "Exit status 1: fix those lines and rerun with --overwrite, or pass --allow-errors to accept a partial "
         "output")
    return 1


def _prepare_outputs(args, paths: _Paths, outputs: _Outputs, resuming: bool, settings: dict) -> set[int]:
    """Resume (cut a torn last line of each output) or start over: both outputs emptied, errors first (an
    --out that exists always comes with its own errors file, never a stale one), then this run's settings
    recorded. Returns the input lines in the errors file."""
    if resuming:
        cut = cut_torn_tail(outputs.out_fd)
        if cut:
            _log(f"dropped a torn last line ({cut} bytes) of {paths.out}: a write cut short; its sample is scored again")
        done = _read_error_lines(paths.errors, outputs.err_fd)
        if not outputs.has_content():
            _write_settings(paths.settings, settings)
        return done
    for fd, path in ((outputs.err_fd, paths.errors), (outputs.out_fd, paths.out)):
        with writing(path):
            os.ftruncate(fd, 0)
            os.fsync(fd)
    _write_settings(paths.settings, settings)
    return set()


def _score_file(model, args, paths: _Paths, outputs: _Outputs, done_errors: set[int], check: _ResumeCheck | None,
                state: _State, budgets) -> None:
    """Pass the lines already done, then score the rest in chunks, appending to --out and the errors file."""
    max_line = args.max_line_bytes
    with open(paths.data, "rb") as data_f, os.fdopen(os.dup(outputs.out_fd), "ab", buffering=0) as out_f, \
            os.fdopen(os.dup(outputs.err_fd), "ab", buffering=0) as err_f:
        # the lines already done: verified, counted, not rescored
        initial, first_todo, state.resumed_bad = _skip_done_lines(data_f, done_errors, check, max_line)
        if check is not None:
            state.resumed_scored = _end_resume_check(check, paths, first_todo, state.resumed_bad)
        total = _count_lines(paths.data) if not args.no_progress else 0
        state.progress = _Progress(total, initial, not args.no_progress)
        scorer = None
        if args.engine == "ray":
            scorer = _ray_scorer(args, paths, data_f, first_todo, done_errors, budgets)
        elif args.workers:

            scorer = ChunkScorer(model, args.workers,
                                 _todo_samples(paths.data, data_f.tell(), first_todo, done_errors, max_line, budgets),
                                 args.batch_size, paths.media_dir, mode=args.mode,
                                 max_batch_tokens=args.max_batch_tokens, permutations=args.permutations)
        try:
            state.run = _Run(model, args, paths.data, paths.out, paths.errors, paths.media_dir, state.progress, out_f,
                             err_f, scorer=scorer, budgets=budgets)
            state.t0 = time.perf_counter()
            if first_todo is not None:
                state.resumed_bad += _score_rest(state.run, data_f, first_todo, done_errors, max_line)
            state.run.flush()
        finally:
            if scorer is not None:
                scorer.close()


def _todo_samples(data_path: str, offset: int, first_todo, done_errors: set[int], max_line: int,
                  budgets) -> Iterator[tuple[int, dict]]:
    """(line number, sample) of every sample _score_rest will pass to the scorer, in order, read with a
    second handle from `offset` (the line after `first_todo`) as the scorer asks for them."""
    if first_todo is None:
        return
    with open(data_path, "rb") as f:
        f.seek(offset)
        lines = enumerate(bounded_lines(f, max_line), first_todo[0] + 1)
        for lineno, raw in itertools.chain([first_todo], lines):
            if not _blank(raw) and lineno not in done_errors:
                sample, error = parse_line(raw, budgets)
                if error is None:
                    yield lineno, model_view(sample)


def _ray_scorer(args, paths: _Paths, data_f, first_todo, done_errors: set[int], budgets):
    """The Ray engine's scorer over the samples _score_rest will pass on (read ahead here, then the
    file is put back where it was)."""

    pos = data_f.tell()

    def rows():
        if first_todo is None:
            return
        lines = enumerate(bounded_lines(data_f, args.max_line_bytes), first_todo[0] + 1)
        for lineno, raw in itertools.chain([first_todo], lines):
            if not _blank(raw) and lineno not in done_errors and parse_line(raw, budgets)[1] is None:
                yield lineno, raw.rstrip(b"\r\n")
    try:
        return RayScorer(rows(), args, paths.media_dir)
    finally:
        data_f.seek(pos)


def _skip_done_lines(data_f, done_errors: set[int], check: _ResumeCheck | None, max_line: int
                     ) -> tuple[int, tuple[int, bytes | OverlongLine] | None, int]:
    """Read past the input lines a previous run finished: blank lines, lines in the errors file, and one
    line per line already in --out (each checked against it by `check`). Returns the number of input
    lines passed, the first line still to score as (lineno, raw) or None at the end of the input, and
    the number of error lines passed."""
    lineno = bad = 0
    for lineno, raw in enumerate(bounded_lines(data_f, max_line), 1):
        if _blank(raw):
            continue
        if lineno in done_errors:
            bad += 1
        elif check is not None and check.pending:
            check.consume(lineno, raw)
        else:
            return lineno - 1, (lineno, raw), bad
    return lineno, None, bad


def _end_resume_check(check: _ResumeCheck, paths: _Paths, first_todo: tuple[int, bytes] | None, resumed_bad: int) -> int:
    """After the done lines: refuse an --out longer than the input, say where the run continues.
    Returns the number of samples already scored."""
    if check.pending:
        raise CLIError(f"{paths.out} has more lines than {paths.data} has samples (a different input?); "
                       "pass --overwrite to start over or use another --out")
    check.close()
    if check.count or resumed_bad:
        where = f"continuing at line {first_todo[0]}" if first_todo is not None else "nothing left to do"
        _log(f"resuming {paths.out}: {check.count} scored and {resumed_bad} bad samples already done; {where}")
    return check.count


def _score_rest(run: _Run, data_f, first_todo: tuple[int, bytes | OverlongLine], done_errors: set[int],
                max_line: int) -> int:
    """Score from the first line not done to the end of the input (the last chunk is left to flush).
    Returns the number of lines passed because the errors file already holds them."""
    resumed_bad = 0
    run.add_line(*first_todo)
    for lineno, raw in enumerate(bounded_lines(data_f, max_line), first_todo[0] + 1):
        if _blank(raw):
            run.skip_line()
        elif lineno in done_errors:  # recorded by the interrupted chunk before its scores
            resumed_bad += 1
            run.skip_line()
        else:
            run.add_line(lineno, raw)
    return resumed_bad


def _summary(state: _State, paths: _Paths, seconds: float, load_s: float) -> str:
    """The closing report: this run's counts and rate, the earlier runs' counts, where the results are."""
    run, resumed_scored, resumed_bad = state.run, state.resumed_scored, state.resumed_bad
    processed = run.scored + run.bad
    total_bad = run.bad + resumed_bad
    rate = processed / seconds if seconds > 0 else 0.0
    summary = (f"done: {run.scored} scored, {run.bad} bad in {seconds:.1f} s ({rate:.1f} samples/s; "
               f"model load {load_s:.1f} s)")
    if resumed_scored or resumed_bad:
        summary += f"; {resumed_scored} scored and {resumed_bad} bad earlier"
    summary += f"\n  scores: {paths.out}"
    if total_bad:
        summary += f"\n  bad samples ({total_bad}, by input line): {paths.errors}"
    return summary
