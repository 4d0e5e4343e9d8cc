"""Noisy pairwise judgments -> rankings: one weighted preference graph per prompt, cycles removed by a
minimum-weight feedback arc set, rankings in the published schema, k-response variants, agreement with
held-out judgments.

    python -m mrrm.prefgraph --judgments judgments.jsonl --out DIR [--responses responses.jsonl] [--k 4]
        [--variants 1] [--holdout 0.2] [--seed 0] [--judge-weights weights.json] [--exact-limit 20]

Input (JSONL, one judgment per line): {"prompt_id", "a", "b", "winner", "judge"}.
  - a, b: the two responses compared: an index into the prompt's `responses` list when --responses is
    given (or the response text itself), otherwise any id (the text, or a number) used as is.
  - winner: "a" or "b", or the value of a or b, or "tie" (also: "tie": true with no winner).
  - judge: who judged (optional; --judge-weights {"judge": weight} weighs judges, default 1 each).
  - optional "prompt" (the prompt text) and "image"/"video" are carried to the output.
--responses (JSONL or JSON, the published schema keyed by "prompt_id" or "id"): the prompt text, the
  full response list (so responses nobody judged are ranked too) and the media of each prompt.

The graph: W[u, v] = total weight of the judgments preferring u over v; a tie adds half its weight to
both directions. A ranking (an order of the responses) violates the judgments that prefer a later
response over an earlier one; its cost is their total weight. The best ranking minimises that cost:
the arcs it points backwards are a minimum-weight feedback arc set (removing them leaves the graph
acyclic, ordered by the ranking).
  - exact for up to --exact-limit (default 20) responses: dynamic programming over subsets,
    dp[S] = min over v in S of dp[S - v] + sum_{u in S - v} W[v, u] (v placed after every u of S),
    O(2^n * n) states-times-choices, vectorised layer by layer in numpy (n = 20: about a second, 40 MB).
    Among equally cheap orders the DP keeps, at each step, the smallest index as the last element.
  - beyond: a heuristic, weighted Eades-Lin-Smyth on the net graph (repeatedly take sinks to the back,
    sources to the front, else the node with the largest weighted out-minus-in degree to the front),
    then local search by single-node insertion (move one response to the position that lowers the
    cost most; repeat until no move lowers it). No optimality guarantee.

Output (DIR):
  - rankings.jsonl: per prompt {"id", "prompt_id", "prompt"?, "responses", "rankings", media?}
    (rankings 1 = best, strict, from ALL judgments);
  - rankings_k{k}.jsonl: per prompt up to --variants random k-response subsets (seeded; distinct;
    responses shuffled; re-ranked 1..k by the full ranking), id "<prompt_id>#k<k>-<j>";
  - report.json: prompts, solver use (exact/heuristic), violated judgment weight, held-out agreement.
Held-out agreement (--holdout f > 0): a seeded share f of the judgment lines is held out, rankings are
rebuilt from the rest, and agreement = share of held-out non-tie judgments whose winner the ranking puts
above the loser (held-out ties, and judgments of responses the rest never saw, are excluded and
counted). For reference, the same share for the per-pair majority of the rest (pairs it left tied or
never judged excluded) is reported as majority_agreement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mrrm._args import doc_epilog
from mrrm._io import DEFAULT_MAX_LINE_BYTES, WriteError, write_atomic
from mrrm.data.records import iter_jsonl, load_records

PROG = "mrrm.prefgraph"
EXACT_LIMIT = 20
DP_MAX = 24  # beyond this the DP's 2^n tables no longer fit in memory reasonably


@dataclass
class Judgment:
    prompt_id: Any
    a: Any
    b: Any
    winner: Any            # a's or b's value, or None for a tie
    judge: Any = None
    where: str = ""
    prompt: str | None = None
    media: dict = field(default_factory=dict)


def _key(x):
    """Hashable, JSON-stable identity of a prompt or response id."""
    return json.dumps(x, sort_keys=True) if isinstance(x, (list, dict)) else x


def parse_judgment(rec: dict, where: str) -> Judgment:
    """Validate one judgment record; ValueError naming `where` and the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a judgment must be a JSON object, got {type(rec).__name__}")
    for f in ("prompt_id", "a", "b"):
        if rec.get(f) is None:
            raise ValueError(f"{where}: missing field {f!r}")
    a, b = rec["a"], rec["b"]
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, (bool, float, list, dict)):
            raise ValueError(f"{where}: {name!r} must be a response index or id (int or string), got {v!r}")
    if a == b:
        raise ValueError(f"{where}: a and b are the same response {a!r}")
    winner = rec.get("winner")
    tie = rec.get("tie") is True or (isinstance(winner, str) and winner.lower() == "tie")
    if tie:
        if winner is not None and not (isinstance(winner, str) and winner.lower() == "tie"):
            raise ValueError(f"{where}: 'tie' is true but 'winner' is {winner!r}")
        win = None
    elif winner is None:
        raise ValueError(f"{where}: missing field 'winner' (\"a\", \"b\", the value of a or b, or \"tie\")")
    elif winner == a or winner == b:
        win = winner
    elif winner in ("a", "b", "A", "B"):
        win = a if winner.lower() == "a" else b
    else:
        raise ValueError(f"{where}: winner {winner!r} is neither \"a\", \"b\", {a!r}, {b!r} nor \"tie\"")
    prompt = rec.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    media = {k: rec[k] for k in ("image", "images", "video", "videos") if rec.get(k) is not None}
    return Judgment(rec["prompt_id"], a, b, win, rec.get("judge"), where, prompt, media)


