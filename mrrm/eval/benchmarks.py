"""Benchmark evaluation: the six multimodal reward benchmarks, direct vs pairwise protocols, order
sensitivity.

    python -m mrrm.eval --benchmark NAME --data PATH [--model PATH] [--mode joint|independent|single]
        [--protocol direct|pairwise] [--permutations k] [--limit n] [--order-sensitivity] --out DIR

    import mrrm.eval.benchmarks
    metrics = mrrm.eval.run("vl-rewardbench", "vlrb/test.parquet", protocol="direct", out="runs/vlrb")

Benchmarks (local files in their published layouts: parquet, JSON, JSONL, or a folder of them; a Hugging
Face dataset id "org/name:split" where the user has network):

===========================  =================================================  ====================
name                         fields                                             metrics (official)
===========================  =================================================  ====================
vl-rewardbench               id, query, image, response[2], human_ranking       accuracy, macro over
                             (0 = preferred); category from the id prefix       general/hallucination/
                             (official cal.py)                                  reasoning (both cal.py)
multimodal-rewardbench       ID, Text, Image, Output1, Output2,                 accuracy overall and per
                             Better ("Output1"|"Output2"), Category             category (2_get_accuracy)
                             (pass all_data.json, not all_data_release.json)
mm-rlhf-rewardbench          id, prompt, image|video (a video is a folder of    accuracy, Acc+ overall and
                             frames), chosen, rejected; category = keyword in   per category (official
                             the media path                                     cal_performance script)
videorewardbench             video, prompt, chosen, rejected, dimension         accuracy (layout assumed:
                                                                                no public code found)
mr2bench-image/-video        prompt|question, responses, rankings (1 = best,    best-of-N, Kendall tau-b,
                             ties), image/video (file or frame folder), id      pairwise accuracy (mrrm's)
===========================  =================================================  ====================

Metrics the official script does not compute (macro accuracy of mmrb/mm-rlhf/videorewardbench, all of
MR2Bench's) are labelled "mrrm addition" in the report and listed under "mrrm_additions".

Definitions and rules (docs/evaluation.md repeats them):

- A sample counts as correct only when the model's top choice is unique and is a human-preferred
  response (human rank 1; for MR2Bench any of several tied rank-1 responses counts). Equal model
  scores at the top count as wrong: no position gets the benefit of a tie.
- Pair benchmarks: rows whose human label is a tie are skipped and listed with the reason; labels
  out of range (Better not Output1/Output2, human_ranking not a 0/1 ranking) are malformed rows.
- MR2Bench: Kendall tau-b between the model's scores and the human ranks (ties on either side
  handled by tau-b; samples whose human ranks are all tied are rejected as rows); pairwise accuracy =
  per sample, the share of response pairs with different human ranks that the model orders the same
  way (equal model scores count as wrong), averaged over samples.
- Pair order (`pair_order`): "published" shows each pair as published; "shuffled" swaps a seeded half of
  the rows (`seed`, default 0), per row: VL-RewardBench's official per-item randomisation
  (inference_hf.py). Default: published for vl-rewardbench and multimodal-rewardbench, shuffled for the
  chosen/rejected layouts (mm-rlhf-rewardbench, videorewardbench), so "chosen first" gives no advantage.
- Protocols: `direct` scores all N responses in one pass; `pairwise` scores every pair (i, j), i < j in
  the presented order, as its own 2-response pass and ranks the responses by wins (a pair with equal
  scores gives no win), ties in wins broken by the summed score margin over its pairs; equal wins and
  margin leave the top choice tied (wrong).
- permutations=k: direct: every score averaged over k cyclic orders (evenly spaced shifts, k capped at
  N); pairwise: k >= 2 also scores each pair in the reversed order and averages the two.
- Order sensitivity: the whole benchmark is rerun with the responses reversed and cyclically shifted
  (every shift 1..N-1; duplicate orders dropped) and reports per order the primary metric, the flip
  rate of the top choice against the original order, the share of samples whose top choice flips under
  any order, and the accuracy spread (max - min of the primary metric over the orders).
- Malformed rows (missing field, unreadable image or video, label out of range, unparseable record)
  are reported by id and location, skipped, counted in the report; the rest still runs.

Files under DIR: metrics.json, report.md (per-category table), report.png (bars per category),
predictions.jsonl (per sample), cache.jsonl: the per-pass score cache (append-only, fsynced after each
batch), keyed by row (id + file location), protocol and response order. Rerunning the same command
resumes: cached passes are not scored again. cache_meta.json records the benchmark, data, model and
mode; a different one in the same DIR is refused (use another DIR or --overwrite).

Exit status of `mrrm eval`: 0 when metrics were computed (rows skipped as malformed are counted in the
report); 1 when every row was skipped (nothing evaluated) or a write failed; 2 on a usage error, or a
data file none of whose rows is in the benchmark's layout (the message names the fields expected, shows
the first record and names the benchmark whose layout it has); 130 when interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from mrrm._args import (
    add_model_args,
    add_text_budget_args,
    add_workers_arg,
    doc_epilog,
    positive_int,
    text_budget_overrides,
)
from mrrm._io import (
    DEFAULT_MAX_LINE_BYTES,
    OutputError,
    WriteError,
    append_durable,
    cut_torn_tail,
    lock_output,
    open_output,
    write_atomic,
    writing,
)
from mrrm.common import MODES, check_choice, check_int, is_correct, top_choice
from mrrm.data.budgets import add_media_budget_args, budgets_applied, media_budgets_from_args
from mrrm.data.encoding import BatchError, TextBudgets
from mrrm.data.media import MediaBudgets
from mrrm.data.pipeline import ChunkScorer
from mrrm.data.records import check_rankings, iter_records
from mrrm.errors import DataError, RowError
from mrrm.model.api import load_model
from mrrm.model.reward_model import RewardModel

PROG = "mrrm.eval"
PROTOCOLS = ("direct", "pairwise")
CACHE_FILE, META_FILE = "cache.jsonl", "cache_meta.json"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")

# VL-RewardBench: the category comes ONLY from the id's prefix (the text before the first "_" or "-",
# case-sensitive), as the official vl-rewardbench/VL_RewardBench cal.py::get_dataset_from_id maps it to a
# source dataset and distribution_dataset's group_mapping maps that to a group: RLAIF -> rlaif-v, RLHF ->
# rlhf-v, hallucination -> povid (all "hallucination"); mathverse, mmmu -> reasoning_tasks ("reasoning");
# wildvision -> wildvision-battle and ANY other prefix -> vlfeedback (both "general"). query_source is
# not read.
VLRB_ID_PREFIXES = {"RLAIF": "hallucination", "RLHF": "hallucination", "hallucination": "hallucination",
                    "mathverse": "reasoning", "mmmu": "reasoning", "wildvision": "general"}
VLRB_OTHER_PREFIX = "general"
# Multimodal RewardBench: the sources whose 'Text' the shipped all_data_release.json leaves empty; the
# official facebookresearch/multimodal_rewardbench scripts/0_download_data.py fills them in (setup_*,
# matched by ID prefix) and writes all_data.json, the file to evaluate.
MMRB_RELEASE_EMPTY_TEXT = ("nocaps", "visitbench", "mmmu-s", "mmmu-v", "mathvista", "image2struct", "RealworldQA",
                           "MMBench", "SEED-Bench", "EMMA-Coding")
# MM-RLHF-RewardBench: the category is the FIRST of these keywords found in the row's image (or video)
# path, as the official yfzhang114/MM-RLHF llava/eval/cal_performance_mmreweard_bench.py finds it; a
# row with none counts only overall.
MMRLHF_KEYWORDS = ("mcq", "long", "short", "safety", "video")
MMRLHF_NO_KEYWORD = "(no keyword)"
PAIR_ORDERS = ("published", "shuffled")
DUPLICATE = "duplicate row"
MR2_CATEGORY_FIELDS = ("category", "task", "subset", "dimension", "family", "source")


@dataclass
class Item:
    """One benchmark row, mapped onto the scoring schema."""

    key: str                 # unique and stable: "<id>@<file location>"
    sample_id: Any
    where: str
    category: str
    prompt: str
    responses: list[str]
    media: dict              # {"image": ...} / {"video": ...} / {}
    ranks: list[int]         # human ranks of `responses`, 1 = best (ties allowed)
    group: Any = None        # Acc+ group (mm-rlhf-rewardbench: the id)
    tags: tuple = ()         # mm-rlhf-rewardbench: every category keyword in the media path (Acc+ per category)


@dataclass
class Benchmark:
    name: str
    kind: str                # "pair" or "ranking"
    adapt: Callable[[dict, str, dict], Item]
    macro: bool = False      # report the macro average over categories as a headline number
    acc_plus: bool = False
    official: tuple = ()     # headline metrics the benchmark's official script computes (the rest are mrrm's)
    source: str = ""         # where the rules come from (shown in the report)
    pair_order: str = "published"  # default presentation of a pair: "published" or "shuffled" (seeded per row)
    fields: str = ""         # the fields of its layout, for the message about a file of another layout

    @property
    def primary(self) -> str:
        return "accuracy" if self.kind == "pair" else "best_of_n"


# -- row adapters -----------------------------------------------------------------------------------
def _field(rec: dict, *names: str):
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise RowError(f"missing field {names[0]!r}" + (f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""))


def _text(rec: dict, *names: str) -> str:
    value = _field(rec, *names)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"field {names[0]!r} must be a non-empty string, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _row_id(rec: dict):
    for n in ("id", "ID", "prompt_id"):
        if rec.get(n) is not None:
            return rec[n]
    return None


def _media(rec: dict, base_dir: str | None, need: str | None = None) -> dict:
    """The row's image(s) or video(s), relative paths resolved against base_dir."""
    out = {}
    for key in ("image", "images", "Image", "video", "videos", "Video"):
        value = rec.get(key)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        out[key.lower()] = _resolve_media(value, base_dir)
    if need == "image" and not ({"image", "images"} & out.keys()):
        raise RowError("missing field 'image'")
    if need == "video" and not ({"video", "videos"} & out.keys()):
        raise RowError("missing field 'video'")
    if {"video", "videos"} & out.keys():  # a frame folder's spacing (mrrm.data.encoding reads it, as the authors do)
        for key in ("sampling_interval", "fps"):
            if rec.get(key) is not None:
                out[key] = rec[key]
    return out


