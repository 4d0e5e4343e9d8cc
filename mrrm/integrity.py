"""What mrrm trusts in the files it reads back: checksum manifests, and torch files without pickled code.

Checksum manifests (`checksums.sha256`, the format `sha256sum` writes and `sha256sum -c` checks: one
``<hex digest>  <path relative to the directory>`` line per file). One implementation for everything
mrrm saves and reads back: `RewardModel.save_pretrained` (both layouts) writes one over the model's
files and `mrrm.load(..., verify=True)` checks it; every training checkpoint (`mrrm.train`) has one over
all its files (state.pt and DeepSpeed's partition files) and a resume checks it. A manifest guards
against damage (a flipped byte, a torn copy, a file swapped for another); it is no signature: whoever
can write the files can rewrite it, which is why nothing mrrm reads may run code either:

torch files are read with `load_torch_file`: `torch.load(weights_only=True)`, PyTorch's restricted
unpickler, which builds tensors, containers and plain values only, plus the classes a caller names in
`allowed` (DeepSpeed's partition files hold three). A pickle that would call anything else (the way a
crafted checkpoint runs code) is refused before it runs, naming the file.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re

from mrrm.errors import ChecksumError, NoManifest, UnsafeFileError

MANIFEST = "checksums.sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_BLOCK = 8 << 20


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes (hex), read in 8 MiB blocks."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_all(root: str, rels: list[str]) -> dict[str, str]:
    """rel -> digest, files hashed in parallel (hashlib releases the GIL on large buffers)."""
    if len(rels) <= 1:
        return {r: sha256_file(os.path.join(root, r)) for r in rels}
    workers = min(len(rels), os.cpu_count() or 1, 8)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = pool.map(lambda r: sha256_file(os.path.join(root, r)), rels)
        return dict(zip(rels, digests))


def _files_under(root: str, skip=()) -> list[str]:
    """Every regular file under root (symlinks to files included, as a Hub snapshot holds them), as
    sorted relative paths with "/" separators. Hidden files and folders (".git", ".gitattributes",
    ".cache/huggingface" of a `hf download --local-dir`) are no part of a model or checkpoint: no loader
    reads them, and they are neither listed nor checked."""
    out, seen = [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # a linked folder is read by loaders too
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:  # (a link back up would loop)
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel in skip or not os.path.isfile(full):
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(root: str, *, name: str = MANIFEST) -> str:
    """Hash every file under `root` (but the manifest) into `root/name`, written atomically and
    fsynced. Returns the manifest's path."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a directory; a checksum manifest covers a directory's files")
    rels = _files_under(root, skip=(name, name + ".tmp"))
    for rel in rels:
        if "\n" in rel or "\\" in rel:
            raise ValueError(f"{os.path.join(root, rel)}: a file name with a newline or backslash cannot be "
                             f"listed in {name}; rename it")
    return _write(root, name, _hash_all(root, rels))


def update_manifest(root: str, rels, *, name: str = MANIFEST) -> str:
    """Rehash the files `rels` (relative to root; they may be new) in an existing manifest, keeping the
    other entries: for a file rewritten after the directory was saved."""
    entries = read_manifest(root, name=name)
    entries.update(_hash_all(root, [r.replace(os.sep, "/") for r in rels]))
    return _write(root, name, entries)


def _write(root: str, name: str, entries: dict[str, str]) -> str:
    path = os.path.join(root, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(f"{digest}  {rel}\n" for rel, digest in sorted(entries.items()))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(root: str, *, name: str = MANIFEST) -> dict[str, str]:
    """{relative path: hex digest} of root/name. NoManifest when there is none; ChecksumError naming
    the line for a malformed one (or one naming a path outside root)."""
    path = os.path.join(root, name)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise NoManifest(f"{root}: no {name} (no checksums to verify the files against)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChecksumError(f"{path}: cannot be read ({e})") from None
    entries = {}
    for i, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None:
            raise ChecksumError(f"{path}:{i}: not a sha256sum line (<64 hex digits>  <file>): {line[:80]!r}")
        rel = m.group(2)
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or "\\" in rel:
            raise ChecksumError(f"{path}:{i}: {rel!r} is not a plain path inside {root}")
        entries[rel] = m.group(1)
    return entries


def verify_manifest(root: str, *, name: str = MANIFEST, allow_unlisted=()) -> list[str]:
    """Check every file under `root` against root/name: each listed file exists and matches, and
    every file present is listed (but those in `allow_unlisted`, which nothing mrrm loads reads).
    Returns the files checked. Raises NoManifest without a manifest, ChecksumError naming the first
    file (of a sorted walk) that fails."""
    root = os.fspath(root)
    entries = read_manifest(root, name=name)
    present = _files_under(root, skip=(name,))
    unlisted = [r for r in present if r not in entries and r not in allow_unlisted]
    if unlisted:
        raise ChecksumError(f"{os.path.join(root, unlisted[0])}: not listed in {os.path.join(root, name)}"
                            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                            + ": a file added after the directory was saved")
    missing = [r for r in sorted(entries) if not os.path.isfile(os.path.join(root, r))]
    if missing:
        raise ChecksumError(f"{os.path.join(root, missing[0])}: listed in {os.path.join(root, name)} but missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    digests = _hash_all(root, sorted(entries))
    bad = [r for r in sorted(entries) if digests[r] != entries[r]]
    if bad:
        raise ChecksumError(f"{os.path.join(root, bad[0])}: does not match its SHA-256 in {os.path.join(root, name)}"
                            + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else "")
                            + ": the file is damaged or was changed after it was saved")
    return sorted(entries)


def load_torch_file(path: str, *, map_location="cpu", allowed=()):
    """torch.load(path) with PyTorch's restricted unpickler (weights_only=True): tensors, containers,
    numbers, strings and the classes in `allowed`, nothing else. A file holding other references
    (code a crafted pickle would run) raises UnsafeFileError naming the file and the reference,
    before any of it runs; a damaged or foreign file raises ValueError naming it."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|[Uu]nsupported class (\S+)", str(e))
        what = found.group(0) if found else str(e).strip().splitlines()[0][:200]
        raise UnsafeFileError(f"{path}: refused: it holds more than tensors and plain values ({what}); a "
                              "checkpoint never does, and loading it could run code. Nothing from it was run. "
                              "Use a checkpoint you trust") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, empty, not a torch file: name it
        raise ValueError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {str(e)[:200]})") from None
