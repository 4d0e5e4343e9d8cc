"""How long a launch of attention programs takes on a GPU's SMs, by list scheduling: programs are
handed out in launch order (CUDA issues blocks in linear block-index order, x fastest) to the first
free slot (SMs x resident programs per SM), each busy for its work (tiles visited, plus a fixed
cost per program). The ratio makespan / ideal (total work / slots, but never below the longest
program) says how much of a launch is tail. No GPU needed: the dK/dV block order of
kernels/varlen_attention.py was chosen with it.

    python -m bench_perf.schedule          # the table of orders at 16k / 64k causal and ragged batches
"""
from __future__ import annotations

import heapq
import math

H200_SMS = 132


def causal_work(L: int, block: int, tile: int, kind: str) -> list[int]:
    """Tiles visited by each program of one sequence and head under a causal mask: kind "dkdv"
    (key block n: queries [n*block, L) in tiles) or "q" (query block m: keys [0, (m+1)*block))."""
    n = math.ceil(L / block)
    if kind == "dkdv":
        return [math.ceil((L - i * block) / tile) for i in range(n)]
    return [math.ceil(min(L, (i + 1) * block) / tile) for i in range(n)]


def makespan(works: list[float], slots: int, overhead: float = 1.0) -> float:
    """Finish time of `works` issued in order to `slots` identical workers."""
    free = [0.0] * slots
    heapq.heapify(free)
    end = 0.0
    for w in works:
        t = heapq.heappop(free) + w + overhead
        end = max(end, t)
        heapq.heappush(free, t)
    return end


# matmuls per visited tile: dK/dV does q k^T, p^T dO, dO v^T, ds^T q; dQ does q k^T, dO v^T, ds k
DKDV_MATMULS, DQ_MATMULS = 4, 3


def launch_order(lengths: list[int], heads: int, block: int, tile: int, kind: str, order: str,
                 group: int = 1) -> list[float]:
    """Program works (in matmul-tile units) in launch order for a (blocks, heads, sequences) grid.
    kind: "dkdv" (a key block, looping over the `group` query heads of its KV head), "dq" (a query
    block of one query head) or "fused" (program p: dK/dV of key block p, then dQ of query block p
    for each of the group's query heads: one launch, and under a causal mask the pair's work is the
    same for every p). order:
    "reversed"   program_id(0) -> block num_blocks-1-pid (per head and sequence), x fastest
    "forward"    program_id(0) -> block pid, x fastest
    "slowest"    the block index in the slowest grid dimension: every head and sequence of block 0,
                 then of block 1, ..."""
    num = max(math.ceil(L / block) for L in lengths)
    if order == "slowest":
        grid = [(b, h, s) for b in range(num) for s in range(len(lengths)) for h in range(heads)]
    else:
        grid = [(b, h, s) for s in range(len(lengths)) for h in range(heads) for b in range(num)]
    works = []
    per_seq = {}
    for b, _, s in grid:
        L = lengths[s]
        if L not in per_seq:
            per_seq[L] = (causal_work(L, block, tile, "dkdv"), causal_work(L, block, tile, "q"))
        dkdv, dq = per_seq[L]
        idx = num - 1 - b if order == "reversed" else b
        if idx >= len(dkdv):
            works.append(0.0)  # a program past its sequence's end exits at once
        elif kind == "dkdv":
            works.append(group * DKDV_MATMULS * dkdv[idx])
        elif kind == "dq":
            works.append(group * DQ_MATMULS * dq[idx])
        else:
            works.append(group * (DKDV_MATMULS * dkdv[idx] + DQ_MATMULS * dq[idx]))
    return works


def ratio(works: list[float], slots: int, overhead: float = 1.0) -> float:
    ideal = max(sum(w + overhead for w in works) / slots, max(works) + overhead)
    return makespan(works, slots, overhead) / ideal


def table(sms: int = H200_SMS, per_sm: int = 1, hq: int = 32, hkv: int = 8) -> list[dict]:
    """Rows of tail ratios (makespan / ideal) for the dK/dV orders, and the split backward (dK/dV
    launch, then dQ launch) against the fused one, at Hq 32 / Hkv 8 with 128-row blocks, 32-row tiles."""
    slots, group = sms * per_sm, hq // hkv
    cases = {"16k causal, 1 seq": [16384], "64k causal, 1 seq": [65536],
             "16 x 1k": [1024] * 16, "ragged 64 x 200..900": [200 + (i * 137) % 700 for i in range(64)]}
    rows = []
    for name, lengths in cases.items():
        row = {"case": name}
        for order in ("reversed", "forward", "slowest"):
            row[f"dkdv {order}"] = ratio(launch_order(lengths, hkv, 128, 32, "dkdv", order, group), slots)
        split = (makespan(launch_order(lengths, hkv, 128, 32, "dkdv", "slowest", group), slots)
                 + makespan(launch_order(lengths, hq, 128, 32, "dq", "reversed"), slots))
        fused = launch_order(lengths, hkv, 128, 32, "fused", "slowest", group)
        row["fused"] = ratio(fused, slots)
        row["split / fused time"] = split / makespan(fused, slots)
        rows.append(row)
    return rows


def main() -> None:
    rows = table()
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(r[k] if isinstance(r[k], str) else f"{r[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