def _resolve_media(value, base_dir):
    if base_dir is None:
        return value
    if isinstance(value, str) and not os.path.isabs(value) and len(value) < 4096:
        path = os.path.join(base_dir, value)
        return path if os.path.exists(path) else value
    if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
        return {**value, "path": _resolve_media(value["path"], base_dir)}
    if isinstance(value, (list, tuple)):
        return [_resolve_media(v, base_dir) for v in value]
    return value


def _seeded_flip(key: str, seed: int) -> bool:
    return hashlib.sha256(f"{seed}|{key}".encode()).digest()[0] & 1 == 1


def _present(key: str, responses: list[str], ranks: list[int], opts: dict) -> tuple[list[str], list[int]]:
    """A pair as shown to the model: in its published order, or ("shuffled") swapped for a seeded half of
    the rows, per row, as VL-RewardBench's official inference_hf.py::process_item does
    (random.choice([0, 1]) per item; 1 shows response[1] first)."""
    if opts["pair_order"] == "shuffled" and _seeded_flip(key, opts["seed"]):
        return responses[::-1], ranks[::-1]
    return responses, ranks


def _chosen_rejected(rec: dict) -> tuple[str, str]:
    """chosen/rejected texts, also from a record mrrm.data.normalize already mapped onto
    responses=[chosen, rejected], rankings=[1, 2]."""
    if "chosen" not in rec and "rejected" not in rec and rec.get("rankings") == [1, 2] \
            and isinstance(rec.get("responses"), list) and len(rec["responses"]) == 2:
        rec = {**rec, "chosen": rec["responses"][0], "rejected": rec["responses"][1]}
    chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
    return chosen, rejected


def _pair_item(rec, where, opts, category, media_need, *, group=None, tags=()) -> Item:
    sid = _row_id(rec)
    key = f"{sid}@{where}"
    chosen, rejected = _chosen_rejected(rec)
    prompt = _text(rec, "prompt", "query", "question")
    responses, ranks = _present(key, [chosen, rejected], [1, 2], opts)
    return Item(key, sid, where, category, prompt, responses, _media(rec, opts["media_dir"], media_need), ranks,
                group=group, tags=tags)


def adapt_vlrb(rec: dict, where: str, opts: dict) -> Item:
    sid = _row_id(rec)
    prompt = _text(rec, "query")
    responses = _field(rec, "response")
    if not isinstance(responses, (list, tuple)) or len(responses) != 2 or \
            not all(isinstance(r, str) and r.strip() for r in responses):
        raise RowError(f"'response' must be a list of 2 non-empty strings, got {str(responses)[:80]}")
    ranking = _field(rec, "human_ranking")
    if not isinstance(ranking, (list, tuple)) or len(ranking) != 2 or \
            not all(isinstance(r, int) and not isinstance(r, bool) and r in (0, 1) for r in ranking):
        raise RowError(f"'human_ranking' must be [0, 1] or [1, 0] (0 = preferred), got {ranking!r}")
    if ranking[0] == ranking[1]:
        raise RowError(f"tied human label {list(ranking)}: no preferred response")
    if sid is None:
        raise RowError("missing field 'id' (the official script takes the category from its prefix)")
    category = vlrb_category(sid)
    key = f"{sid}@{where}"
    shown, ranks = _present(key, list(responses), [r + 1 for r in ranking], opts)
    return Item(key, sid, where, category, prompt, shown, _media(rec, opts["media_dir"], "image"), ranks)


def vlrb_category(sample_id) -> str:
    """VL-RewardBench's category of an id, from its prefix alone (official cal.py::get_dataset_from_id:
    the text before the first "_" or "-", case-sensitive; unknown prefixes are general)."""
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise ValueError(f"vlrb_category: the id must be a string, got {type(sample_id).__name__} {sample_id!r}")
    text = str(sample_id)
    cuts = [i for i in (text.find("_"), text.find("-")) if i != -1]
    return VLRB_ID_PREFIXES.get(text[:min(cuts)] if cuts else text, VLRB_OTHER_PREFIX)