def read_judgments(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Judgment], list[str]]:
    """All valid judgments of a JSONL file and the problems of the others (by line; a line over
    `max_line_bytes` is one, passed over without being held)."""

    good, bad = [], []
    for where, rec, err in iter_jsonl(path, max_line_bytes):
        if err is not None:
            bad.append(f"{where}: {err}")
            continue
        try:
            good.append(parse_judgment(rec, where))
        except ValueError as e:
            bad.append(str(e))
    return good, bad


# -- the graph --------------------------------------------------------------------------------------
@dataclass
class PreferenceGraph:
    prompt_id: Any
    nodes: list              # response ids; node i is row/column i of W
    W: np.ndarray            # W[u, v]: weight of the judgments preferring u over v
    prompt: str | None = None
    media: dict = field(default_factory=dict)
    judged: set = field(default_factory=set)  # nodes that appear in at least one judgment
    texts: list | None = None  # the prompt's responses when a responses file gave them (nodes = indices)


def node_index(g: PreferenceGraph, x, where: str = "") -> int:
    """The node of response x: an index or a text of g.texts (responses file), else one of g.nodes."""
    at = f"{where}: " if where else ""
    if g.texts is not None:
        if isinstance(x, int):
            if not 0 <= x < len(g.texts):
                raise ValueError(f"{at}response index {x} out of range for prompt {g.prompt_id!r} "
                                 f"({len(g.texts)} responses)")
            return x
        if x in g.texts:
            return g.texts.index(x)
        raise ValueError(f"{at}response {str(x)[:60]!r} is not one of prompt {g.prompt_id!r}'s responses")
    if x in g.nodes:
        return g.nodes.index(x)
    raise ValueError(f"{at}response {str(x)[:60]!r} is not in the graph of prompt {g.prompt_id!r}")


def split_unfit(judgments: Iterable[Judgment], responses: dict | None) -> tuple[list[Judgment], list[str]]:
    """(the judgments that fit the responses file, the problems of the others, by line): a prompt_id the
    file does not have, an index out of range, a text that is not one of the prompt's responses, a and b
    naming one response. Without a responses file every judgment fits. `build_graphs` refuses what this
    reports; `--skip-bad` drops it like an unreadable line."""
    if responses is None:
        return list(judgments), []
    good, bad = [], []
    for j in judgments:
        rec = responses.get(_key(j.prompt_id))
        try:
            if rec is None:
                raise ValueError(f"{j.where}: prompt_id {j.prompt_id!r} is not in the responses file")
            g = PreferenceGraph(j.prompt_id, list(range(len(rec["responses"]))), None, texts=list(rec["responses"]))
            if node_index(g, j.a, j.where) == node_index(g, j.b, j.where):
                raise ValueError(f"{j.where}: a and b name the same response")
        except ValueError as e:
            bad.append(str(e))
        else:
            good.append(j)
    return good, bad


