"""mrrm.data: rankings are validated as integers 1..N wherever preference data is read (training,
evaluation), so a huge or out-of-range rank is a per-sample error, never a crash later."""
import json

import pytest

from mrrm.data.records import check_rankings
from mrrm.model.api import build_default_model
from mrrm.train import recipe as train


@pytest.mark.parametrize("rankings,reason", [
    ([1, 2], None), ([2, 1, 1], None), ([1, 3, 2], None),
    ([1, 2**63], "rankings must be integers 1..2"), ([10**30, 1], "rankings must be integers 1..2"),
    ([0, 1], "rankings must be integers 1..2"), ([1, 3], "rankings must be integers 1..2"),
    ([1, 1], "all responses tied"), ([1, True], "must be a list of integers"), ([1.0, 2], "must be a list of integers"),
    ([1], "1 rankings for 2 responses"), (None, "missing 'rankings'"),
])
def test_check_rankings(rankings, reason):
    got = check_rankings({"responses": ["a", "b"] + (["c"] if rankings is not None and len(rankings) == 3 else []),
                          "rankings": rankings})
    assert got is None if reason is None else reason in got, got


def test_training_data_with_a_huge_rank_is_a_bad_sample(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Name a colour.", "responses": ["red", "blue"], "rankings": [1, 2], "id": "ok"},
            {"prompt": "Name a colour.", "responses": ["red", "blue"], "rankings": [1, 2**63], "id": "huge"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_file, bad = train.prepare(build_default_model(), [str(path)], None, skip_bad=True, log=lambda *a: None)
    assert len(per_file[0]) == 1 and len(bad) == 1
    assert "rankings must be integers 1..2" in str(bad[0]) and "huge" in str(bad[0])


def test_jsonl_reader_reports_bad_lines_by_line_and_never_holds_a_long_one(tmp_path):
    """mrrm.data.iter_jsonl (training, mrrm.eval and mrrm.prefgraph read JSONL through it): a line nested
    too deeply raised RecursionError, and one line of bad UTF-8 failed the whole file; a line over
    max_line_bytes is passed over in blocks. Each is now an error of its line, the others are read."""
    from mrrm.data.records import iter_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": 1}\n' + b"[" * 4000 + b"\n" + b'{"id": "\xff\xfe"}\n'
                     + b'{"id": "' + b"x" * 5000 + b'"}\n' + b'{"id": 5}\n')
    got = list(iter_jsonl(str(path), max_line_bytes=4096))
    assert [(where, rec) for where, rec, _ in got] == [("data.jsonl:1", {"id": 1}), ("data.jsonl:2", None),
                                                       ("data.jsonl:3", None), ("data.jsonl:4", None),
                                                       ("data.jsonl:5", {"id": 5})]
    errors = [err for _, _, err in got]
    assert "nested too deeply" in errors[1] and "not UTF-8" in errors[2]
    assert "the line is 5010 bytes, over the limit of 4096 bytes per line" in errors[3]