def adapt_mmrb(rec: dict, where: str, opts: dict) -> Item:
    sid = _field(rec, "ID", "id")
    text = rec.get("Text")
    if isinstance(text, str) and not text.strip() and str(sid).startswith(MMRB_RELEASE_EMPTY_TEXT):
        raise RowError("empty 'Text': all_data_release.json ships without the prompts of this source; run the "
                       "benchmark's scripts/0_download_data.py and pass the data/all_data.json it writes")
    prompt = _text(rec, "Text")
    out1, out2 = _text(rec, "Output1"), _text(rec, "Output2")
    better = _field(rec, "Better")
    if better not in ("Output1", "Output2"):
        raise RowError(f"'Better' must be 'Output1' or 'Output2', got {better!r}")
    category = _text(rec, "Category")
    # the split the benchmark's own accuracy script makes (scripts/2_get_accuracy.py)
    if category == "safety":
        category = "safety/bias" if str(sid).lower().startswith("pairs") else "safety/toxicity"
    elif category == "reasoning":
        category = "reasoning/math" if str(sid).lower().startswith("math") else "reasoning/coding"
    key = f"{sid}@{where}"
    shown, ranks = _present(key, [out1, out2], [1, 2] if better == "Output1" else [2, 1], opts)
    return Item(key, sid, where, category, prompt, shown, _media(rec, opts["media_dir"], "image"), ranks)


def adapt_mmrlhf(rec: dict, where: str, opts: dict) -> Item:
    sid = _row_id(rec)
    if sid is None:
        raise RowError("missing field 'id' (Acc+ groups the pairs of one id)")
    tags = mmrlhf_keywords(rec)
    category = tags[0] if tags else MMRLHF_NO_KEYWORD
    return _pair_item(rec, where, opts, category, None, group=sid, tags=tags)


def mmrlhf_keywords(rec: dict) -> tuple[str, ...]:
    """The MM-RLHF-RewardBench category keywords found in a row's media path, in the official order
    (cal_performance_mmreweard_bench.py: `keyword in item["image"] or keyword in item["video"]`, the
    first hit being the row's category)."""
    if not isinstance(rec, dict):
        raise ValueError(f"mmrlhf_keywords: a row must be a dict, got {type(rec).__name__}")
    paths = [v for v in (rec.get("image"), rec.get("video")) if isinstance(v, str)]
    return tuple(k for k in MMRLHF_KEYWORDS if any(k in p for p in paths))


def adapt_videorb(rec: dict, where: str, opts: dict) -> Item:
    category = _text(rec, "dimension")
    return _pair_item(rec, where, opts, category, "video")


def adapt_mr2(rec: dict, where: str, opts: dict, need: str) -> Item:
    sid = _row_id(rec)
    # the authors' reference reads "prompt" or "question" (mr2rm/data/dataset.py::_process_sample)
    names = ("prompt", "question") if rec.get("prompt") or rec.get("question") is None else ("question", "prompt")
    prompt = _text(rec, *names)
    responses = _field(rec, "responses")
    if not isinstance(responses, (list, tuple)) or len(responses) < 2 or \
            not all(isinstance(r, str) and r.strip() for r in responses):
        raise RowError("'responses' must be a list of at least 2 non-empty strings")
    reason = check_rankings({"responses": responses, "rankings": rec.get("rankings")})
    if reason is not None:
        raise RowError(reason)
    category = next((str(rec[f]) for f in MR2_CATEGORY_FIELDS if rec.get(f) is not None), "all")
    return Item(f"{sid}@{where}", sid, where, category, prompt, list(responses),
                _media(rec, opts["media_dir"], need), list(rec["rankings"]))


BENCHMARKS = {
    "vl-rewardbench": Benchmark(
        "vl-rewardbench", "pair", adapt_vlrb, macro=True, official=("accuracy", "macro_accuracy"),
        source="vl-rewardbench/VL_RewardBench cal.py (categories from the id prefix; 'Overall Accuracy' and "
               "'Macro Average Acc' over general/hallucination/reasoning), inference_hf.py (per-item order)",
        fields="id, query, image, response (2 texts), human_ranking"),
    "multimodal-rewardbench": Benchmark(
        "multimodal-rewardbench", "pair", adapt_mmrb, official=("accuracy",),
        source="facebookresearch/multimodal_rewardbench scripts/2_get_accuracy.py (accuracy overall and per "
               "Category, safety and reasoning split by ID prefix); evaluate the all_data.json written by "
               "scripts/0_download_data.py",
        fields="ID, Text, Image, Output1, Output2, Better, Category"),
    "mm-rlhf-rewardbench": Benchmark(
        "mm-rlhf-rewardbench", "pair", adapt_mmrlhf, acc_plus=True, official=("accuracy", "acc_plus"),
        pair_order="shuffled",
        source="yfzhang114/MM-RLHF llava/eval/cal_performance_mmreweard_bench.py (category = first keyword of "
               "mcq/long/short/safety/video in the media path; accuracy and Acc+ overall and per category)",
        fields="id, prompt, image or video, chosen, rejected"),
    "videorewardbench": Benchmark(
        "videorewardbench", "pair", adapt_videorb, macro=True, official=("accuracy",), pair_order="shuffled",
        source="no public evaluation code found; the paper (arXiv 2509.00484) reports overall accuracy; the "
               "field names are assumed",
        fields="video, prompt, chosen, rejected, dimension"),
    "mr2bench-image": Benchmark("mr2bench-image", "ranking", lambda r, w, o: adapt_mr2(r, w, o, "image"),
                                source="no official evaluation code; all metrics are mrrm's definitions",
                                fields="prompt (or question), responses, rankings, image"),
    "mr2bench-video": Benchmark("mr2bench-video", "ranking", lambda r, w, o: adapt_mr2(r, w, o, "video"),
                                source="no official evaluation code; all metrics are mrrm's definitions",
                                fields="prompt (or question), responses, rankings, video"),
}


# -- metrics ----------------------------------------------------------------------------------------
def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two equally long sequences (ties handled, scipy.stats.kendalltau); None
    when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: sequences of length {len(x)} and {len(y)}")
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import kendalltau

    return float(kendalltau(x, y, variant="b").statistic)


def sample_metrics(keys: Sequence, ranks: Sequence[int]) -> dict:
    """Per-sample metrics from the model's preference keys (higher = better; numbers, or tuples for the
    pairwise protocol) and the human ranks (1 = best)."""
    if len(keys) != len(ranks) or len(keys) < 2:
        raise ValueError(f"sample_metrics: {len(keys)} keys for {len(ranks)} ranks (at least 2 each)")
    out = {"top": top_choice(keys), "correct": is_correct(keys, ranks)}
    # dense numeric ranks of the keys, so that tuples (pairwise protocol) work with tau-b
    levels = sorted(set(keys))
    out["kendall_tau"] = kendall_tau_b([levels.index(k) for k in keys], [-r for r in ranks])
    good = total = 0
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if ranks[i] == ranks[j]:
                continue
            total += 1
            better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
            good += keys[better] > keys[worse]
    out["pairwise_accuracy"] = good / total if total else None
    return out


