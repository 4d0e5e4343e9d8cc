"""mrrm.prefgraph: exact minimum-weight feedback arc set vs brute force, the heuristic beyond the exact
limit, a planted ranking recovered from noisy judgments, variants, held-out agreement, the CLI."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mrrm.eval import prefgraph
from mrrm.eval.benchmarks import kendall_tau_b
from mrrm.eval.prefgraph import (
    build_graphs,
    exact_order,
    heuristic_order,
    main,
    min_feedback_arc_set,
    order_cost,
    parse_judgment,
    sample_variants,
)


def random_graph(rng, n, density=0.7, integer=True):
    W = rng.integers(0, 4, (n, n)).astype(float) if integer else rng.random((n, n))
    W *= rng.random((n, n)) < density
    np.fill_diagonal(W, 0)
    return W


def brute_force(W):
    n = W.shape[0]
    return min(order_cost(W, p) for p in itertools.permutations(range(n)))


def test_order_cost_by_hand():
    # 0 beat 1 twice, 1 beat 0 once, 2 beat 0 three times
    W = np.array([[0, 2, 0], [1, 0, 0], [3, 0, 0]], dtype=float)
    assert order_cost(W, [0, 1, 2]) == 1 + 3          # violated: 1>0 (1), 2>0 (3)
    assert order_cost(W, [2, 0, 1]) == 1              # violated: 1>0
    assert order_cost(W, [1, 2, 0]) == 2              # violated: 0>1 (2)
    with pytest.raises(ValueError, match="permutation"):
        order_cost(W, [0, 0, 1])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_exact_matches_brute_force(n):
    rng = np.random.default_rng(100 + n)
    for trial in range(6 if n < 7 else 3):
        W = random_graph(rng, n, integer=trial % 2 == 0)
        order, cost = exact_order(W)
        assert sorted(order) == list(range(n))
        assert cost == pytest.approx(order_cost(W, order), abs=1e-9)
        assert cost == pytest.approx(brute_force(W), abs=1e-9)


def test_exact_on_a_cycle_and_a_dag():
    # a 3-cycle 0>1>2>0 with weights 3, 2, 1: cut the lightest arc (2>0)
    W = np.zeros((3, 3))
    W[0, 1], W[1, 2], W[2, 0] = 3, 2, 1
    order, cost = exact_order(W)
    assert order == [0, 1, 2] and cost == 1
    # an acyclic graph: cost 0 and a topological order
    rng = np.random.default_rng(1)
    perm = rng.permutation(9)
    D = np.zeros((9, 9))
    for i in range(9):
        for j in range(i + 1, 9):
            D[perm[i], perm[j]] = rng.integers(1, 5)
    order, cost = exact_order(D)
    assert cost == 0 and order == list(perm)
    h_order, h_cost = heuristic_order(D)
    assert h_cost == 0 and h_order == list(perm)


def test_heuristic_never_beats_exact_and_is_locally_optimal():
    rng = np.random.default_rng(7)
    for n in (5, 8, 10):
        for _ in range(4):
            W = random_graph(rng, n)
            _, exact_cost = exact_order(W)
            order, cost = heuristic_order(W)
            assert cost >= exact_cost - 1e-9
            assert cost == pytest.approx(order_cost(W, order))
            # no single-node move lowers the cost
            for x in range(n):
                rest = [u for u in order if u != x]
                for p in range(n):
                    assert order_cost(W, rest[:p] + [x] + rest[p:]) >= cost - 1e-9


def test_solver_choice_and_validation():
    rng = np.random.default_rng(3)
    W = random_graph(rng, 6)
    assert min_feedback_arc_set(W, exact_limit=6)[2] == "exact"
    assert min_feedback_arc_set(W, exact_limit=5)[2] == "heuristic"
    with pytest.raises(ValueError, match="square"):
        exact_order(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        exact_order(np.array([[0, -1.0], [0, 0]]))
    with pytest.raises(ValueError, match="exact_limit"):
        min_feedback_arc_set(W, exact_limit=99)


def planted_judgments(rng, n_prompts, n, judges, noise):
    """Every pair judged by `judges` judges, each flipping the planted preference with prob `noise`."""
    rows, planted = [], {}
    for p in range(n_prompts):
        perm = [int(x) for x in rng.permutation(n)]   # perm[0] is the best response
        planted[f"p{p}"] = perm
        rank = {v: i for i, v in enumerate(perm)}
        for a, b in itertools.combinations(range(n), 2):
            truth = a if rank[a] < rank[b] else b
            for j in range(judges):
                flip = rng.random() < noise
                rows.append({"prompt_id": f"p{p}", "a": f"r{a}", "b": f"r{b}",
                             "winner": (f"r{b}" if truth == a else f"r{a}") if flip else f"r{truth}",
                             "judge": f"j{j}"})
    return rows, planted


def test_planted_ranking_recovered_from_20_percent_noise(tmp_path):
    rng = np.random.default_rng(0)
    rows, planted = planted_judgments(rng, n_prompts=30, n=6, judges=7, noise=0.2)
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--judgments", str(path), "--out", str(tmp_path / "out"), "--k", "4", "--variants", "2"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()]
    assert len(recs) == 30
    taus, exact = [], 0
    for rec in recs:
        true_rank = {f"r{v}": i + 1 for i, v in enumerate(planted[rec["prompt_id"]])}
        truth = [true_rank[r] for r in rec["responses"]]
        assert sorted(rec["rankings"]) == list(range(1, 7))
        taus.append(kendall_tau_b([-r for r in rec["rankings"]], [-t for t in truth]))
        exact += rec["rankings"] == truth
    assert np.mean(taus) >= 0.9 and exact >= 21, (np.mean(taus), exact)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["solver"] == {"exact": 30, "heuristic": 0}
    # held-out judgments are 20% noisy: a right ranking agrees with about 80% of them
    held = report["holdout"]
    assert held["judgments"] > 300 and 0.72 <= held["agreement"] <= 0.88, held
    variants = [json.loads(line) for line in (tmp_path / "out" / "rankings_k4.jsonl").read_text().splitlines()]
    assert len(variants) == 60 and report["variants"] == 60


def test_heuristic_beyond_exact_limit_recovers_planted_order():
    rng = np.random.default_rng(5)
    rows, planted = planted_judgments(rng, n_prompts=1, n=26, judges=3, noise=0.2)
    judgments = [parse_judgment(r, f"row{i}") for i, r in enumerate(rows)]
    g = build_graphs(judgments)["p0"]
    order, cost, method = min_feedback_arc_set(g.W)
    assert method == "heuristic"
    truth = planted["p0"]
    pos = {f"r{v}": i for i, v in enumerate(truth)}
    predicted_pos = [pos[g.nodes[v]] for v in order]
    assert kendall_tau_b(list(range(26)), predicted_pos) >= 0.9
    # never worse than the planted order itself (a feasible order)
    planted_order = [g.nodes.index(f"r{v}") for v in truth]
    assert cost <= order_cost(g.W, planted_order) + 1e-9


def test_exact_at_20_nodes_not_worse_than_heuristic():
    rng = np.random.default_rng(11)
    W = random_graph(rng, 20, density=0.5)
    order, cost = exact_order(W)
    assert cost == pytest.approx(order_cost(W, order))
    assert cost <= heuristic_order(W)[1] + 1e-9


def test_judgment_parsing_and_graph_weights():
    j = [parse_judgment({"prompt_id": 1, "a": "x", "b": "y", "winner": "a", "judge": "j1"}, "l1"),
         parse_judgment({"prompt_id": 1, "a": "x", "b": "y", "winner": "y", "judge": "j2"}, "l2"),
         parse_judgment({"prompt_id": 1, "a": "y", "b": "z", "winner": "tie", "judge": "j1"}, "l3"),
         parse_judgment({"prompt_id": 1, "a": "y", "b": "z", "tie": True, "judge": "j2"}, "l4")]
    g = build_graphs(j)[1]
    assert g.nodes == ["x", "y", "z"]
    np.testing.assert_allclose(g.W, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    g = build_graphs(j, judge_weights={"j1": 3.0, "j2": 1.0})[1]
    np.testing.assert_allclose(g.W, [[0, 3, 0], [1, 0, 2], [0, 2, 0]])
    with pytest.raises(ValueError, match="judge 'j2' has no weight"):
        build_graphs(j, judge_weights={"j1": 1.0})
    for bad, msg in (({"prompt_id": 1, "a": "x", "b": "x", "winner": "a"}, "same response"),
                     ({"prompt_id": 1, "a": "x", "b": "y", "winner": "q"}, "winner 'q'"),
                     ({"a": "x", "b": "y", "winner": "a"}, "missing field 'prompt_id'"),
                     ({"prompt_id": 1, "a": "x", "b": "y"}, "missing field 'winner'")):
        with pytest.raises(ValueError, match=msg):
            parse_judgment(bad, "f.jsonl:9")


def test_responses_file_variants_and_cli_errors(tmp_path):
    responses = [{"prompt_id": "q1", "prompt": "Which is best?", "image": "img.png",
                  "responses": ["r0", "r1", "r2", "r3", "r4"]}]
    (tmp_path / "resp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    # a chain 4 > 3 > 2 > 1 > 0 given by indices, plus one text reference; r... never judged: none
    rows = [{"prompt_id": "q1", "a": i, "b": i + 1, "winner": "b", "judge": "j"} for i in range(4)]
    rows.append({"prompt_id": "q1", "a": "r0", "b": "r4", "winner": "r4", "judge": "j"})
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["--judgments", str(tmp_path / "j.jsonl"), "--responses", str(tmp_path / "resp.jsonl"),
                 "--out", str(out), "--holdout", "0", "--variants", "3"]) == 0
    rec = json.loads((out / "rankings.jsonl").read_text())
    assert rec == {"id": "q1", "prompt_id": "q1", "prompt": "Which is best?",
                   "responses": ["r0", "r1", "r2", "r3", "r4"], "rankings": [5, 4, 3, 2, 1], "image": "img.png"}
    variants = [json.loads(line) for line in (out / "rankings_k4.jsonl").read_text().splitlines()]
    assert len(variants) == 3 and len({tuple(sorted(v["responses"])) for v in variants}) == 3
    for v in variants:
        assert v["prompt_id"] == "q1" and v["prompt"] == "Which is best?" and v["id"].startswith("q1#k4-")
        full = {r: rk for r, rk in zip(rec["responses"], rec["rankings"])}
        by_full = sorted(v["responses"], key=full.get)
        assert [by_full.index(r) + 1 for r in v["responses"]] == v["rankings"]
    # index out of range -> exit 2 with the line named
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_id": "q1", "a": 0, "b": 9, "winner": "a"}) + "\n")
    assert main(["--judgments", str(tmp_path / "bad.jsonl"), "--responses", str(tmp_path / "resp.jsonl"),
                 "--out", str(out)]) == 2
    # invalid lines stop the run unless --skip-bad
    (tmp_path / "mixed.jsonl").write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main(["--judgments", str(tmp_path / "mixed.jsonl"), "--out", str(out), "--holdout", "0"]) == 2
    assert main(["--judgments", str(tmp_path / "mixed.jsonl"), "--out", str(out), "--holdout", "0",
                 "--skip-bad"]) == 0
    assert json.loads((out / "report.json").read_text())["invalid_lines"] == 1


def test_skip_bad_skips_judgments_the_responses_file_does_not_have(tmp_path, capsys):
    """--skip-bad stopped anyway on an out-of-range index (build_graphs raised): now such a judgment (an index
    out of range, a text not among the prompt's responses, a prompt_id the file lacks) is skipped and reported
    like an unreadable line, counted in report.json's invalid_lines; without --skip-bad every one is listed
    before the run stops (exit 2)."""
    (tmp_path / "resp.jsonl").write_text(json.dumps({"prompt_id": "q1", "responses": ["r0", "r1", "r2"]}) + "\n")
    rows = [{"prompt_id": "q1", "a": 0, "b": 1, "winner": "b"}, {"prompt_id": "q1", "a": 0, "b": 9, "winner": "a"},
            {"prompt_id": "q1", "a": 1, "b": 2, "winner": "b"}, {"prompt_id": "q1", "a": "r0", "b": "zz", "winner": "a"},
            {"prompt_id": "q7", "a": 0, "b": 1, "winner": "a"}]
    judgments = tmp_path / "j.jsonl"
    judgments.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in rows))
    args = ["--judgments", str(judgments), "--responses", str(tmp_path / "resp.jsonl"), "--out", str(tmp_path / "o"),
            "--holdout", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "4 invalid judgment line(s)" in err and "j.jsonl:3: response index 9 out of range" in err
    assert "j.jsonl:5: response 'zz' is not one of prompt 'q1'" in err and "j.jsonl:6: prompt_id 'q7'" in err
    assert main(args + ["--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "j.jsonl:3: response index 9 out of range" in err and "skipped 4 invalid judgment line(s)" in err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["invalid_lines"] == 4
    rec = json.loads((tmp_path / "o" / "rankings.jsonl").read_text())
    assert rec["rankings"] == [3, 2, 1]  # from the two good judgments: r2 > r1 > r0


def test_sample_variants_edges():
    rec = {"id": "p", "prompt_id": "p", "prompt": "x", "responses": ["a", "b", "c"], "rankings": [2, 1, 3]}
    assert sample_variants(rec, k=4) == []
    (v,) = sample_variants(rec, k=3, count=5)  # only one distinct 3-subset exists
    assert sorted(v["responses"]) == ["a", "b", "c"]
    assert {r: k for r, k in zip(v["responses"], v["rankings"])} == {"a": 2, "b": 1, "c": 3}
    with pytest.raises(ValueError, match="k must be"):
        sample_variants(rec, k=1)


def test_agreement_counts_by_hand():
    train = [parse_judgment({"prompt_id": "p", "a": "x", "b": "y", "winner": "x"}, "t1"),
             parse_judgment({"prompt_id": "p", "a": "y", "b": "z", "winner": "y"}, "t2")]
    held = [parse_judgment({"prompt_id": "p", "a": "x", "b": "z", "winner": "x"}, "h1"),   # agrees
            parse_judgment({"prompt_id": "p", "a": "x", "b": "y", "winner": "y"}, "h2"),   # disagrees
            parse_judgment({"prompt_id": "p", "a": "x", "b": "y", "winner": "tie"}, "h3"),  # tie: excluded
            parse_judgment({"prompt_id": "p", "a": "x", "b": "w", "winner": "x"}, "h4"),   # unseen response
            parse_judgment({"prompt_id": "q", "a": "x", "b": "y", "winner": "x"}, "h5")]   # unseen prompt
    g = build_graphs(train)
    ranked = {"p": [1, 2, 3]}  # x, y, z
    res = prefgraph.agreement(g, ranked, held)
    assert res["agreement"] == 0.5 and res["judgments"] == 2
    assert res["ties_excluded"] == 1 and res["unseen_excluded"] == 2
    # majority of the rest: x>y known (h2 disagrees), x-z never judged (excluded)
    assert res["majority_agreement"] == 0.0 and res["majority_judgments"] == 1


@pytest.mark.slow
def test_python_m_entry_point(tmp_path):
    import subprocess
    import sys

    rows = [{"prompt_id": "p", "a": "x", "b": "y", "winner": "b", "judge": "j"},
            {"prompt_id": "p", "a": "y", "b": "z", "winner": "a", "judge": "j"},
            {"prompt_id": "p", "a": "x", "b": "z", "winner": "x", "judge": "j"}]
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "mrrm.prefgraph", "--judgments", str(tmp_path / "j.jsonl"),
                           "--out", str(tmp_path / "o"), "--holdout", "0", "--k", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "o" / "rankings.jsonl").read_text())
    assert rec["responses"] == ["x", "y", "z"] and rec["rankings"] == [2, 1, 3]
    assert len((tmp_path / "o" / "rankings_k2.jsonl").read_text().splitlines()) == 1


def test_outputs_replace_links_and_long_or_deep_lines_are_invalid_lines(tmp_path):
    """The output files replace a link at their name (its target untouched: report.json was written
    through one); a judgment line nested too deeply or over --max-line-bytes is an invalid line (skipped
    with --skip-bad), never a crash nor held whole."""
    import os

    rows = [{"prompt_id": "q1", "a": i, "b": i + 1, "winner": "b", "judge": "j"} for i in range(3)]
    path = tmp_path / "j.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b"[" * 4000 + b"\n"
                     + b'{"prompt_id": "' + b"q" * 3000 + b'"}\n')
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("report.json", "rankings.jsonl"):
        os.symlink(victim, out / name)
    assert main(["--judgments", str(path), "--out", str(out), "--holdout", "0", "--skip-bad",
                 "--max-line-bytes", "2048"]) == 0
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(out / "report.json") and not os.path.islink(out / "rankings.jsonl")
    assert json.loads((out / "report.json").read_text())["invalid_lines"] == 2
