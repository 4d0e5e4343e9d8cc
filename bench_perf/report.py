"""Turn pytest-benchmark JSON into the speedup plot and the results tables of docs/results.md.

    pytest bench_perf --benchmark-only --benchmark-json bench_perf/results/cpu.json
    python -m bench_perf.report bench_perf/results/cpu.json [bench_perf/results/gpu.json] [--readme docs/results.md]

Writes bench_perf/speedup.png (speedup of joint over single scoring vs N: the analytic FLOPs ratio of
the 4B architectures, the CPU latency ratio of the small model, and the GPU latency ratio of the 4B
model when a GPU run's JSON is given; image and video prompts) and prints the results table; with
--readme FILE (docs/results.md) it replaces the block between that file's `<!-- results:begin -->` and
`<!-- results:end -->` markers. Every number comes from the JSON files named on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _get(info: dict, *names, default=None):
    for n in names:
        if n in info:
            return info[n]
    return default


def load(paths: list[str]) -> list[dict]:
    """Every benchmark of every file: {name, group, median_s, extra_info, machine, source}."""
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks')")
        machine = data.get("machine_info", {})
        for b in data["benchmarks"]:
            rows.append(dict(name=b["name"], group=b.get("group") or "", median_s=b["stats"]["median"],
                             extra_info=b.get("extra_info", {}), machine=machine, source=path))
    return rows


def flops_rows(rows):
    return [r["extra_info"] for r in rows if "flops_joint" in r["extra_info"] and "ratio_analytic" in r["extra_info"]
            and "seconds_joint" not in r["extra_info"]]


def latency_rows(rows, arch=None):
    """Latency benchmarks of the 4B architecture `arch` (GPU), or with arch=None the CPU model's."""
    out = [r["extra_info"] for r in rows if "seconds_joint" in r["extra_info"]]
    return [e for e in out if e.get("arch") == arch]


def train_rows(rows):
    return [r["extra_info"] for r in rows if "tokens_per_s" in r["extra_info"] or "tokens_per_s_packed" in r["extra_info"]]


def kernel_rows(rows):
    """CPU op microbenchmarks: group -> [(name, median_s)]."""
    groups = defaultdict(list)
    for r in rows:
        if r["group"].startswith(("gather_value_head", "listwise_ce", "varlen_attention fwd+bwd, one demo")) and "impl" in r["extra_info"] \
                and "do_bench_median_ms" not in r["extra_info"]:
            groups[r["group"]].append((r["extra_info"]["impl"], r["median_s"]))
    return groups