def _mean(values: Iterable) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(bench: Benchmark, items: Sequence[Item], per_sample: Sequence[dict],
              skipped: Sequence[dict] = ()) -> tuple[dict, dict]:
    """(headline metrics, per-category metrics) over the evaluated samples. `skipped` (rows skipped or
    rejected, with their "id") tells Acc+ which groups lack a pair."""
    def block(rows: list[dict]) -> dict:
        d = {"n": len(rows)}
        if bench.kind == "pair":
            d["accuracy"] = _mean(float(r["correct"]) for r in rows)
        else:
            d["best_of_n"] = _mean(float(r["correct"]) for r in rows)
            d["kendall_tau"] = _mean(r["kendall_tau"] for r in rows)
            d["pairwise_accuracy"] = _mean(r["pairwise_accuracy"] for r in rows)
        return d

    cats: dict[str, list[dict]] = {}
    for it, r in zip(items, per_sample):
        cats.setdefault(it.category, []).append(r)
    categories = {c: block(rows) for c, rows in sorted(cats.items())}
    head = block(list(per_sample))
    head["macro_" + bench.primary] = _mean(c[bench.primary] for c in categories.values())
    if bench.acc_plus:
        _acc_plus(items, per_sample, skipped, head, categories)
    return head, categories


def _acc_plus(items, per_sample, skipped, head: dict, categories: dict) -> None:
    """Acc+ (the share of ids all of whose pairs are correct) overall and per category, as the official
    cal_performance_mmreweard_bench.py counts it: an all-correct id counts for the FIRST keyword (in
    MMRLHF_KEYWORDS order) that any of its rows has, the denominator of a keyword is every id with a row
    having it. An id with a skipped or rejected row is left out (its Acc+ is unknown) and counted in
    acc_plus_groups_incomplete."""
    incomplete = {_jsonable(r["id"]) for r in skipped if r.get("id") is not None and r.get("reason") != DUPLICATE}
    correct: dict[Any, bool] = {}
    tags: dict[Any, set] = {}
    for it, r in zip(items, per_sample):
        if _jsonable(it.group) in incomplete:
            continue
        correct[it.group] = correct.get(it.group, True) and r["correct"]
        tags.setdefault(it.group, set()).update(it.tags)
    head["acc_plus"] = _mean(float(v) for v in correct.values())
    head["acc_plus_groups"] = len(correct)
    head["acc_plus_groups_incomplete"] = len(incomplete)
    for name, block in categories.items():
        if name not in MMRLHF_KEYWORDS:
            block["acc_plus"] = None
            continue
        with_kw = [g for g in correct if name in tags[g]]
        first = [g for g in with_kw if correct[g] and next(k for k in MMRLHF_KEYWORDS if k in tags[g]) == name]
        block["acc_plus"] = len(first) / len(with_kw) if with_kw else None


# -- orders and scoring passes ----------------------------------------------------------------------
def order_variants(n: int) -> dict[str, tuple[int, ...]]:
    """identity, reversed and every cyclic shift of n responses; duplicate orders dropped."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"order_variants: n must be a positive integer, got {n!r}")
    out: dict[str, tuple[int, ...]] = {"original": tuple(range(n)), "reversed": tuple(reversed(range(n)))}
    for s in range(1, n):
        out[f"cyclic{s}"] = tuple((i + s) % n for i in range(n))
    seen, unique = set(), {}
    for name, order in out.items():
        if order not in seen:
            seen.add(order)
            unique[name] = order
    return unique


def cyclic_rotations(order: Sequence[int], k: int) -> list[tuple[int, ...]]:
    """k evenly spaced cyclic shifts of `order` (k capped at its length), the shift rule of
    mrrm.data.encoding.with_cyclic_orders."""
    n = len(order)
    k = max(1, min(k, n))
    return [tuple(order[(i + round(j * n / k)) % n] for i in range(n)) for j in range(k)]


def passes_for(protocol: str, order: Sequence[int], permutations: int) -> list[tuple[int, ...]]:
    """The response orders (tuples of original indices) one evaluation of a sample needs."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "direct":
        return cyclic_rotations(order, permutations)
    out = []
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            out.append((order[a], order[b]))
            if permutations >= 2:
                out.append((order[b], order[a]))
    return out


def preference_keys(protocol: str, n: int, order: Sequence[int], permutations: int,
                    scores: dict[tuple[int, ...], list[float]]) -> list:
    """Per original response: its averaged score (direct) or (wins, margin) (pairwise)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "direct":
        sums, counts = [0.0] * n, [0] * n
        for o in cyclic_rotations(order, permutations):
            for pos, idx in enumerate(o):
                sums[idx] += scores[o][pos]
                counts[idx] += 1
        return [s / c for s, c in zip(sums, counts)]
    wins, margin = [0] * n, [0.0] * n
    for a in range(n):
        for b in range(a + 1, n):
            i, j = order[a], order[b]
            si, sj = scores[(i, j)][0], scores[(i, j)][1]
            if permutations >= 2:
                si, sj = (si + scores[(j, i)][1]) / 2, (sj + scores[(j, i)][0]) / 2
            if si > sj:
                wins[i] += 1
            elif sj > si:
                wins[j] += 1
            margin[i] += si - sj
            margin[j] += sj - si
    return [(w, m) for w, m in zip(wins, margin)]


# -- the score cache --------------------------------------------------------------------------------
def _cache_key(item_key: str, protocol: str, order: Sequence[int]) -> str:
    return json.dumps([item_key, protocol, list(order)])


class ScoreCache:
    """Append-only JSONL of finished passes: {"key", "protocol", "order", "scores"} or {..., "error"}.
    Each batch is written, flushed and fsynced before the next is scored; a torn last line (a write cut
    short by a kill) is cut off on open. `fd`: the cache already opened (and locked) by open_output;
    else `path` is opened here the same way (never through a symbolic link)."""

    def __init__(self, path: str | None, fd: int | None = None):
        self.path, self.entries, self.f = path, {}, None
        if path is None:
            return
        own = fd is None
        if own:
            fd, _ = open_output(path, "score cache")
        try:
            cut_torn_tail(fd)
            with os.fdopen(os.dup(fd), "rb") as f:
                f.seek(0)
                for lineno, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                        self.entries[_cache_key(rec["key"], rec["protocol"], rec["order"])] = rec
                    except (ValueError, KeyError, TypeError, RecursionError):
                        raise ValueError(f"{path}:{lineno} is not a score-cache record; remove the file or pass "
                                         "overwrite=True") from None
            self.f = os.fdopen(os.dup(fd), "ab", buffering=0)  # unbuffered: see append_durable
        finally:
            if own:
                os.close(fd)

    def get(self, item_key, protocol, order):
        return self.entries.get(_cache_key(item_key, protocol, order))

    def add(self, records: list[dict]) -> None:
        for rec in records:
            self.entries[_cache_key(rec["key"], rec["protocol"], rec["order"])] = rec
        if self.f is not None:
            with writing(self.path):
                append_durable(self.f, [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records])

    def close(self):
        if self.f is not None:
            self.f.close()


def _score_batch(scorer, samples: list[dict]) -> tuple[list, dict[int, str]]:
    """Scores of a batch and the reasons of the samples the scorer rejected (a BatchError of
    SampleErrors, as mrrm.score raises): those are dropped and the rest scored again."""

    bad: dict[int, str] = {}
    todo = list(range(len(samples)))
    while todo:
        try:
            out = scorer([samples[i] for i in todo])
        except BatchError as e:
            new = {todo[se.index]: se.reason for se in e.errors if 0 <= se.index < len(todo)}
            if not new:
                raise
            bad.update(new)
            todo = [i for i in todo if i not in new]
            continue
        out = list(out)
        if len(out) != len(todo):
            raise RuntimeError(f"the scorer returned {len(out)} results for a batch of {len(todo)} samples")
        results = [None] * len(samples)
        for i, s in zip(todo, out):
            results[i], reason = _checked_scores(samples[i], s)
            if reason is not None:
                bad[i] = reason
        return results, bad
    return [None] * len(samples), bad


def _checked_scores(sample: dict, s) -> tuple[list[float] | None, str | None]:
    """(the scores as floats, None) or (None, the reason the sample has none)."""
    n = len(sample["responses"])
    if s is None:
        return None, "the scorer skipped this sample"
    if len(s) != n:
        raise RuntimeError(f"the scorer returned {len(s)} scores for sample {sample.get('id')!r} with {n} responses")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in s):
        return None, f"non-finite score(s) {list(s)}"
    return [float(x) for x in s], None


def _pipelined_batch(chunk_scorer, pairs: list[tuple[int, dict]]) -> tuple[list, dict[int, str]]:
    """_score_batch's results for the model scoring chunks encoded ahead by worker processes."""
    results, bad = [], {}
    for j, ((_, sample), (s, reason)) in enumerate(zip(pairs, chunk_scorer(pairs))):
        res, checked = (None, reason) if reason is not None else _checked_scores(sample, s)
        results.append(res)
        if checked is not None:
            bad[j] = checked
    return results, bad