def build_graphs(judgments: Iterable[Judgment], judge_weights: dict | None = None,
                 responses: dict | None = None) -> dict:
    """One PreferenceGraph per prompt_id (insertion order). responses: {prompt_id: record} in the
    published schema; a judgment's int a/b then index its `responses`, a string must be one of them."""
    groups: dict = {}
    for j in judgments:
        w = 1.0
        if judge_weights is not None:
            if j.judge not in judge_weights:
                raise ValueError(f"{j.where}: judge {j.judge!r} has no weight in judge_weights "
                                 f"(known: {sorted(map(str, judge_weights))})")
            w = float(judge_weights[j.judge])
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"judge {j.judge!r}: weight must be finite and >= 0, got {w}")
        groups.setdefault(_key(j.prompt_id), (j.prompt_id, []))[1].append((j, w))
    graphs = {}
    for pk, (pid, items) in groups.items():
        rec = responses.get(pk) if responses is not None else None
        if responses is not None and rec is None:
            raise ValueError(f"{items[0][0].where}: prompt_id {pid!r} is not in the responses file")
        if rec is not None:
            texts = list(rec["responses"])
            nodes = list(range(len(texts)))
        else:
            texts, nodes = None, []
            for j, _ in items:
                for x in (j.a, j.b):
                    if x not in nodes:
                        nodes.append(x)
        g = PreferenceGraph(pid, nodes, np.zeros((len(nodes), len(nodes))), texts=texts)
        if rec is not None:
            g.prompt = rec.get("prompt")
            g.media = {k: rec[k] for k in ("image", "images", "video", "videos") if rec.get(k) is not None}
        for j, w in items:
            ia, ib = node_index(g, j.a, j.where), node_index(g, j.b, j.where)
            if ia == ib:
                raise ValueError(f"{j.where}: a and b name the same response")
            g.judged.update((ia, ib))
            if j.winner is None:
                g.W[ia, ib] += w / 2
                g.W[ib, ia] += w / 2
            elif j.winner == j.a:
                g.W[ia, ib] += w
            else:
                g.W[ib, ia] += w
            if g.prompt is None and j.prompt is not None:
                g.prompt = j.prompt
            for k, v in j.media.items():
                g.media.setdefault(k, v)
        graphs[pk] = g
    return graphs


# -- minimum-weight feedback arc set ------------------------------------------------------------------
def _check_weights(W) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)) or np.any(W < 0):
        raise ValueError("W must hold finite, non-negative weights")
    W = W.copy()
    np.fill_diagonal(W, 0.0)
    return W


def order_cost(W, order: Sequence[int]) -> float:
    """Total weight of the judgments an order violates: W[v, u] for every u placed before v."""
    W = np.asarray(W, dtype=np.float64)
    order = list(order)
    if sorted(order) != list(range(W.shape[0])):
        raise ValueError(f"order must be a permutation of 0..{W.shape[0] - 1}, got {order}")
    P = W[np.ix_(order, order)]
    return float(np.tril(P, -1).sum())  # P[later, earlier]


def _popcount(masks: np.ndarray, n: int) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(masks).astype(np.int64)
    pc = np.zeros_like(masks)
    for i in range(n):
        pc += (masks >> i) & 1
    return pc


def exact_order(W) -> tuple[list[int], float]:
    """A minimum-cost order (a minimum-weight feedback arc set) by DP over subsets, exact."""
    W = _check_weights(W)
    n = W.shape[0]
    if n > DP_MAX:
        raise ValueError(f"exact_order: {n} nodes exceed {DP_MAX} (2^n tables); use heuristic_order")
    if n <= 1:
        return list(range(n)), 0.0
    size = 1 << n
    masks = np.arange(size, dtype=np.int64)
    pc = _popcount(masks, n)
    layers = np.argsort(pc, kind="stable")
    bounds = np.searchsorted(pc[layers], np.arange(n + 2))
    dp = np.full(size, np.inf)
    dp[0] = 0.0
    last = np.full(size, -1, dtype=np.int8)
    bit = np.int64(1) << np.arange(n, dtype=np.int64)
    for k in range(1, n + 1):
        S = layers[bounds[k]:bounds[k + 1]]
        member = ((S[:, None] >> np.arange(n)) & 1).astype(bool)          # [L, n]
        # C[s, v] = sum over u in S of W[v, u]: the judgments violated when v comes after all of S - v
        C = member.astype(np.float64) @ W.T
        prev = dp[S[:, None] ^ bit[None, :]]                              # dp[S - v] (junk where v not in S)
        cand = np.where(member, prev + C, np.inf)
        choice = np.argmin(cand, axis=1)
        dp[S] = cand[np.arange(len(S)), choice]
        last[S] = choice
    order, S = [], size - 1
    while S:
        v = int(last[S])
        order.append(v)
        S ^= 1 << v
    order.reverse()
    return order, float(dp[size - 1])


