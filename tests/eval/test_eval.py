"""mrrm.eval: every benchmark read from fixture files in its published field layout (parquet with image
bytes, JSON, JSONL, a small mp4), scored by a scorer with known scores, metrics checked against values
computed by hand; malformed rows reported by id; protocols, order sensitivity, resume; one end-to-end
run with the built-in tiny model."""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_fixtures import write_mp4
from PIL import Image

from mrrm.data import media
from mrrm.data.encoding import BatchError, SampleError
from mrrm.errors import DataError
from mrrm.eval import benchmarks as mev

SCORE = re.compile(r"\[s=(-?[0-9.]+)\]")


class KnownScorer:
    """mrrm.score's contract with known scores: a response "... [s=0.7]" scores 0.7, plus `first_bonus`
    for the response in the first position. Media are decoded with mrrm.data.media, and unreadable ones are
    rejected with a BatchError naming the sample, as the model does."""

    def __init__(self, first_bonus=0.0, table=None):
        self.first_bonus, self.table = first_bonus, table or {}
        self.calls = []   # one list of (id, responses) per call

    def __call__(self, batch):
        errors = []
        for i, s in enumerate(batch):
            try:
                for im in ([s["image"]] if "image" in s else []) + list(s.get("images", [])):
                    media.load_image(im)
                if "video" in s:
                    media.load_video(s["video"])
            except media.MediaError as e:
                errors.append(SampleError(i, str(e), s.get("id")))
        if errors:
            raise BatchError(errors)
        self.calls.append([(s["id"], tuple(s["responses"])) for s in batch])
        out = []
        for s in batch:
            key = tuple(s["responses"])
            if key in self.table:
                out.append(list(self.table[key]))
                continue
            out.append([float(SCORE.search(r).group(1)) + (self.first_bonus if p == 0 else 0.0)
                        for p, r in enumerate(s["responses"])])
        return out

    @property
    def samples(self):
        return [x for call in self.calls for x in call]


def png_bytes(colour=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def r(text, s):
    return f"{text} [s={s}]"


def run(bench, path, tmp_path, scorer=None, **kw):
    kw.setdefault("progress", False)
    return mev.run(bench, str(path), scorer if scorer is not None else KnownScorer(), out=str(tmp_path / "out"), **kw)


def skipped_ids(result):
    return {row["id"]: row["reason"] for row in result["skipped_rows"]}


# -- VL-RewardBench: parquet with image bytes ---------------------------------------------------------
# Categories by hand from the official cal.py::get_dataset_from_id (the id's prefix before the first "_"
# or "-", case-sensitive; query_source is never read): RLAIF, RLHF, hallucination -> hallucination;
# mathverse, mmmu -> reasoning; wildvision and anything else -> general.
def write_vlrb(path: Path):
    img = {"bytes": png_bytes(), "path": "a.png"}
    rows = [
        # id, query_source, responses, human_ranking   (0 = preferred)
        ("wildvision-battle_1", "wildvision-battle", [r("good", 0.9), r("bad", 0.1)], [0, 1], img),  # general ok
        ("hallucination_pair_2", None, [r("bad", 0.2), r("good", 0.6)], [1, 0], img),  # POVID, no source: halluc. ok
        ("RLAIF-V-Dataset_3", "RLAIF-V", [r("good", 0.3), r("bad", 0.4)], [0, 1], img),     # hallucination wrong
        ("mathverse_4", "mathverse", [r("bad", 0.0), r("good", 0.5)], [1, 0], img),        # reasoning ok
        ("RLHF-V-Dataset_5", "rlhf-v", [r("x", 0.5), r("y", 0.5)], [0, 1], img),          # halluc., tied: wrong
        ("mystery_10", "some-new-source", [r("good", 0.7), r("bad", 0.2)], [0, 1], img),  # unknown: general ok
        ("bad_rank", "povid", [r("a", 0.1), r("b", 0.2)], [0, 2], img),                      # label out of range
        ("tie_rank", "povid", [r("a", 0.1), r("b", 0.2)], [1, 1], img),                      # tied human label
        ("bad_img", "wildvision", [r("a", 0.9), r("b", 0.2)], [0, 1],
         {"bytes": b"not an image at all", "path": "x.png"}),                               # unreadable image
    ]
    # a tenth row lacks its query
    table = pa.table({
        "id": [x[0] for x in rows] + ["no_query"],
        "query": ["What is shown?"] * len(rows) + [None],
        "response": [x[2] for x in rows] + [[r("a", 0.1), r("b", 0.2)]],
        "image": [x[4] for x in rows] + [img],
        "human_ranking": [x[3] for x in rows] + [[0, 1]],
        "query_source": [x[1] for x in rows] + ["povid"],
    })
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(table, path)


def test_vl_rewardbench_parquet(tmp_path):
    path = tmp_path / "test-00000-of-00001.parquet"
    write_vlrb(path)
    res = run("vl-rewardbench", path, tmp_path)
    # evaluated: 6 rows; correct: wildvision-battle_1, hallucination_pair_2, mathverse_4, mystery_10
    assert res["rows"] == 10 and res["evaluated"] == 6 and res["skipped"] == 4
    assert res["metrics"]["accuracy"] == pytest.approx(4 / 6)
    cats = res["categories"]
    assert cats["general"] == {"n": 2, "accuracy": 1.0}                           # wildvision + unknown prefix
    assert cats["hallucination"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}   # POVID ok, RLAIF wrong, tie wrong
    assert cats["reasoning"] == {"n": 1, "accuracy": 1.0}
    assert res["metrics"]["macro_accuracy"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    # both numbers are printed by the official cal.py ("Overall Accuracy", "Macro Average Acc")
    assert res["official_metrics"] == ["accuracy", "macro_accuracy"] and res["mrrm_additions"] == []
    assert res["pair_order"] == "published"
    bad = skipped_ids(res)
    assert "human_ranking" in bad["bad_rank"] and "tied human label" in bad["tie_rank"]
    assert "missing field 'query'" in bad["no_query"]
    assert "bad_img" in bad and "image" in bad["bad_img"].lower()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped rows (4)" in report and "bad_img" in report and "| hallucination | 3 |" in report
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(res["metrics"]))
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds] == [True, True, False, True, False, True]
    assert "| accuracy | 0.6667 | official script |" in report