# -- the run ----------------------------------------------------------------------------------------
DEFAULT_OPTIONS = dict(model=None, mode=None, permutations=1, limit=None, out=None, order_sensitivity=False,
                       batch_size=32, media_dir=None, seed=0, progress=True, device=None, dtype=None,
                       max_batch_tokens=None, overwrite=False, pair_order=None, workers=0,
                       max_line_bytes=DEFAULT_MAX_LINE_BYTES, text_budgets=None, media_budgets=None,
                       verify=False)


def _data_files(data: str) -> list[str]:
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(DATA_SUFFIXES))
        if not files:
            raise ValueError(f"data {data!r}: a directory without .parquet/.jsonl/.json files")
        return files
    return [data]


def load_items(bench: Benchmark, data: str, opts: dict) -> tuple[list[Item], list[dict], int]:
    """Read and adapt the rows: (items, skipped rows [{"id", "where", "reason"}], rows read)."""
    items, skipped, rows = [], [], 0
    keys = set()
    for path in _data_files(data):
        for where, rec, err in iter_records(path, opts["max_line_bytes"]):
            if opts["limit"] is not None and rows >= opts["limit"]:
                return items, skipped, rows
            rows += 1
            if err is not None:
                skipped.append({"id": None, "where": where, "reason": err})
                continue
            try:
                item = bench.adapt(rec, where, opts)
            except RowError as e:
                skipped.append({"id": _jsonable(_row_id(rec)), "where": where, "reason": str(e)})
                continue
            if item.key in keys:  # the same file given twice, e.g. in a folder
                skipped.append({"id": _jsonable(item.sample_id), "where": where, "reason": DUPLICATE})
                continue
            keys.add(item.key)
            items.append(item)
    return items, skipped, rows