def heuristic_order(W, max_rounds: int = 100) -> tuple[list[int], float]:
    """Weighted Eades-Lin-Smyth, then single-node insertion local search (see the module doc)."""
    W = _check_weights(W)
    n = W.shape[0]
    net = np.maximum(W - W.T, 0.0)   # net[u, v] > 0: u preferred over v on balance
    remaining = set(range(n))
    front, back = [], []
    while remaining:
        idx = sorted(remaining)
        sub = net[np.ix_(idx, idx)]
        sinks = [v for r, v in enumerate(idx) if sub[r].sum() == 0]      # beat nobody left: to the back
        if sinks:
            back += sinks
            remaining.difference_update(sinks)
            continue
        sources = [v for c, v in enumerate(idx) if sub[:, c].sum() == 0]  # beaten by nobody left: to the front
        if sources:
            front += sources
            remaining.difference_update(sources)
            continue
        delta = sub.sum(axis=1) - sub.sum(axis=0)                          # weighted out - in degree
        v = idx[int(np.argmax(delta))]
        front.append(v)
        remaining.discard(v)
    order = front + back[::-1]
    for _ in range(max_rounds):  # insertion local search
        improved = False
        for x in list(order):
            rest = [u for u in order if u != x]
            # cost of x at position p: x after rest[:p] violates W[x, rest[:p]], before rest[p:] violates W[rest[p:], x]
            after = np.concatenate([[0.0], np.cumsum(W[x, rest])])
            before = np.concatenate([np.cumsum(W[rest, x][::-1])[::-1], [0.0]])
            place = after + before
            p_now = order.index(x)
            p_best = int(np.argmin(place))
            if place[p_best] < place[p_now] - 1e-12:
                order = rest[:p_best] + [x] + rest[p_best:]
                improved = True
        if not improved:
            break
    return order, order_cost(W, order)


def min_feedback_arc_set(W, exact_limit: int = EXACT_LIMIT) -> tuple[list[int], float, str]:
    """(order, violated weight, "exact"|"heuristic"): exact DP up to exact_limit nodes, else the heuristic."""
    if not isinstance(exact_limit, int) or not 0 <= exact_limit <= DP_MAX:
        raise ValueError(f"exact_limit must be an integer in [0, {DP_MAX}], got {exact_limit!r}")
    W = _check_weights(W)
    if W.shape[0] <= exact_limit:
        order, cost = exact_order(W)
        return order, cost, "exact"
    order, cost = heuristic_order(W)
    return order, cost, "heuristic"


# -- rankings, variants, agreement ------------------------------------------------------------------
def rank_graph(g: PreferenceGraph, exact_limit: int = EXACT_LIMIT) -> tuple[dict, dict]:
    """(record in the published schema, solver info) for one prompt's graph."""
    order, cost, method = min_feedback_arc_set(g.W, exact_limit)
    ranks = [0] * len(g.nodes)
    for pos, v in enumerate(order):
        ranks[v] = pos + 1
    texts = list(g.texts) if g.texts is not None else list(g.nodes)
    record = {"id": g.prompt_id, "prompt_id": g.prompt_id}
    if g.prompt is not None:
        record["prompt"] = g.prompt
    record["responses"] = texts
    record["rankings"] = ranks
    record.update(g.media)
    info = {"method": method, "violated_weight": cost, "total_weight": float(g.W.sum()),
            "unjudged": len(g.nodes) - len(g.judged), "n": len(g.nodes)}
    return record, info