@pytest.mark.parametrize("sample_id, category", [
    ("RLAIF-V-Dataset_12", "hallucination"), ("RLHF-V-Dataset_3", "hallucination"),
    ("hallucination_pair_7", "hallucination"), ("povid_1", "general"),       # no "povid" prefix in the official map
    ("mathverse_9", "reasoning"), ("mmmu_pro_4", "reasoning"), ("MathVerse_2", "general"),  # case-sensitive
    ("wildvision-battle_5", "general"), ("vlfeedback_1", "general"), ("anything", "general"), ("RLHF", "hallucination"),
])
def test_vl_rewardbench_category_is_the_official_id_prefix(sample_id, category):
    assert mev.vlrb_category(sample_id) == category


def test_vl_rewardbench_official_per_item_order_is_seeded(tmp_path):
    path = tmp_path / "test-00000-of-00001.parquet"
    write_vlrb(path)
    published = run("vl-rewardbench", path, tmp_path / "a")
    scorer = KnownScorer()
    shuffled = run("vl-rewardbench", path, tmp_path / "b", scorer=scorer, pair_order="shuffled", seed=1)
    # scores follow the responses, so the metrics do not move; which rows were swapped is the seeded rule
    assert shuffled["metrics"] == published["metrics"] and shuffled["pair_order"] == "shuffled"
    table = pq.read_table(path).to_pylist()
    shown = dict(scorer.samples)
    flips = []
    for i, row in enumerate(table[:6]):
        swapped = mev._seeded_flip(f"{row['id']}@{path.name}[{i}]", 1)
        assert shown[row["id"]] == tuple(row["response"][::-1] if swapped else row["response"])
        flips.append(swapped)
    assert any(flips) and not all(flips)
    again = KnownScorer()
    run("vl-rewardbench", path, tmp_path / "c", scorer=again, pair_order="shuffled", seed=1)
    assert dict(again.samples) == shown
    with pytest.raises(ValueError, match="pair_order"):
        run("vl-rewardbench", path, tmp_path / "d", pair_order="random")
    # a cache of the published order is not reused for the shuffled one
    with pytest.raises(ValueError, match="pair_order"):
        run("vl-rewardbench", path, tmp_path / "a", pair_order="shuffled")


# -- Multimodal RewardBench: a JSON list with image paths --------------------------------------------
def test_multimodal_rewardbench_json(tmp_path):
    (tmp_path / "images" / "nocaps").mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 90, 200)).save(tmp_path / "images" / "nocaps" / "1.jpg")
    im = "images/nocaps/1.jpg"
    rows = [
        {"ID": "nocaps_1", "Text": "Caption it.", "Image": im, "Output1": r("a", 0.8), "Output2": r("b", 0.2),
         "Better": "Output1", "Category": "open_generation/correctness_task"},                     # correct
        {"ID": "nocaps_2", "Text": "Caption it.", "Image": im, "Output1": r("a", 0.8), "Output2": r("b", 0.9),
         "Better": "Output1", "Category": "open_generation/correctness_task"},                     # wrong
        {"ID": "pairs_3", "Text": "Who?", "Image": im, "Output1": r("a", 0.1), "Output2": r("b", 0.3),
         "Better": "Output2", "Category": "safety"},                                              # bias, correct
        {"ID": "hateful_4", "Text": "Is it ok?", "Image": im, "Output1": r("a", 0.7), "Output2": r("b", 0.3),
         "Better": "Output2", "Category": "safety"},                                              # toxicity, wrong
        {"ID": "mathvista_5", "Text": "Solve.", "Image": im, "Output1": r("a", 0.1), "Output2": r("b", 0.0),
         "Better": "Output1", "Category": "reasoning"},                                           # math, correct
        {"ID": "emma_6", "Text": "Code?", "Image": im, "Output1": r("a", 0.1), "Output2": r("b", 0.9),
         "Better": "Output2", "Category": "reasoning"},                                           # coding, correct
        {"ID": "bad_better", "Text": "x", "Image": im, "Output1": r("a", 0.1), "Output2": r("b", 0.9),
         "Better": "Output3", "Category": "vqa"},
        {"ID": "no_cat", "Text": "x", "Image": im, "Output1": r("a", 0.1), "Output2": r("b", 0.9),
         "Better": "Output2"},
        {"ID": "missing_file", "Text": "x", "Image": "images/nocaps/404.jpg", "Output1": r("a", 0.1),
         "Output2": r("b", 0.9), "Better": "Output2", "Category": "vqa"},
    ]
    path = tmp_path / "all_data.json"
    path.write_text(json.dumps(rows))
    res = run("multimodal-rewardbench", path, tmp_path)
    assert res["evaluated"] == 6 and res["skipped"] == 3
    assert res["metrics"]["accuracy"] == pytest.approx(4 / 6)
    assert {c: d["accuracy"] for c, d in res["categories"].items()} == {
        "open_generation/correctness_task": 0.5, "reasoning/coding": 1.0, "reasoning/math": 1.0,
        "safety/bias": 1.0, "safety/toxicity": 0.0}
    bad = skipped_ids(res)
    assert "'Better' must be 'Output1' or 'Output2'" in bad["bad_better"]
    assert "missing field 'Category'" in bad["no_cat"]
    assert "not found" in bad["missing_file"]
    # 2_get_accuracy.py prints accuracy overall and per category; the macro mean is mrrm's
    assert res["official_metrics"] == ["accuracy"] and res["mrrm_additions"] == ["macro_accuracy"]