def _check_layout(bench: Benchmark, data: str, skipped: list[dict], opts: dict) -> None:
    """When no row could be read because every one lacks a field of the benchmark's layout: a DataError
    naming the layout expected, what the first record looks like, and the benchmark whose layout it has
    (when one has). "0 evaluated" with exit 0 gave no hint (issue 31)."""
    if not skipped or not all(r["reason"].startswith("missing field") for r in skipped):
        return
    where, first = next(((w, rec) for path in _data_files(data) for w, rec, err in iter_records(path, opts["max_line_bytes"])
                         if err is None), (None, None))
    if first is None:
        return
    fits = []
    for name, other in BENCHMARKS.items():
        try:
            other.adapt(first, where, {**opts, "media_dir": None, "pair_order": other.pair_order})
        except (RowError, ValueError, TypeError, KeyError):
            continue
        if other is not bench:
            fits.append(name)
    shown = ", ".join(f"{k!r}: {_short(v)}" for k, v in first.items())
    hint = f"; it reads as {' or '.join(fits)}: pass --benchmark {fits[0]}" if fits else ""
    raise DataError(f"none of the {len(skipped)} rows of {data} is in the {bench.name} layout (fields: {bench.fields}; "
                    f"{skipped[0]['where']}: {skipped[0]['reason']}). The first record is {{{shown[:300]}}}{hint}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _jsonable(x):
    return x if x is None or isinstance(x, (str, int, float, bool)) else str(x)


def _default_scorer(opts: dict):
    """The loaded model's score method (batched; raises BatchError for bad samples)."""

    model = opts["model"]
    if not isinstance(model, RewardModel):
        model = load_model(model, device=opts["device"], dtype=opts["dtype"], mode=opts["mode"], verify=opts["verify"])

    def scorer(batch):
        return model.score(batch, mode=opts["mode"], max_batch_tokens=opts["max_batch_tokens"])
    scorer.model = model  # what the encoding workers (opts["workers"]) feed
    return scorer


def _scorer_name(scorer, opts) -> str:
    if scorer is None:
        model = opts["model"]
        if model is None:
            return "mrrm built-in default model"
        if isinstance(model, (str, os.PathLike)):
            return f"model {os.path.abspath(model)}"
        return f"model {type(model).__name__}"
    return f"scorer {getattr(scorer, '__module__', '?')}.{getattr(scorer, '__qualname__', type(scorer).__name__)}"


def _check_options(benchmark, data, scorer, protocol, options) -> tuple[Benchmark, dict]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"mrrm.eval.run: unknown option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a path or a hub dataset id, got {type(data).__name__}")
    if scorer is not None and not callable(scorer):
        raise TypeError("scorer must be callable (a batch of samples -> list[list[float]]), "
                        f"got {type(scorer).__name__}")
    for name in ("permutations", "batch_size"):
        v = opts[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if opts["limit"] is not None and (not isinstance(opts["limit"], int) or opts["limit"] < 0):
        raise ValueError(f"limit must be a non-negative integer, got {opts['limit']!r}")
    if opts["mode"] is not None:
        check_choice("mode", opts["mode"], MODES)
    if not isinstance(opts["verify"], bool):
        raise ValueError(f"verify must be True or False, got {opts['verify']!r}")
    if not isinstance(opts["seed"], int):
        raise ValueError(f"seed must be an integer, got {opts['seed']!r}")
    check_int("workers", opts["workers"], minimum=0)
    check_int("max_line_bytes", opts["max_line_bytes"])
    if opts["text_budgets"] is not None:

        if not isinstance(opts["text_budgets"], dict):
            raise ValueError(f"text_budgets must be a dict of {list(TextBudgets.FIELDS)}, got {opts['text_budgets']!r}")
        TextBudgets().replace(**opts["text_budgets"])  # validates the names and values
    if opts["media_budgets"] is not None and not isinstance(opts["media_budgets"], MediaBudgets):
        raise ValueError(f"media_budgets must be an mrrm.data.media.MediaBudgets, got {opts['media_budgets']!r}")
    if opts["workers"] and scorer is not None:
        raise ValueError("workers encode for mrrm's own model; a custom scorer encodes (or not) itself")
    bench = BENCHMARKS[benchmark]
    if opts["pair_order"] is None:
        opts["pair_order"] = bench.pair_order
    elif bench.kind != "pair":
        raise ValueError(f"pair_order applies to the pair benchmarks; {benchmark} keeps its published order")
    else:
        check_choice("pair_order", opts["pair_order"], PAIR_ORDERS)
    data = os.fspath(data)
    if os.path.exists(data):
        base = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
        opts["media_dir"] = os.path.abspath(opts["media_dir"]) if opts["media_dir"] else base
    if opts["media_dir"] is not None and not os.path.isdir(opts["media_dir"]):
        raise ValueError(f"media_dir {opts['media_dir']!r} is not a directory")
    return BENCHMARKS[benchmark], opts


def run(benchmark: str, data, scorer: Callable | None = None, *, protocol: str = "direct", **options) -> dict:
    """Evaluate a reward model on a benchmark; returns the metrics dict (also DIR/metrics.json with out=DIR).

    scorer: any callable with mrrm.score's contract (a list of sample dicts in, list[list[float]] out;
      a BatchError names rejected samples); default: the model (`model=` path or RewardModel, else the
      built-in default) scored with `mode=`.
    options: model, mode, permutations (1), limit, out (DIR for files, cache and resume), order_sensitivity
      (False), batch_size (32 passes per scorer call), media_dir (default: the data file's folder), seed (0),
      progress (True), device, dtype, max_batch_tokens, overwrite (False: resume DIR's cache), workers (0: encode
      in this process; N: in N worker processes ahead of the model, mrrm.data.pipeline; the default scorer only),
      max_line_bytes (16 MiB: a longer JSONL line is a skipped row, never held whole), text_budgets (a dict of
      mrrm.data.encoding.TextBudgets fields, e.g. {"sample_chars": 100000}, set on the default model's encoder),
      media_budgets (an mrrm.data.media.MediaBudgets set on the default scorer's model's encoder for the run;
      None: the encoder's own).
      verify (False: check a `model=` path's files against its checksums.sha256 before loading, mrrm.load's).
    """
    bench, opts = _check_options(benchmark, data, scorer, protocol, options)
    data = os.fspath(data)
    t0 = time.perf_counter()
    out_dir = opts["out"]
    name = _scorer_name(scorer, opts)
    items, skipped, rows = load_items(bench, data, opts)  # bad data fails here, before DIR is touched
    if rows and not items:
        _check_layout(bench, data, skipped, opts)
    cache_path, cache_fd = _open_out_dir(out_dir, bench, data, name, opts)
    try:
        return _run_locked(bench, data, scorer, protocol, opts, t0, name, items, skipped, rows, cache_path, cache_fd)
    finally:
        if cache_fd is not None:
            os.close(cache_fd)  # releases the lock


def _run_locked(bench, data, scorer, protocol, opts, t0, name, items, skipped, rows, cache_path, cache_fd) -> dict:
    out_dir = opts["out"]
    variants = _order_plan(items, opts["order_sensitivity"])
    cache, needed, passes = _score_items(items, variants, scorer, protocol, opts, cache_path, cache_fd)
    evaluated = _drop_failed(items, skipped, _failed_items(needed, cache, protocol))
    per_variant = _sample_results(evaluated, variants, cache, protocol, opts["permutations"])
    per_sample = per_variant.get("original", [])
    head, categories = aggregate(bench, evaluated, per_sample, skipped)
    result = {
        "benchmark": bench.name, "data": data, "scorer": name, "protocol": protocol, "mode": opts["mode"],
        "permutations": opts["permutations"], "seed": opts["seed"], "pair_order": opts["pair_order"],
        "primary_metric": bench.primary, "rules": bench.source,
        "official_metrics": [k for k in head if k in bench.official],
        "mrrm_additions": [k for k in head if k not in bench.official and k != "n"],
        "rows": rows, "evaluated": len(evaluated), "skipped": len(skipped), "skipped_rows": skipped,
        "metrics": head, "categories": categories, "passes": passes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if opts["order_sensitivity"]:
        result["order_sensitivity"] = _order_sensitivity(bench, evaluated, per_variant)
    if out_dir is not None:
        _write_outputs(out_dir, result, bench, evaluated, per_sample)
    return result


def _open_out_dir(out_dir: str | None, bench: Benchmark, data: str, name: str, opts: dict
                  ) -> tuple[str | None, int | None]:
    """Create DIR and claim it for this run: its cache opened without following a link and locked by its
    identity (another run writing the same cache, under any name, is refused), and cache_meta.json.
    Returns the cache's path and descriptor (None, None without DIR). A DIR whose cache belongs to
    another run is refused, unless overwrite drops that cache."""
    if out_dir is None:
        return None, None
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir!r}: cannot write there ({e.strerror or type(e).__name__})") from None
    cache_path = os.path.join(out_dir, CACHE_FILE)
    try:
        fd, _ = open_output(cache_path, "score cache")
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise ValueError(f"--out {out_dir!r}: cannot write there ({e.strerror or type(e).__name__})") from None
    try:
        lock_output(fd, cache_path, "score cache")
        _claim_out_dir(out_dir, bench, data, name, opts, cache_path, fd)
    except BaseException:
        os.close(fd)
        raise
    return cache_path, fd


def _claim_out_dir(out_dir, bench, data, name, opts, cache_path, fd) -> None:
    meta = {"benchmark": bench.name, "data": os.path.abspath(data) if os.path.exists(data) else data,
            "scorer": name, "mode": opts["mode"], "seed": opts["seed"], "pair_order": opts["pair_order"]}
    meta_path = os.path.join(out_dir, META_FILE)
    if opts["overwrite"]:
        with writing(cache_path):
            os.ftruncate(fd, 0)
        if os.path.lexists(meta_path):
            os.remove(meta_path)
    if os.path.islink(meta_path):
        raise OutputError(f"{meta_path!r} is a symbolic link; remove it (or pass --overwrite)")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        old.setdefault("pair_order", bench.pair_order)  # caches written before the option: the default
        diff = [k for k in ("benchmark", "data", "scorer", "mode", "seed", "pair_order") if old.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{out_dir} holds a cache of another run (differs in {diff}: "
                             f"{ {k: old.get(k) for k in diff} } vs { {k: meta[k] for k in diff} }); "
                             "use another out directory or overwrite=True (--overwrite)")
    else:
        write_atomic(meta_path, json.dumps(meta, indent=1).encode("utf-8"))


def _order_plan(items: Sequence[Item], order_sensitivity: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per item key, the response orders it is evaluated in (name -> order): the original order, and
    with order_sensitivity also the reversed and cyclic ones (order_variants)."""
    variants = {}
    for it in items:
        n = len(it.responses)
        variants[it.key] = order_variants(n) if order_sensitivity else {"original": tuple(range(n))}
    return variants


def _needed_passes(items: Sequence[Item], variants: dict, protocol: str, permutations: int) -> list[tuple[Item, tuple]]:
    """Every pass the run needs, in row order, deduplicated."""
    needed, seen = [], set()
    for it in items:
        for order in variants[it.key].values():
            for p in passes_for(protocol, order, permutations):
                ck = _cache_key(it.key, protocol, p)
                if ck not in seen:
                    seen.add(ck)
                    needed.append((it, p))
    return needed


def _score_items(items, variants, scorer, protocol, opts, cache_path, cache_fd=None) -> tuple[ScoreCache, list, dict]:
    """Score the passes the cache lacks (the model is loaded only when there are some); returns the
    closed cache (its entries stay readable), the needed passes, and the "passes" counts of the result."""
    cache = ScoreCache(cache_path, cache_fd)
    resumed = len(cache.entries)
    try:
        needed = _needed_passes(items, variants, protocol, opts["permutations"])
        todo = [(it, p) for it, p in needed if cache.get(it.key, protocol, p) is None]
        from_cache = len(needed) - len(todo)
        if todo and scorer is None:
            scorer = _default_scorer(opts)
        model = getattr(scorer, "model", None)  # the default scorer's (encoding workers get its budgets with it)
        with budgets_applied(model, text=opts["text_budgets"], media=opts["media_budgets"]):
            scored = _run_passes(scorer, todo, protocol, opts, cache, total=len(needed), initial=from_cache)
    finally:
        cache.close()
    passes = {"needed": len(needed), "scored_now": scored, "from_cache": from_cache, "cache_entries_at_start": resumed}
    return cache, needed, passes


def _failed_items(needed: Sequence[tuple[Item, tuple]], cache: ScoreCache, protocol: str) -> dict[str, str]:
    """item key -> the reason of its first pass the scorer rejected."""
    failed: dict[str, str] = {}
    for it, p in needed:
        rec = cache.get(it.key, protocol, p)
        if rec is not None and "error" in rec and it.key not in failed:
            failed[it.key] = rec["error"]
    return failed


def _drop_failed(items: Sequence[Item], skipped: list[dict], failed: dict[str, str]) -> list[Item]:
    """The items every pass of which was scored; the others are appended to `skipped` with their reason."""
    evaluated = [it for it in items if it.key not in failed]
    for it in items:
        if it.key in failed:
            skipped.append({"id": _jsonable(it.sample_id), "where": it.where, "reason": failed[it.key]})
    return evaluated


def _sample_results(evaluated: Sequence[Item], variants: dict, cache: ScoreCache, protocol: str,
                    permutations: int) -> dict[str, list[dict]]:
    """order name -> the sample_metrics (plus the preference "keys") of every evaluated item, in item order."""
    per_variant: dict[str, list[dict]] = {}
    for it in evaluated:
        for vname, order in variants[it.key].items():
            scores = {p: cache.get(it.key, protocol, p)["scores"] for p in passes_for(protocol, order, permutations)}
            keys = preference_keys(protocol, len(it.responses), order, permutations, scores)
            m = sample_metrics(keys, it.ranks)
            m["keys"] = keys
            per_variant.setdefault(vname, []).append(m)
    return per_variant


def _run_passes(scorer, todo, protocol, opts, cache: ScoreCache, total: int, initial: int) -> int:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="pass", desc=PROG, file=sys.stderr, disable=not opts["progress"],
               dynamic_ncols=True, mininterval=1.0)
    done = 0
    bs = opts["batch_size"]
    pairs = [(k, {"id": it.sample_id if it.sample_id is not None else it.key, "prompt": it.prompt,
                  "responses": [it.responses[i] for i in p], **it.media}) for k, (it, p) in enumerate(todo)]
    pipelined = None
    if opts["workers"] and pairs:  # the model's passes, encoded ahead by worker processes (mrrm.data.pipeline)

        pipelined = ChunkScorer(scorer.model, opts["workers"], pairs, bs, mode=opts["mode"],
                                max_batch_tokens=opts["max_batch_tokens"])
    try:
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            if pipelined is not None:
                results, bad = _pipelined_batch(pipelined, pairs[start:start + bs])
            else:
                results, bad = _score_batch(scorer, [s for _, s in pairs[start:start + bs]])
            records = []
            for j, ((it, p), res) in enumerate(zip(chunk, results)):
                rec = {"key": it.key, "protocol": protocol, "order": list(p)}
                if j in bad:
                    rec["error"] = bad[j]
                    bar.write(f"{PROG}: {it.where} (id={it.sample_id!r}): {bad[j]}", file=sys.stderr)
                else:
                    rec["scores"] = res
                records.append(rec)
            cache.add(records)
            done += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pipelined is not None:
            pipelined.close()
    return done


def _order_sensitivity(bench: Benchmark, items: Sequence[Item], per_variant: dict[str, list[dict]]) -> dict:
    """Primary metric per order, flip rate of the top choice against the original order, spread."""
    names = list(per_variant)  # insertion order: original, reversed, cyclic1, ...
    base = per_variant.get("original", [])
    out = {"orders": {}}
    # a sample of N responses has the orders order_variants(N): walk the items in evaluation order
    index = {name: 0 for name in names}
    any_flip = 0
    counts: dict[str, list] = {name: [] for name in names}
    flips: dict[str, list] = {name: [] for name in names}
    for k, it in enumerate(items):
        flipped = False
        for name in order_variants(len(it.responses)):
            m = per_variant[name][index[name]]
            index[name] += 1
            counts[name].append(float(m["correct"]))
            f = m["top"] != base[k]["top"]
            flips[name].append(float(f))
            flipped |= f
        any_flip += flipped
    for name in names:
        out["orders"][name] = {"n": len(counts[name]), bench.primary: _mean(counts[name]),
                               "flip_rate": _mean(flips[name])}
    values = [v[bench.primary] for v in out["orders"].values() if v[bench.primary] is not None]
    out["flip_rate_any"] = any_flip / len(items) if items else None
    out["spread"] = (max(values) - min(values)) if values else None
    return out


# -- outputs ----------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def render_report(result: dict) -> str:
    bench = BENCHMARKS[result["benchmark"]]
    cols = ["accuracy"] if bench.kind == "pair" else ["best_of_n", "kendall_tau", "pairwise_accuracy"]
    lines = [f"# {result['benchmark']}: {result['scorer']}", "",
             f"- data: `{result['data']}`",
             f"- protocol: {result['protocol']}, mode: {result['mode'] or 'model default'}, "
             f"permutations: {result['permutations']}",
             f"- rows: {result['rows']}, evaluated: {result['evaluated']}, skipped: {result['skipped']}",
             f"- rules: {result['rules']}"]
    if bench.kind == "pair":
        lines.append(f"- pair order shown to the model: {result['pair_order']}"
                     + (f" (seeded per row, seed {result['seed']})" if result["pair_order"] == "shuffled" else ""))
    lines += ["", "## Headline", "", "| metric | value | source |", "|---|---|---|"]
    for k, v in result["metrics"].items():
        if k != "n":
            lines.append(f"| {k} | {_fmt(v)} | {'official script' if k in bench.official else 'mrrm addition'} |")
    if bench.acc_plus:
        cols = cols + ["acc_plus"]
    lines += ["", "## Per category", "", "| category | n | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for cat, d in result["categories"].items():
        lines.append(f"| {cat} | {d['n']} | " + " | ".join(_fmt(d.get(c)) for c in cols) + " |")
    lines.append(f"| **all** | {result['metrics']['n']} | " +
                 " | ".join(_fmt(result["metrics"].get(c)) for c in cols) + " |")
    if "order_sensitivity" in result:
        osr = result["order_sensitivity"]
        lines += ["", "## Order sensitivity", "", f"| order | n | {bench.primary} | top-choice flip rate |",
                  "|---|---|---|---|"]
        for name, d in osr["orders"].items():
            lines.append(f"| {name} | {d['n']} | {_fmt(d[bench.primary])} | {_fmt(d['flip_rate'])} |")
        lines += ["", f"- flip rate under any order: {_fmt(osr['flip_rate_any'])}",
                  f"- {bench.primary} spread (max - min over orders): {_fmt(osr['spread'])}"]
    if result["skipped_rows"]:
        lines += ["", f"## Skipped rows ({result['skipped']})", "", "| id | where | reason |", "|---|---|---|"]
        for r in result["skipped_rows"][:200]:
            lines.append(f"| {r['id']} | {r['where']} | {str(r['reason']).replace('|', '/')[:200]} |")
        if result["skipped"] > 200:
            lines.append(f"| ... | | {result['skipped'] - 200} more in metrics.json |")
    return "\n".join(lines) + "\n"


def render_chart(result: dict, path) -> None:
    """Bars of the primary metric per category (and overall), Agg backend, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = result["primary_metric"]
    names = list(result["categories"]) + ["all"]
    values = [d[primary] or 0.0 for d in result["categories"].values()] + [result["metrics"][primary] or 0.0]
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), values, color=["#4c72b0"] * (len(names) - 1) + ["#dd8452"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(primary)
    ax.set_title(f"{result['benchmark']} ({result['protocol']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _write_outputs(out_dir, result, bench, items, per_sample) -> None:
    def atomic(name: str, text: str) -> None:  # never through a link at the name (mrrm._io.write_atomic)
        write_atomic(os.path.join(out_dir, name), text.encode("utf-8"))

    atomic("metrics.json", json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    atomic("report.md", render_report(result))
    atomic("predictions.jsonl", "".join(
        json.dumps({"id": _jsonable(it.sample_id), "where": it.where, "category": it.category,
                    "ranks": it.ranks, "keys": m["keys"], "top": m["top"], "correct": m["correct"],
                    **({"kendall_tau": m["kendall_tau"], "pairwise_accuracy": m["pairwise_accuracy"]}
                       if bench.kind == "ranking" else {})}, ensure_ascii=False) + "\n"
        for it, m in zip(items, per_sample)))
    chart = io.BytesIO()
    with writing(os.path.join(out_dir, "report.png")):
        render_chart(result, chart)
    write_atomic(os.path.join(out_dir, "report.png"), chart.getvalue())


# -- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrrm eval", description="Evaluate a reward model on a multimodal "
                                 "reward benchmark.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc_epilog(__doc__, "Benchmarks (local files"))
    ap.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS),
                    help="the benchmark, which fixes the layout --data must have (the table below)")
    ap.add_argument("--data", required=True,
                    help="benchmark file or folder (parquet/JSON/JSONL) or hub id org/name:split")
    add_model_args(ap)
    add_media_budget_args(ap)
    add_text_budget_args(ap)
    ap.add_argument("--protocol", choices=PROTOCOLS, default="direct",
                    help="direct: all N responses in one pass; pairwise: every pair as its own pass, ranked by wins "
                         "(default: direct)")
    ap.add_argument("--permutations", type=positive_int, default=1,
                    help="direct: average every score over k cyclic orders; pairwise: k >= 2 also scores each pair "
                         "reversed (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first n rows only (default: all rows)")
    ap.add_argument("--order-sensitivity", action="store_true",
                    help="also rerun with the responses reversed and cyclically shifted (off by default)")
    ap.add_argument("--out", required=True, help="output directory (metrics.json, report.md, report.png, cache)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="passes per scorer call (default 32)")
    ap.add_argument("--media-dir", default=None, help="base folder of relative media paths (default: the data's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the chosen/rejected presentation order of --pair-order shuffled (default 0)")
    ap.add_argument("--pair-order", choices=PAIR_ORDERS, default=None,
                    help="pair benchmarks: show each pair in its published order, or swapped for a seeded half "
                         "of the rows (VL-RewardBench's official per-item randomisation); default: published "
                         "for vl-rewardbench and multimodal-rewardbench, shuffled for the chosen/rejected layouts")
    ap.add_argument("--overwrite", action="store_true",
                    help="drop DIR's cache and start over (off by default: a rerun resumes from the cache)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (shown by default, on stderr)")
    add_workers_arg(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 0:
        print(f"{PROG}: error: --limit must be >= 0", file=sys.stderr)
        return 2
    try:
        media_budgets = media_budgets_from_args(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(args.benchmark, args.data, protocol=args.protocol, model=args.model, mode=args.mode,
                     permutations=args.permutations, limit=args.limit, out=args.out,
                     order_sensitivity=args.order_sensitivity, batch_size=args.batch_size,
                     media_dir=args.media_dir, seed=args.seed, progress=not args.no_progress, device=args.device,
                     dtype=args.dtype, max_batch_tokens=args.max_batch_tokens, overwrite=args.overwrite,
                     pair_order=args.pair_order, workers=args.workers, max_line_bytes=args.max_line_bytes,
                     text_budgets=text_budget_overrides(args) or None, media_budgets=media_budgets,
                     verify=args.verify)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished passes are cached in {args.out}: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except WriteError as e:
        print(f"{PROG}: error: {e}; finished passes are cached in {args.out}: make room and rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    m = result["metrics"]
    head = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items() if k != "n")
    print(f"{PROG}: {result['benchmark']} ({result['protocol']}): {result['evaluated']} evaluated, "
          f"{result['skipped']} skipped; {head}")
    for r in result["skipped_rows"][:20]:
        print(f"  skipped {r['where']} (id={r['id']!r}): {r['reason']}", file=sys.stderr)
    print(f"  report: {os.path.join(args.out, 'report.md')}")
    if result["rows"] and not result["evaluated"]:  # no metric: the run did not give what was asked
        print(f"{PROG}: error: nothing was evaluated: all {result['rows']} rows were skipped (the reasons are in "
              f"{os.path.join(args.out, 'report.md')})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