def plot(rows, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("image", "video")):
        series = defaultdict(dict)
        for e in flops_rows(rows):
            if _get(e, "kind", "prompt", "prompt_kind") != kind:
                continue
            key = f"FLOPs (analytic) {e.get('arch', '')} R={_get(e, 'R', 'r', 'response_tokens')}"
            series[key][_get(e, "n", "N")] = e["ratio_analytic"]
        for e in latency_rows(rows):
            if e.get("kind") == kind:
                series[f"CPU latency, small model R={e['R']}"][e["n"]] = e["ratio_measured"]
        for e in latency_rows(rows, arch="qwen3_vl_4b"):
            if e.get("kind") == kind:
                b = e.get("prompts_per_pass", 1)
                series[f"GPU latency, 4B bf16 R={e['R']}, {b} prompt(s)/pass"][e["n"]] = e["ratio_measured"]
        if not series:
            ax.set_visible(False)
            continue
        nmax = 1
        for label, pts in sorted(series.items()):
            ns = sorted(pts)
            nmax = max(nmax, ns[-1])
            style = "-o" if label.startswith("FLOPs") else ("--s" if label.startswith("CPU") else "--^")
            ax.plot(ns, [pts[n] for n in ns], style, label=label, markersize=4)
        ax.plot([1, nmax], [1, nmax], ":", color="grey", label="N x (ideal)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("responses per prompt N")
        ax.set_title(f"{kind} prompt: single / joint")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup of joint over single scoring")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def table(rows) -> str:
    lines = []
    fl = flops_rows(rows)
    if fl:
        lines += ["#### FLOPs of one scoring pass, single / joint (`bench_perf/test_flops.py`, FlopCounterMode vs mrrm.flops)",
                  "", "| arch | prompt | R | " + " | ".join(f"N={n}" for n in sorted({_get(e, 'n', 'N') for e in fl})) + " |",
                  "|---|---|---|" + "---|" * len({_get(e, 'n', 'N') for e in fl})]
        ns = sorted({_get(e, "n", "N") for e in fl})
        cases = defaultdict(dict)
        for e in fl:
            cases[(e.get("arch", ""), _get(e, "kind", "prompt", "prompt_kind"), _get(e, "R", "r", "response_tokens"))][
                _get(e, "n", "N")] = e
        for (arch, kind, R), byn in sorted(cases.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            cells = [f"{byn[n]['ratio_measured']:.2f}x ({byn[n]['ratio_analytic']:.2f})" if n in byn else "-" for n in ns]
            lines.append(f"| {arch} | {kind} | {R} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: counted ratio (analytic ratio in brackets).", ""]
    for label, arch in (("CPU, small Qwen3-VL-style model, fp32 (`bench_perf/test_latency_cpu.py`)", None),
                        ("GPU, random-weights Qwen3-VL-4B, bf16 (`bench_perf/test_e2e_gpu.py`)", "qwen3_vl_4b")):
        lat = latency_rows(rows, arch=arch)
        if not lat:
            continue
        card = lat[0].get("card", "")
        lines += [f"#### Scoring latency per prompt, {label}{' on ' + card if card else ''}", "",
                  "| prompt | N | R | prompts/pass | single ms | joint ms | independent ms | published path ms | single/joint | "
                  "FLOPs ratio | latency / FLOPs ratio | published/joint |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(lat, key=lambda e: (e.get("prompts_per_pass", 1), e["kind"], e["n"])):
            fr = e.get("ratio_flops", e["ratio_analytic"])
            lines.append(f"| {e['kind']} | {e['n']} | {e['R']} | {e.get('prompts_per_pass', 1)} | "
                         f"{e['seconds_single'] * 1e3:.1f} | "
                         f"{e['seconds_joint'] * 1e3:.1f} | {e['seconds_independent'] * 1e3:.1f} | "
                         f"{e['seconds_published'] * 1e3:.1f} | {e['ratio_measured']:.2f}x | {fr:.2f}x | "
                         f"{e['ratio_measured'] / fr:.0%} | {e['ratio_vs_published']:.2f}x |")
        lines += ["", "ms are per prompt (a pass over B prompts / B). FLOPs ratio: " + (
            "FlopCounterMode on the executed call (dense attention)." if arch is None else
            "mrrm.flops, useful attention pairs (what the Triton kernels compute).")]
        lines.append("")
    tr = train_rows(rows)
    if tr:
        lines += ["#### Training step (forward + backward), packed vs padded", "",
                  "| where | batch | layout | real tokens | processed tokens | tokens/s | peak memory MB |",
                  "|---|---|---|---|---|---|---|"]
        for e in sorted(tr, key=lambda e: (e.get("batch_kind", ""), e.get("layout", ""))):
            if "layout" in e:
                lines.append(f"| CPU small model | {e['batch']} x {e.get('batch_kind', 'uniform')} | {e['layout']} | "
                             f"{e['real_tokens']} | {e['processed_tokens']} | "
                             f"{e['tokens_per_s']:.0f} | {e['peak_bytes'] / 2**20:.0f} |")
            else:
                for lay in ("packed", "padded"):
                    lines.append(f"| GPU 4B bf16 ({e.get('card', '')}) | 2 x uniform | {lay} | {e[f'real_tokens_{lay}']} | "
                                 f"{e.get(f'processed_tokens_{lay}', e[f'real_tokens_{lay}'])} | "
                                 f"{e[f'tokens_per_s_{lay}']:.0f} | {e[f'peak_bytes_{lay}'] / 2**20:.0f} |")
        lines += ["", "uniform: image prompts, N = 4 each; mixed: N from 2 to 8 per prompt, every other prompt "
                  "text-only. Real tokens exclude padding; processed tokens are what the padded batch computes.", ""]
    kr = kernel_rows(rows)
    if kr:
        lines += ["#### CPU ops (`bench_perf/test_ops_cpu.py`, forward + backward)", "",
                  "| benchmark | implementation | median | vs mrrm |", "|---|---|---|---|"]
        for group, items in sorted(kr.items()):
            base = dict(items).get("mrrm_cpu")
            for impl, t in sorted(items, key=lambda x: x[1]):
                unit = f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"
                lines.append(f"| {group} | {impl} | {unit} | {t / base:.2f}x |" if base else f"| {group} | {impl} | {unit} | - |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path, text):
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"{path}: no {BEGIN} ... {END} block to replace")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}{END}", readme, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench_perf.report", description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (CPU run, optional GPU run)")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "speedup.png"))
    ap.add_argument("--readme", default=None, help="page to update between the results markers (docs/results.md)")
    args = ap.parse_args(argv)
    rows = load(args.json)
    plot(rows, args.png)
    text = table(rows)
    print(text)
    if args.readme:
        update_readme(args.readme, text)
    print(f"wrote {args.png}" + (f" and the table in {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