def test_multimodal_rewardbench_release_file_names_the_file_to_pass(tmp_path):
    Image.new("RGB", (20, 20), (0, 90, 200)).save(tmp_path / "i.jpg")
    base = {"Image": "i.jpg", "Output1": r("a", 0.8), "Output2": r("b", 0.2), "Better": "Output1",
            "Category": "vqa"}
    rows = [{**base, "ID": "mathvista_3", "Text": ""},          # filled in by 0_download_data.py's setup_mathvista
            {**base, "ID": "SEED-Bench_9", "Text": "  "},
            {**base, "ID": "vlfeedback_1", "Text": ""},         # not a source the download script fills: malformed
            {**base, "ID": "pairs_4", "Text": "Who?", "Category": "safety"}]
    path = tmp_path / "all_data_release.json"
    path.write_text(json.dumps(rows))
    res = run("multimodal-rewardbench", path, tmp_path)
    assert res["evaluated"] == 1 and res["skipped"] == 3
    bad = skipped_ids(res)
    for sid in ("mathvista_3", "SEED-Bench_9"):
        assert "all_data_release.json" in bad[sid] and "0_download_data.py" in bad[sid] and "all_data.json" in bad[sid]
    assert "must be a non-empty string" in bad["vlfeedback_1"]




# -- MM-RLHF-RewardBench: the official layout (JSONL, image OR a video given as a folder of frames) ------
def write_frames(folder: Path, n: int, size=(16, 12), fmt="png", name="frame_{:04d}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20 % 256, 100, 200)).save(folder / f"{name.format(i + 1)}.{fmt}")
    return folder


def test_mm_rlhf_rewardbench_official_categories_and_acc_plus(tmp_path):
    for sub in ("mcq", "long", "short", "safety", "other", "long_short"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / sub / "a.png")
    write_frames(tmp_path / "video" / "v5", 5)
    (tmp_path / "video" / "v8").mkdir()
    (tmp_path / "video" / "v8" / "notes.txt").write_text("no frames here")

    def row(gid, media, c, rj, **kw):
        key = "video" if media.startswith("video/") else "image"
        return {"id": gid, "prompt": "p", key: media, "chosen": r(f"c{gid}", c), "rejected": r(f"r{gid}", rj),
                "chosen_reason": "fine", "rejected_reason": "worse", **kw}
    rows = [
        row("g1", "mcq/a.png", 0.9, 0.1), row("g1", "mcq/a.png", 0.8, 0.3),            # mcq: ok, ok
        row("g2", "long/a.png", 0.9, 0.1), row("g2", "long/a.png", 0.2, 0.3),          # long: ok, wrong
        row("g3", "short/a.png", 0.5, 0.5),                                            # short: tied -> wrong
        row("g4", "safety/a.png", 0.6, 0.4),                                           # safety: ok
        row("g5", "video/v5", 0.6, 0.4), row("g5", "video/v5", 0.7, 0.1),              # video (frame folder): ok, ok
        row("g6", "other/a.png", 0.6, 0.4),                                            # no keyword: ok
        row("g7", "long_short/a.png", 0.6, 0.4),                                       # long AND short: long, ok
        row("g8", "video/v8", 0.6, 0.4),                                               # a folder without frames
        row("g9", "mcq/a.png", 0.6, 0.4), {"id": "g9", "prompt": "p", "image": "mcq/a.png", "chosen": r("c", 0.6)},
    ]
    path = tmp_path / "mm_reward_bench.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows) + "{broken json\n")
    scorer = KnownScorer()
    res = run("mm-rlhf-rewardbench", path, tmp_path, scorer=scorer)
    assert res["evaluated"] == 11 and res["skipped"] == 3
    # by hand from cal_performance_mmreweard_bench.py: correct = chosen's reward > rejected's
    assert res["metrics"]["accuracy"] == pytest.approx(9 / 11)
    cats = res["categories"]
    assert {c: (d["n"], d["accuracy"]) for c, d in cats.items()} == {
        "mcq": (3, 1.0), "long": (3, pytest.approx(2 / 3)), "short": (1, 0.0), "safety": (1, 1.0),
        "video": (2, 1.0), "(no keyword)": (1, 1.0)}
    # Acc+ over the ids with every pair evaluated: g1 g4 g5 g6 g7 of g1..g7; g8 and g9 lack a pair
    assert res["metrics"]["acc_plus"] == pytest.approx(5 / 7) and res["metrics"]["acc_plus_groups"] == 7
    assert res["metrics"]["acc_plus_groups_incomplete"] == 2
    # per keyword: numerator = all-correct ids whose FIRST keyword it is, denominator = ids having it
    assert {c: d["acc_plus"] for c, d in cats.items()} == {
        "mcq": 1.0, "long": 0.5, "short": 0.0, "safety": 1.0, "video": 1.0, "(no keyword)": None}
    assert res["official_metrics"] == ["accuracy", "acc_plus"]
    assert "macro_accuracy" in res["mrrm_additions"]
    bad = skipped_ids(res)
    assert "frame folder" in bad["g8"] and "v8" in bad["g8"] and "no frame images" in bad["g8"]
    assert "missing field 'rejected'" in bad["g9"] and "invalid JSON" in bad[None]
    # chosen/rejected are shown in a seeded order per row: both orders occur, and the seed changes them
    firsts = [resp[0] for _, resp in scorer.samples]
    assert any(f.startswith("c") for f in firsts) and any(f.startswith("r") for f in firsts)
    res2 = mev.run("mm-rlhf-rewardbench", str(path), KnownScorer(), progress=False, seed=1)
    assert res2["metrics"]["accuracy"] == res["metrics"]["accuracy"]  # an order-free scorer: same result
    published = KnownScorer()
    run("mm-rlhf-rewardbench", path, tmp_path / "pub", scorer=published, pair_order="published")
    assert all(resp[0].startswith("c") for _, resp in published.samples)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| acc_plus | 0.7143 | official script |" in report and "mrrm addition" in report
    assert "| long | 3 | 0.6667 | 0.5000 |" in report


def test_mm_rlhf_keywords_follow_the_official_order():
    assert mev.mmrlhf_keywords({"image": "data/long_short/x.png"}) == ("long", "short")
    assert mev.mmrlhf_keywords({"video": "bench/video/safety_clip"}) == ("safety", "video")
    assert mev.mmrlhf_keywords({"image": "x.png"}) == ()
    with pytest.raises(ValueError, match="dict"):
        mev.mmrlhf_keywords(["mcq"])


# -- VideoRewardBench: JSONL with a real mp4 ---------------------------------------------------------
def test_videorewardbench_macro(tmp_path):
    write_mp4(tmp_path / "v.mp4")
    rows = [
        {"video": "v.mp4", "prompt": "What happens?", "chosen": r("c", 0.7), "rejected": r("r", 0.2),
         "dimension": "long-form perception"},                                                   # ok
        {"video": "v.mp4", "prompt": "What happens?", "chosen": r("c", 0.1), "rejected": r("r", 0.2),
         "dimension": "long-form perception"},                                                   # wrong
        {"video": "v.mp4", "prompt": "Is it safe?", "chosen": r("c", 0.5), "rejected": r("r", 0.2),
         "dimension": "safety"},                                                                 # ok
        {"prompt": "no video", "chosen": r("c", 0.5), "rejected": r("r", 0.2), "dimension": "safety"},
        {"video": "missing.mp4", "prompt": "x", "chosen": r("c", 0.5), "rejected": r("r", 0.2),
         "dimension": "safety"},
    ]
    path = tmp_path / "videorewardbench.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = run("videorewardbench", path, tmp_path)
    assert res["evaluated"] == 3 and res["skipped"] == 2
    assert res["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert res["metrics"]["macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    reasons = [row["reason"] for row in res["skipped_rows"]]
    assert any("missing field 'video'" in x for x in reasons) and any("missing.mp4" in x for x in reasons)


# -- MR2Bench: rankings, best-of-N, Kendall tau-b, pairwise accuracy ----------------------------------
MR2_ROWS = [
    {"id": "m1", "prompt": "Which colour?", "responses": [r("a", 0.9), r("b", 0.1), r("c", 0.5), r("d", 0.3)],
     "rankings": [1, 4, 2, 3], "category": "colour"},
    {"id": "m2", "prompt": "Which shape?", "responses": [r("a", 0.2), r("b", 0.8), r("c", 0.6), r("d", 0.4)],
     "rankings": [1, 2, 2, 4], "category": "shape"},
    {"id": "m3", "prompt": "x", "responses": [r("a", 0.2), r("b", 0.8)], "rankings": [0, 1], "category": "shape"},
    {"id": "m4", "prompt": "x", "responses": [r("a", 0.2), r("b", 0.8)], "rankings": [1, 2, 3], "category": "shape"},
]


def write_mr2_image(tmp_path) -> Path:
    Image.new("RGB", (16, 16), (200, 200, 0)).save(tmp_path / "img.png")
    rows = [{**row, "image": "img.png"} for row in MR2_ROWS]
    path = tmp_path / "mr2bench_image.json"
    path.write_text(json.dumps({"ranking_data": rows}))
    return path


def test_mr2bench_image_metrics_by_hand(tmp_path):
    res = run("mr2bench-image", write_mr2_image(tmp_path), tmp_path)
    assert res["evaluated"] == 2 and res["skipped"] == 2
    m = res["metrics"]
    # m1: order matches exactly (tau 1, pairs 5/5... all 6 pairs ordered right); m2: top is rank 2 -> wrong;
    # tau-b of m2 by hand: C=2, D=3, ties in human ranks 1 -> (2-3)/sqrt(5*6); pairs 2/5
    tau2 = -1 / math.sqrt(30)
    assert m["best_of_n"] == 0.5
    assert m["kendall_tau"] == pytest.approx((1 + tau2) / 2)
    assert m["pairwise_accuracy"] == pytest.approx((1 + 0.4) / 2)
    assert res["categories"]["shape"]["kendall_tau"] == pytest.approx(tau2)
    bad = skipped_ids(res)
    assert "rankings must be integers 1..2" in bad["m3"] and "3 rankings for 2 responses" in bad["m4"]


def test_kendall_tau_b_hand_computed():
    # 2 concordant, 1 discordant pair: (2 - 1) / 3
    assert mev.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # a tie in x: C = 2, D = 0, one pair tied in x only -> 2 / sqrt((2 + 1) * 2)
    assert mev.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert mev.kendall_tau_b([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert mev.kendall_tau_b([1, 1, 1], [1, 2, 3]) is None  # constant: no tau
    with pytest.raises(ValueError, match="length"):
        mev.kendall_tau_b([1, 2], [1, 2, 3])


def test_mr2bench_video_jsonl(tmp_path):
    write_mp4(tmp_path / "v.mp4")
    rows = [{"id": "v1", "prompt": "Which way does it move?", "video": "v.mp4",
             "responses": [r("up", 0.1), r("down", 0.7), r("left", 0.3)], "rankings": [3, 1, 2]},
            {"id": "v2", "prompt": "x", "responses": [r("up", 0.1), r("down", 0.7)], "rankings": [1, 2]}]
    path = tmp_path / "mr2bench_video.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = run("mr2bench-video", path, tmp_path)
    assert res["evaluated"] == 1 and skipped_ids(res) == {"v2": "missing field 'video'"}
    assert res["metrics"]["best_of_n"] == 1.0 and res["metrics"]["kendall_tau"] == pytest.approx(1.0)


class RecordingScorer(KnownScorer):
    """KnownScorer that also keeps every sample dict it was given."""

    def __init__(self):
        super().__init__()
        self.given = []

    def __call__(self, batch):
        self.given.extend(batch)
        return super().__call__(batch)


def test_mr2bench_video_frame_folders_and_question_field(tmp_path):
    # the authors' layout: "question" instead of "prompt", a video given as a folder of frames
    write_frames(tmp_path / "clips" / "v1", 6, fmt="jpg")
    write_frames(tmp_path / "clips" / "v3", 3)
    whole = (tmp_path / "clips" / "v3" / "frame_0002.png").read_bytes()
    (tmp_path / "clips" / "v3" / "frame_0002.png").write_bytes(whole[:45])  # header kept, data cut short
    rows = [{"id": "v1", "question": "Which way does it move?", "video": "clips/v1", "sampling_interval": 2,
             "responses": [r("up", 0.1), r("down", 0.7), r("left", 0.3)], "rankings": [3, 1, 2], "task": "motion"},
            {"id": "v2", "prompt": "Which way?", "video": "clips/v1",
             "responses": [r("up", 0.8), r("down", 0.7)], "rankings": [2, 1], "task": "motion"},
            {"id": "v3", "question": "x", "video": "clips/v3", "responses": [r("a", 0.1), r("b", 0.7)],
             "rankings": [2, 1], "task": "motion"},
            {"id": "v4", "video": "clips/v1", "responses": [r("a", 0.1), r("b", 0.7)], "rankings": [2, 1]}]
    path = tmp_path / "mr2bench_video.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    scorer = RecordingScorer()
    res = run("mr2bench-video", path, tmp_path, scorer=scorer)
    assert res["evaluated"] == 2 and res["metrics"]["best_of_n"] == 0.5   # v1 right, v2 wrong
    assert res["categories"]["motion"]["n"] == 2
    bad = skipped_ids(res)
    assert "missing field 'prompt' (or 'question')" in bad["v4"]
    assert "frame_0002.png" in bad["v3"] and "v3" in bad["v3"] and "corrupt or truncated" in bad["v3"]
    v1 = next(x for x in scorer.given if x["id"] == "v1")
    assert v1["prompt"] == "Which way does it move?" and v1["sampling_interval"] == 2
    assert v1["video"] == str(tmp_path / "clips" / "v1")
    assert "sampling_interval" not in next(x for x in scorer.given if x["id"] == "v2")


# -- protocols ----------------------------------------------------------------------------------------
def test_pairwise_protocol_passes_and_tie_rule(tmp_path):
    # a cycle: A beats B by 1, B beats C by 1, C beats A by 2 -> one win each; margins A -1, B 0, C +1 -> C
    table = {("A", "B"): (1.0, 0.0), ("B", "C"): (1.0, 0.0), ("A", "C"): (0.0, 2.0),
             ("P", "Q"): (0.5, 0.5), ("P", "R"): (0.5, 0.5), ("Q", "R"): (0.5, 0.5)}
    rows = [{"id": "cyc", "prompt": "x", "image": "i.png", "responses": ["A", "B", "C"], "rankings": [2, 3, 1]},
            {"id": "flat", "prompt": "x", "image": "i.png", "responses": ["P", "Q", "R"], "rankings": [1, 2, 3]}]
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    scorer = KnownScorer(table=table)
    res = mev.run("mr2bench-image", str(path), scorer, protocol="pairwise", progress=False)
    # every pair is its own 2-response pass, i < j in the presented order
    assert sorted(resp for _, resp in scorer.samples) == sorted(table)
    # cyc: C has the best margin -> correct; flat: every key equal -> tied top -> wrong
    assert res["metrics"]["best_of_n"] == 0.5
    assert res["passes"]["needed"] == 6


def test_pairwise_vs_direct_with_position_bias(tmp_path):
    rows = [{"id": "b", "prompt": "x", "image": "i.png",
             "responses": [r("a", 0.2), r("b", 0.8), r("c", 0.6), r("d", 0.4)], "rankings": [4, 1, 2, 3]}]
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    # +0.7 to the first position: direct in the given order picks a (0.9 > 0.8): wrong
    direct = mev.run("mr2bench-image", str(path), KnownScorer(first_bonus=0.7), progress=False)
    assert direct["metrics"]["best_of_n"] == 0.0
    # pairwise, one order per pair: the earlier response of each pair gets +0.7: a beats b,c,d ->
    # wins a3 b2 c1 d0 -> a: wrong; with both orders per pair (permutations=2) the bias cancels -> b: right
    pw = mev.run("mr2bench-image", str(path), KnownScorer(first_bonus=0.7), protocol="pairwise", progress=False)
    assert pw["metrics"]["best_of_n"] == 0.0
    pw2 = mev.run("mr2bench-image", str(path), KnownScorer(first_bonus=0.7), protocol="pairwise",
                  permutations=2, progress=False)
    assert pw2["metrics"]["best_of_n"] == 1.0 and pw2["passes"]["needed"] == 12
    # direct with 4 cyclic orders: every response is first once: the bias cancels too
    d4 = mev.run("mr2bench-image", str(path), KnownScorer(first_bonus=0.7), permutations=4, progress=False)
    assert d4["metrics"]["best_of_n"] == 1.0 and d4["metrics"]["kendall_tau"] == pytest.approx(1.0)


def test_order_sensitivity_by_hand(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    rows = [{"ID": "A", "Text": "x", "Image": "i.png", "Output1": r("x", 0.5), "Output2": r("y", 0.7),
             "Better": "Output2", "Category": "c"},
            {"ID": "B", "Text": "x", "Image": "i.png", "Output1": r("x", 0.9), "Output2": r("y", 0.1),
             "Better": "Output1", "Category": "c"}]
    path = tmp_path / "all.json"
    path.write_text(json.dumps(rows))
    res = run("multimodal-rewardbench", path, tmp_path, scorer=KnownScorer(first_bonus=0.3), order_sensitivity=True)
    osr = res["order_sensitivity"]
    # A: original 0.8 vs 0.7 -> x (wrong); reversed: y 1.0 vs x 0.5 -> y (right): flips. B: x both times.
    assert list(osr["orders"]) == ["original", "reversed"]   # N=2: cyclic1 is the reversed order
    assert osr["orders"]["original"] == {"n": 2, "accuracy": 0.5, "flip_rate": 0.0}
    assert osr["orders"]["reversed"] == {"n": 2, "accuracy": 1.0, "flip_rate": 0.5}
    assert osr["flip_rate_any"] == 0.5 and osr["spread"] == 0.5
    assert res["metrics"]["accuracy"] == 0.5
    assert "Order sensitivity" in (tmp_path / "out" / "report.md").read_text()
    assert set(mev.order_variants(3)) == {"original", "reversed", "cyclic1", "cyclic2"}


# -- resume -------------------------------------------------------------------------------------------
class FailingScorer(KnownScorer):
    def __init__(self, fail_after):
        super().__init__()
        self.fail_after = fail_after

    def __call__(self, batch):
        if len(self.samples) + len(batch) > self.fail_after:
            raise RuntimeError("scorer died")
        return super().__call__(batch)


def test_interrupted_run_resumes_without_rescoring(tmp_path):
    path = write_mr2_image(tmp_path)
    rows = [{**MR2_ROWS[i % 2], "id": f"m{i}", "image": "img.png"} for i in range(7)]
    path.write_text(json.dumps({"ranking_data": rows}))
    with pytest.raises(RuntimeError, match="scorer died"):
        run("mr2bench-image", path, tmp_path, scorer=FailingScorer(fail_after=4), batch_size=2)
    cache = (tmp_path / "out" / "cache.jsonl").read_text().splitlines()
    assert len(cache) == 4   # two finished batches of two
    # a torn last line (a write cut short by a kill) is dropped and its pass redone
    with open(tmp_path / "out" / "cache.jsonl", "a") as f:
        f.write('{"key": "m9@x", "proto')
    resumed = FailingScorer(fail_after=10**9)   # the same scorer (its class names it in cache_meta.json)
    res = run("mr2bench-image", path, tmp_path, scorer=resumed, batch_size=2)
    assert [sid for sid, _ in resumed.samples] == ["m4", "m5", "m6"]
    assert res["passes"] == {"needed": 7, "scored_now": 3, "from_cache": 4, "cache_entries_at_start": 4}
    fresh = mev.run("mr2bench-image", str(path), KnownScorer(), progress=False)
    assert res["metrics"] == fresh["metrics"]
    # a third run scores nothing
    again = FailingScorer(fail_after=0)   # would raise if called at all
    run("mr2bench-image", path, tmp_path, scorer=again)
    assert again.calls == []
    # another benchmark, or another scorer, in the same directory is refused (the rows given a video too: a
    # file in no layout of the benchmark is refused before the directory is looked at)
    path.write_text(json.dumps({"ranking_data": [dict(row, video="clip.mp4") for row in rows]}))
    with pytest.raises(ValueError, match=r"cache of another run \(differs in \['benchmark'\]"):
        run("mr2bench-video", path, tmp_path, scorer=FailingScorer(fail_after=0))
    with pytest.raises(ValueError, match=r"differs in \['scorer'\]"):
        run("mr2bench-image", path, tmp_path, scorer=KnownScorer())


def test_validation_errors(tmp_path):
    path = write_mr2_image(tmp_path)
    with pytest.raises(ValueError, match="benchmark must be one of"):
        mev.run("rewardbench", str(path), KnownScorer())
    with pytest.raises(ValueError, match="protocol"):
        mev.run("mr2bench-image", str(path), KnownScorer(), protocol="listwise")
    with pytest.raises(TypeError, match="unknown option"):
        mev.run("mr2bench-image", str(path), KnownScorer(), permutation=2)
    with pytest.raises(ValueError, match="permutations"):
        mev.run("mr2bench-image", str(path), KnownScorer(), permutations=0)
    with pytest.raises(TypeError, match="scorer must be callable"):
        mev.run("mr2bench-image", str(path), scorer=3)

    def short(batch):
        return [[0.0] for _ in batch]
    with pytest.raises(RuntimeError, match="returned 1 scores"):
        mev.run("mr2bench-image", str(path), short, progress=False)
    res = mev.run("mr2bench-image", str(path), KnownScorer(), limit=1, progress=False)
    assert res["rows"] == 1 and res["evaluated"] == 1
    with pytest.raises(ValueError, match="media_budgets must be an mrrm.data.media.MediaBudgets"):
        mev.run("mr2bench-image", str(path), KnownScorer(), media_budgets={"image_pixels": 10})


def test_a_file_of_another_benchmarks_layout_is_an_error_naming_both(tmp_path, capsys):
    """A Multimodal RewardBench file evaluated as mr2bench-image reported "0 evaluated" and exited 0: now a
    DataError (exit 2) naming the fields expected, showing the first record and naming the benchmark whose
    layout it has; a run whose every row is skipped for other reasons exits 1 with its report written."""
    rows = [{"ID": f"nocaps_{i}", "Text": "Caption it.", "Image": "1.jpg", "Output1": r("a", 0.8),
             "Output2": r("b", 0.2), "Better": "Output1", "Category": "vqa"} for i in range(3)]
    path = tmp_path / "all_data.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="none of the 3 rows .* mr2bench-image layout") as e:
        mev.run("mr2bench-image", str(path), KnownScorer(), progress=False)
    assert "prompt (or question), responses, rankings, image" in str(e.value)
    assert "'ID': 'nocaps_0'" in str(e.value) and "pass --benchmark multimodal-rewardbench" in str(e.value)
    assert mev.main(["--benchmark", "mr2bench-image", "--data", str(path), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mrrm.eval: error: none of the 3 rows" in err and "multimodal-rewardbench" in err
    assert not (tmp_path / "o").exists()  # refused before the out directory is touched

    # every row skipped, but not for its layout (here: a missing image): metrics of nothing, exit 1
    mr2 = [{"id": f"m{i}", "prompt": "Which?", "image": "missing.png", "responses": ["a", "b"], "rankings": [1, 2]}
           for i in range(2)]
    data = tmp_path / "mr2.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in mr2))
    assert mev.main(["--benchmark", "mr2bench-image", "--data", str(data), "--out", str(tmp_path / "o2"),
                     "--device", "cpu", "--no-progress"]) == 1
    assert "nothing was evaluated: all 2 rows were skipped" in capsys.readouterr().err
    assert (tmp_path / "o2" / "report.md").exists()


def test_media_budgets_are_set_on_the_model_for_the_run(tmp_path):
    """media_budgets= (python -m mrrm.eval's --max-image-megapixels ...): a MediaBudgets on the default
    scorer's model's encoder for the run, given back afterwards (the cached model is shared)."""
    import mrrm

    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    rows = [{"id": f"e{i}", "prompt": "What colour is the square?", "image": "red.png",
             "responses": ["red", "green"], "rankings": [1, 2]} for i in range(2)]
    path = tmp_path / "mr2.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = mev.run("mr2bench-image", str(path), device="cpu", progress=False,
                  media_budgets=media.MediaBudgets(image_pixels=32 * 32 - 1))
    assert res["evaluated"] == 0 and len(res["skipped_rows"]) == 2
    assert all("(--max-image-megapixels" in r["reason"] for r in res["skipped_rows"])
    assert mrrm.load(device="cpu").encoder.media_budgets == media.DEFAULT_MEDIA_BUDGETS
    assert mev.run("mr2bench-image", str(path), device="cpu", progress=False)["evaluated"] == 2


# -- end to end with the built-in tiny model ----------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_tiny_model_cli(tmp_path, capsys):
    import mrrm

    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [{"id": f"e{i}", "prompt": "What colour is the square?", "image": "red.png",
             "responses": ["red", "green", "blue", "yellow"], "rankings": [1, 2, 3, 4]} for i in range(3)]
    rows.append({"id": "broken", "prompt": "x", "image": "broken.png", "responses": ["a", "b"], "rankings": [1, 2]})
    path = tmp_path / "mr2.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = tmp_path / "e2e"
    assert mev.main(["--benchmark", "mr2bench-image", "--data", str(path), "--out", str(out), "--device", "cpu",
                     "--order-sensitivity", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated"] == 3 and metrics["skipped"] == 1
    assert metrics["skipped_rows"][0]["id"] == "broken"
    assert metrics["scorer"] == "mrrm built-in default model"
    assert set(metrics["order_sensitivity"]["orders"]) == {"original", "reversed", "cyclic1", "cyclic2", "cyclic3"}
    # the cached scores are the model's own scores of those orders
    model = mrrm.load(device="cpu")
    sample = {"prompt": rows[0]["prompt"], "image": str(tmp_path / "red.png"), "responses": rows[0]["responses"]}
    expected = model.score(sample)[0]
    cache = [json.loads(x) for x in (out / "cache.jsonl").read_text().splitlines()]
    first = next(c for c in cache if c["key"].startswith("e0@") and c["order"] == [0, 1, 2, 3])
    assert first["scores"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for name in ("report.md", "report.png", "predictions.jsonl", "cache_meta.json"):
        assert (out / name).exists()
    assert "mr2bench-image" in capsys.readouterr().out


@pytest.mark.slow
def test_encoding_workers_give_the_same_cache_and_metrics(tmp_path):
    """workers=2 (the model's passes encoded ahead in two worker processes): the same cached scores,
    skipped rows with the encoder's reason, and metrics as encoding in process; a custom scorer with
    workers, or a negative count, is refused."""
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [{"id": f"e{i}", "prompt": f"What colour is square {i}?", "image": "red.png",
             "responses": ["red", "green", "blue"][: 2 + i % 2], "rankings": [1, 2, 3][: 2 + i % 2]} for i in range(7)]
    rows.insert(3, {"id": "broken", "prompt": "x", "image": "broken.png", "responses": ["a", "b"], "rankings": [1, 2]})
    path = tmp_path / "mr2.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        runs[workers] = mev.run("mr2bench-image", str(path), out=str(out), device="cpu", batch_size=3,
                                workers=workers, progress=False)
        runs[workers]["cache"] = [json.loads(x) for x in (out / "cache.jsonl").read_text().splitlines()]
    a, b = runs[0], runs[2]
    assert a["metrics"] == b["metrics"] and a["skipped_rows"] == b["skipped_rows"]
    assert [r["id"] for r in b["skipped_rows"]] == ["broken"] and "not an image" in b["skipped_rows"][0]["reason"]
    assert [(c["key"], c.get("error")) for c in a["cache"]] == [(c["key"], c.get("error")) for c in b["cache"]]
    for x, y in zip(a["cache"], b["cache"]):
        assert x.get("scores") == pytest.approx(y.get("scores"), abs=1e-6)
    with pytest.raises(ValueError, match="custom scorer"):
        mev.run("mr2bench-image", str(path), lambda batch: [[0.0] * len(s["responses"]) for s in batch], workers=2)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        mev.run("mr2bench-image", str(path), workers=-1)


@pytest.mark.slow
def test_python_m_entry_point_and_empty_run(tmp_path):
    import subprocess
    import sys

    path = write_mr2_image(tmp_path)
    out = tmp_path / "empty"
    proc = subprocess.run([sys.executable, "-m", "mrrm.eval", "--benchmark", "mr2bench-image", "--data", str(path),
                           "--limit", "0", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[2]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 0 and metrics["evaluated"] == 0 and metrics["metrics"]["best_of_n"] is None
    assert (out / "report.png").exists()
    bad = subprocess.run([sys.executable, "-m", "mrrm.eval", "--benchmark", "mr2bench-image", "--data",
                          str(tmp_path / "nope.csv"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown data format" in bad.stderr


def test_unwritable_out_dir_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "rankings": [1, 2], "image": "a.png"}) + "\n")
    assert mev.main(["--benchmark", "mr2bench-image", "--data", str(data), "--out", str(tmp_path / "afile" / "o"),
                     "--device", "cpu", "--no-progress"]) == 2
    assert "cannot write there" in capsys.readouterr().err


@pytest.mark.slow
def test_a_write_failing_mid_run_names_the_file_and_the_rerun_resumes(tmp_path):
    """The cache stops growing mid-write (a full disk; here RLIMIT_FSIZE, EFBIG): `python -m mrrm.eval`
    exits 1 with one line naming the file, and the rerun scores only what was not cached and reports
    the metrics of a run that never failed."""
    import subprocess
    import sys

    from faults import file_size_limit

    path = write_mr2_image(tmp_path)
    rows = [{**MR2_ROWS[i % 2], "id": f"m{i}", "image": "img.png"} for i in range(8)]
    path.write_text(json.dumps({"ranking_data": rows}))
    repo = str(Path(__file__).resolve().parents[2])

    def cli(out, **kw):
        return subprocess.run([sys.executable, "-m", "mrrm.eval", "--benchmark", "mr2bench-image", "--data", str(path),
                               "--out", str(out), "--device", "cpu", "--batch-size", "2", "--no-progress"],
                              capture_output=True, text=True, cwd=repo, timeout=300, **kw)

    assert cli(tmp_path / "ref").returncode == 0
    size = (tmp_path / "ref" / "cache.jsonl").stat().st_size
    out = tmp_path / "out"
    failed = cli(out, preexec_fn=file_size_limit(size // 2))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"cannot write {str(out / 'cache.jsonl')!r}: File too large" in failed.stderr
    assert "rerun the same command to resume" in failed.stderr
    done = cli(out)
    assert done.returncode == 0, done.stderr
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert 0 < got["passes"]["from_cache"] < 8 and got["metrics"] == want["metrics"]


# -- issue 29: the line reader and the writers shared with python -m mrrm.score -----------------------------
def test_jsonl_rows_too_long_or_too_deep_are_skipped_rows_and_outputs_never_follow_links(tmp_path, capsys):
    """A JSONL row nested 200000 arrays deep raised RecursionError out of mrrm.eval (the whole run); a row
    over max_line_bytes is passed over without being held. Both are skipped rows now. The out directory's
    files are written without following links: a pre-created cache.jsonl link is refused (its target
    untouched), a metrics.json link is replaced, not written through; a second run on the same out
    directory (its cache locked by identity) is refused."""
    import fcntl
    import os

    Image.new("RGB", (16, 16), (200, 200, 0)).save(tmp_path / "img.png")
    good = {"id": "g1", "prompt": "Which?", "image": "img.png", "responses": [r("a", 0.9), r("b", 0.1)],
            "rankings": [1, 2]}
    data = tmp_path / "mr2.jsonl"
    data.write_bytes(json.dumps(good).encode() + b"\n" + b"[" * 4000 + b"\n"
                     + json.dumps(dict(good, id="long", prompt="x" * 5000)).encode() + b"\n"
                     + json.dumps(dict(good, id="g2")).encode() + b"\n")
    res = run("mr2bench-image", data, tmp_path, max_line_bytes=4096)
    assert res["evaluated"] == 2
    reasons = [row["reason"] for row in res["skipped_rows"]]
    assert any("nested too deeply" in x for x in reasons)
    assert any("over the limit of 4096 bytes per line (--max-line-bytes)" in x for x in reasons)

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(victim, linked / "cache.jsonl")
    with pytest.raises(ValueError, match="is a symbolic link"):
        mev.run("mr2bench-image", str(data), KnownScorer(), out=str(linked), progress=False)
    assert victim.read_text() == "precious\n"

    out = tmp_path / "out"
    os.remove(out / "metrics.json")
    os.symlink(victim, out / "metrics.json")
    run("mr2bench-image", data, tmp_path, max_line_bytes=4096)
    assert victim.read_text() == "precious\n" and not os.path.islink(out / "metrics.json")
    with open(out / "cache.jsonl", "a+b") as held:  # another run writing this directory
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="is being written by another running command"):
            run("mr2bench-image", data, tmp_path, max_line_bytes=4096)