def sample_variants(record: dict, k: int = 4, count: int = 1, rng: np.random.Generator | None = None) -> list[dict]:
    """Up to `count` distinct random k-response subsets of a ranked record (responses shuffled, re-ranked
    1..k by the record's rankings); [] when it has fewer than k responses."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    responses, rankings = record["responses"], record["rankings"]
    n = len(responses)
    if n < k:
        return []
    rng = rng if rng is not None else np.random.default_rng(0)
    total = math.comb(n, k)
    if total <= 10_000:
        combos = list(itertools.combinations(range(n), k))
        picks = [combos[i] for i in rng.choice(total, size=min(count, total), replace=False)]
    else:
        seen, picks = set(), []
        while len(picks) < count:
            c = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
            if c not in seen:
                seen.add(c)
                picks.append(c)
    out = []
    for j, subset in enumerate(picks):
        subset = [subset[i] for i in rng.permutation(k)]
        order = sorted(subset, key=lambda i: rankings[i])
        new_rank = {i: r + 1 for r, i in enumerate(order)}
        rec = {key: v for key, v in record.items() if key not in ("responses", "rankings", "id")}
        rec = {"id": f"{record['prompt_id']}#k{k}-{j}", **rec,
               "responses": [responses[i] for i in subset], "rankings": [new_rank[i] for i in subset]}
        out.append(rec)
    return out


def agreement(graphs_train: dict, ranked: dict, heldout: Sequence[Judgment]) -> dict:
    """Held-out agreement of rankings (ranked: {prompt key: rankings by node}) and of the per-pair
    majority of the training graphs (see the module doc)."""
    agree = counted = ties = unseen = 0
    maj_agree = maj_counted = 0
    for j in heldout:
        if j.winner is None:
            ties += 1
            continue
        pk = _key(j.prompt_id)
        g = graphs_train.get(pk)
        if g is None:
            unseen += 1
            continue
        try:
            ia, ib = node_index(g, j.a), node_index(g, j.b)
        except ValueError:
            unseen += 1
            continue
        if ia not in g.judged or ib not in g.judged:
            unseen += 1
            continue
        w, l = (ia, ib) if j.winner == j.a else (ib, ia)
        ranks = ranked[pk]
        counted += 1
        agree += ranks[w] < ranks[l]
        if g.W[w, l] != g.W[l, w]:
            maj_counted += 1
            maj_agree += g.W[w, l] > g.W[l, w]
    return {"agreement": agree / counted if counted else None, "judgments": counted,
            "ties_excluded": ties, "unseen_excluded": unseen,
            "majority_agreement": maj_agree / maj_counted if maj_counted else None,
            "majority_judgments": maj_counted}


def read_responses(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> dict:
    """{prompt key: record} from a published-schema file (JSONL / JSON / parquet) keyed by prompt_id or id."""

    records, wheres, bad = load_records(path, max_line_bytes)
    if bad:
        raise ValueError(f"{path}: unreadable records: " + "; ".join(map(str, bad[:5])))
    out = {}
    for rec, where in zip(records, wheres):
        pid = rec.get("prompt_id", rec.get("id"))
        if pid is None:
            raise ValueError(f"{where}: a responses record needs 'prompt_id' or 'id'")
        if not isinstance(rec.get("responses"), list) or len(rec["responses"]) < 2:
            raise ValueError(f"{where}: 'responses' must be a list of at least 2 responses")
        if _key(pid) in out:
            raise ValueError(f"{where}: duplicate prompt id {pid!r}")
        out[_key(pid)] = rec
    return out


def build_rankings(judgments: Sequence[Judgment], *, responses: dict | None = None, judge_weights: dict | None = None,
                   k: int = 4, variants: int = 1, holdout: float = 0.2, seed: int = 0,
                   exact_limit: int = EXACT_LIMIT) -> tuple[list[dict], list[dict], dict]:
    """(full rankings, k-response variants, report) from judgments; see the module doc."""
    if not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants must be a positive integer, got {variants!r}")
    judgments = list(judgments)
    if not judgments:
        raise ValueError("no judgments")
    rng = np.random.default_rng(seed)
    graphs = build_graphs(judgments, judge_weights, responses)
    records, methods, violated, total = [], {"exact": 0, "heuristic": 0}, 0.0, 0.0
    unjudged = 0
    for g in graphs.values():
        rec, info = rank_graph(g, exact_limit)
        records.append(rec)
        methods[info["method"]] += 1
        violated += info["violated_weight"]
        total += info["total_weight"]
        unjudged += info["unjudged"]
    var_records, short = [], 0
    for rec in records:
        v = sample_variants(rec, k, variants, rng)
        short += not v
        var_records += v
    report = {"prompts": len(records), "judgments": len(judgments), "solver": methods, "exact_limit": exact_limit,
              "violated_weight": violated, "total_weight": total,
              "violated_share": violated / total if total else None, "unjudged_responses": unjudged,
              "k": k, "variants": len(var_records), "prompts_with_fewer_than_k": short,
              "without_prompt_text": sum("prompt" not in r for r in records)}
    if holdout > 0:
        split = np.random.default_rng([seed, 1]).random(len(judgments)) < holdout
        train = [j for j, h in zip(judgments, split) if not h]
        held = [j for j, h in zip(judgments, split) if h]
        g_train = build_graphs(train, judge_weights, responses)
        ranked = {}
        for pk, g in g_train.items():
            order, _, _ = min_feedback_arc_set(g.W, exact_limit)
            ranks = [0] * len(g.nodes)
            for pos, v in enumerate(order):
                ranks[v] = pos + 1
            ranked[pk] = ranks
        report["holdout"] = {"fraction": holdout, "train_judgments": len(train), **agreement(g_train, ranked, held)}
    return records, var_records, report


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Replaced in one step, never written through a link at its name (mrrm._io.write_atomic)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrrm prefgraph", description="Pairwise judgments -> rankings "
                                 "(minimum-weight feedback arc set per prompt).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc_epilog(__doc__, "Input (JSONL"))
    ap.add_argument("--judgments", required=True, help="JSONL: prompt_id, a, b, winner|tie, judge")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--responses", default=None,
                    help="published-schema file with each prompt's responses (default: none; a and b are then "
                         "response ids used as they are)")
    ap.add_argument("--k", type=int, default=4, help="responses per sampled variant (default 4)")
    ap.add_argument("--variants", type=int, default=1, help="k-response variants per prompt (default 1)")
    ap.add_argument("--holdout", type=float, default=0.2,
                    help="share of judgments held out for agreement; 0: off (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the variants (default 0)")
    ap.add_argument("--judge-weights", default=None,
                    help="JSON file {judge: weight} (default: none, every judge weighs 1)")
    ap.add_argument("--exact-limit", type=int, default=EXACT_LIMIT,
                    help=f"largest prompt solved exactly (default {EXACT_LIMIT})")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip invalid judgments (unreadable lines, and responses or prompts the --responses file "
                         "does not have) instead of stopping; each is reported on stderr and counted")
    ap.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                    help="longest JSONL line read into memory; a longer one is an invalid line, passed over without "
                         f"being held (default {DEFAULT_MAX_LINE_BYTES}: 16 MiB)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.max_line_bytes < 1:
            raise ValueError(f"--max-line-bytes must be a positive integer, got {args.max_line_bytes}")
        judgments, bad = read_judgments(args.judgments, args.max_line_bytes)
        responses = read_responses(args.responses, args.max_line_bytes) if args.responses else None
        judgments, unfit = split_unfit(judgments, responses)
        bad += unfit
        for line in bad:
            print(f"{PROG}: {line}", file=sys.stderr)
        if bad and not args.skip_bad:
            raise ValueError(f"{len(bad)} invalid judgment line(s) (listed above); fix them or pass --skip-bad")
        if bad:
            print(f"{PROG}: skipped {len(bad)} invalid judgment line(s) (--skip-bad)", file=sys.stderr)
        weights = None
        if args.judge_weights:
            with open(args.judge_weights, encoding="utf-8") as f:
                weights = json.load(f)
            if not isinstance(weights, dict):
                raise ValueError(f"--judge-weights {args.judge_weights}: must be a JSON object {{judge: weight}}")
        records, var_records, report = build_rankings(
            judgments, responses=responses, judge_weights=weights, k=args.k, variants=args.variants,
            holdout=args.holdout, seed=args.seed, exact_limit=args.exact_limit)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    report["invalid_lines"] = len(bad)
    try:
        os.makedirs(args.out, exist_ok=True)
        _write_jsonl(os.path.join(args.out, "rankings.jsonl"), records)
        _write_jsonl(os.path.join(args.out, f"rankings_k{args.k}.jsonl"), var_records)
        write_atomic(os.path.join(args.out, "report.json"), json.dumps(report, indent=1).encode("utf-8"))
    except WriteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: --out {args.out!r}: cannot write there ({e.strerror or type(e).__name__})",
              file=sys.stderr)
        return 1
    held = report.get("holdout", {})
    print(f"{PROG}: {report['prompts']} prompts ({report['solver']['exact']} exact, {report['solver']['heuristic']} "
          f"heuristic), violated weight share {report['violated_share']:.4f}, {report['variants']} k={args.k} variants"
          + (f", held-out agreement {held['agreement']:.4f} on {held['judgments']} judgments"
             if held.get("agreement") is not None else ""))
    print(f"  {os.path.join(args.out, 'rankings.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
