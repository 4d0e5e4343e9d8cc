"""Preference data in the published layouts -> validated sample dicts.

Files: JSONL (one sample per line), JSON (a list, or a dict wrapping lists under keys such as
`ranking_data` or `pair_data`), parquet (through pyarrow/datasets when installed). A sample is
{"prompt", "responses": [...], "rankings": [1 = best, ties allowed], "image"? , "video"?, "id"?};
pairwise records {"prompt", "chosen", "rejected"} become responses [chosen, rejected] with rankings
[1, 2]. Every problem is reported with the file, the line (JSONL) or index, and the reason.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from mrrm._io import DEFAULT_MAX_LINE_BYTES, OverlongLine, bounded_lines

WRAPPER_KEYS = ("ranking_data", "pair_data", "data", "samples")


@dataclass
class BadRecord:
    where: str   # "file.jsonl:12" or "file.json[3]"
    reason: str
    sample_id: Any = None

    def __str__(self):
        return f"{self.where}" + (f" (id={self.sample_id!r})" if self.sample_id is not None else "") + f": {self.reason}"


def normalize(record: dict) -> dict:
    """Map the pairwise form onto the ranking schema; leave ranking samples as they are."""
    if "responses" not in record and "chosen" in record and "rejected" in record:
        out = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
        out["responses"] = [record["chosen"], record["rejected"]]
        out["rankings"] = [1, 2]
        return out
    return record


def check_rankings(sample: dict) -> str | None:
    """The reason the sample's rankings are unusable for training, or None when they are fine."""
    responses, rankings = sample.get("responses"), sample.get("rankings")
    if rankings is None:
        return "missing 'rankings' (1 = best, one per response)"
    if not isinstance(rankings, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool)
                                                          for r in rankings):
        return f"'rankings' must be a list of integers, got {rankings!r}"
    if not isinstance(responses, (list, tuple)) or len(rankings) != len(responses):
        n = len(responses) if isinstance(responses, (list, tuple)) else "no"
        return f"{len(rankings)} rankings for {n} responses"
    if any(r < 1 or r > len(rankings) for r in rankings):
        shown = [r if abs(r) < 10**6 else f"{r:.3g}" for r in rankings]
        return f"rankings must be integers 1..{len(rankings)} (1 = best, one per response), got {shown}"
    if len(set(rankings)) == 1 and len(rankings) > 1:
        return "all responses tied: nothing to learn from this sample"
    return None


def iter_jsonl(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where "file:line", object or None, error or None) for every non-blank line of a JSONL file;
    a line that is not valid JSON (or not UTF-8, or nested too deeply), not a JSON object, or longer
    than `max_line_bytes` (passed over without being held: mrrm._io.bounded_lines) is an error naming
    its line."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        for lineno, line in enumerate(bounded_lines(f, max_line_bytes), 1):
            where = f"{name}:{lineno}"
            if isinstance(line, OverlongLine):
                yield where, None, line.reason()
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            except UnicodeDecodeError as e:
                yield where, None, f"invalid JSON (not UTF-8 text: {e.reason} at byte {e.start})"
                continue
            except RecursionError:
                yield where, None, "invalid JSON (nested too deeply to parse)"
                continue
            if not isinstance(rec, dict):
                yield where, None, f"a record must be a JSON object, got {type(rec).__name__}"
                continue
            yield where, rec, None


def iter_records(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, record or None, parse error or None) for every record of a local file (JSONL lines over
    `max_line_bytes` are errors, passed over without being held)."""
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        for where, rec, err in iter_jsonl(path, max_line_bytes):
            yield where, (normalize(rec) if err is None else None), err
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                yield f"{name}", None, f"invalid JSON ({e.msg} at line {e.lineno})"
                return
            except RecursionError:
                yield f"{name}", None, "invalid JSON (nested too deeply to parse)"
                return
        if isinstance(obj, dict):
            key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), list)), None)
            if key is None:
                yield name, None, f"a JSON object must wrap the samples under one of {WRAPPER_KEYS}"
                return
            obj = obj[key]
        for i, rec in enumerate(obj):
            where = f"{name}[{i}]"
            if isinstance(rec, dict):
                yield where, normalize(rec), None
            else:
                yield where, None, f"a record must be a JSON object, got {type(rec).__name__}"
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq  # installed with the `model` extra (and by `datasets`)

        try:
            table = pq.read_table(path)
        except Exception as e:  # ArrowInvalid / OSError: a truncated or foreign file
            yield name, None, f"unreadable parquet file ({type(e).__name__}: {e})"
            return
        for i, rec in enumerate(table.to_pylist()):
            yield f"{name}[{i}]", normalize(rec), None
    elif not os.path.exists(path) and "/" in path and not path.startswith((".", "/")):
        # a Hugging Face dataset id ("org/name" or "org/name:split"), where the user has network
        try:
            import datasets
        except ImportError as e:
            raise ValueError(f"{path}: not a local file; loading a hub dataset needs `pip install datasets`") from e
        name_, _, split = path.partition(":")
        for i, rec in enumerate(datasets.load_dataset(name_, split=split or "train")):
            yield f"{name_}[{i}]", normalize(dict(rec)), None
    else:
        raise ValueError(f"{path}: unknown data format (expected .jsonl, .json, .parquet or a hub dataset id)")


def load_records(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
                 ) -> tuple[list[dict], list[str], list[BadRecord]]:
    """All records of a file, their locations, and the records that could not even be parsed."""
    records, wheres, bad = [], [], []
    for where, rec, err in iter_records(path, max_line_bytes):
        if err is not None:
            bad.append(BadRecord(where, err))
        else:
            records.append(rec)
            wheres.append(where)
    return records, wheres, bad
