"""Print the GPU benchmark table from a pytest-benchmark JSON file (written by gpu_check.sh).

    python -m bench_perf.gpu_summary bench.json [more.json ...] [--card NAME] > table.md
Ratios are between implementations measured in the same run (medians of triton's do_bench).
"""
import argparse
import json
from collections import defaultdict


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json_files", nargs="+")
    ap.add_argument("--card", default="")
    args = ap.parse_args(argv)
    rows = []
    for path in args.json_files:
        with open(path) as f:
            rows += [b["extra_info"] for b in json.load(f)["benchmarks"] if "do_bench_median_ms" in b["extra_info"]]
    print(f"### GPU kernels {args.card}\n")
    attn = defaultdict(dict)
    for r in rows:
        if "mask" in r:
            attn[(r["T"], r["n_resp"], r["mask"])][r["impl"]] = r
    if attn:
        print("| T | N | mask | mrrm ms | useful TFLOP/s | vs flex | vs sdpa flash (per useful FLOP) | vs eager | create_block_mask ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (T, n, mask), impls in sorted(attn.items()):
            m = impls.get("mrrm_triton")
            if not m:
                continue
            def ratio(name):
                o = impls.get(name)
                return f"{o['do_bench_median_ms'] / m['do_bench_median_ms']:.2f}x" if o else "-"
            sdpa = impls.get("sdpa_flash")
            sdpa_r = f"{m['useful_tflops'] / sdpa['useful_tflops']:.2f}" if sdpa else "-"
            cbm = impls.get("flex", {}).get("create_block_mask_ms")
            print(f"| {T} | {n} | {mask} | {m['do_bench_median_ms']:.3f} | {m['useful_tflops']:.1f} | {ratio('flex')} "
                  f"| {sdpa_r} | {ratio('eager')} | {cbm:.1f} |" if cbm else
                  f"| {T} | {n} | {mask} | {m['do_bench_median_ms']:.3f} | {m['useful_tflops']:.1f} | {ratio('flex')} "
                  f"| {sdpa_r} | {ratio('eager')} | - |")
        print()
    head = {r["impl"]: r for r in rows if "H" in r and "mask" not in r}
    if head:
        m, e = head.get("mrrm_triton"), head.get("eager")
        print("| gather_value_head fwd+bwd | mrrm ms | eager ms | speedup |\n|---|---|---|---|")
        if m and e:
            print(f"| T=16k H=2560 D=1024 M=64 | {m['do_bench_median_ms']:.3f} | {e['do_bench_median_ms']:.3f} "
                  f"| {e['do_bench_median_ms'] / m['do_bench_median_ms']:.2f}x |")
        print()
    for r in rows:
        if r.get("impl") == "mrrm_cuda":
            print(f"listwise_ce fused (B={r['B']}): {r['us']:.1f} us (target < 20 us)\n")
    round2(args.json_files)


def round2(paths):
    """Issue 17's tables: attention phases and tile sweeps, backward variants, the value head under
    CUDA graphs, host syncs per scoring pass (rows without do_bench_median_ms)."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [b["extra_info"] for b in json.load(f)["benchmarks"]]
    def table(header, cells, picked, key):
        if picked:
            print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
            for r in sorted(picked, key=key):
                print("| " + " | ".join(cells(r)) + " |")
            print()

    table(["phase", "mask", "tiles (m, n, warps, stages)", "default", "call ms", "default backward ms"],
          lambda r: [r["phase"], r["mask"], str(tuple(r["tiles"])), "yes" if r["tiles"] == r["default_tiles"] else "",
                     f"{r['call_ms']:.3f}", f"{r.get('backward_default_ms', float('nan')):.3f}"],
          [r for r in rows if "phase" in r], lambda r: (r["phase"], r["mask"], r["call_ms"]))
    table(["T", "mask", "backward variant", "forward ms", "backward ms", "fwd+bwd useful TFLOP/s"],
          lambda r: [str(r["T"]), r["mask"], r["variant"], f"{r['forward_ms']:.3f}", f"{r['backward_ms']:.3f}",
                     f"{r['fwd_bwd_useful_tflops']:.1f}"],
          [r for r in rows if "variant" in r], lambda r: (r["T"], r["mask"], r["variant"]))
    table(["value head", "split_k", "CUDA-graph us", "memory floor MB", "host us / call"],
          lambda r: [r["what"], str(r["split_k"]), f"{r['cudagraph_us']:.1f}", f"{r['memory_floor_mb']:.0f}",
                     f"{r['host_us_per_call']:.1f}"],
          [r for r in rows if "cudagraph_us" in r], lambda r: (r["what"], r["split_k"]))
    for r in rows:
        if "host_syncs" in r:
            print(f"host syncs per scoring pass ({r['kind']}): {r['host_syncs']} {r['sync_sites']}")


if __name__ == "__main__":
    main()
