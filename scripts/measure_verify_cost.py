"""What `mrrm.load(..., verify=True)` costs: load times of one checkpoint with and without verification.

    python scripts/measure_verify_cost.py [--hidden 1536 --layers 4] [--reps 5] [--out DIR]

Builds a random Qwen2-VL-style reward model (tiny's config at the given width and depth, fp32; the defaults
give ~380 MB of safetensors), saves it with save_pretrained (which writes checksums.sha256), then loads it
`--reps` times each way, alternating (the page cache warm for both: the first, cold load is dropped), and
prints the medians, the verification alone (mrrm.model.verify_checkpoint), and its share of a load.
docs/scoring.md (Checkpoints: "Checkpoint integrity") quotes its output.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="where to save the checkpoint (default: a temporary folder)")
    args = ap.parse_args(argv)

    import mrrm
    from mrrm.model import tiny
    from mrrm.model.parts import RewardModelConfig, verify_checkpoint
    from mrrm.model.reward_model import RewardModel

    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mrrm-verify-")
        out = tmp.name
    tok = tiny.build_tokenizer()
    cfg = tiny.build_config("qwen2_vl", tokenizer=tok, hidden_size=args.hidden, layers=args.layers,
                            heads=args.hidden // 128, kv_heads=max(1, args.hidden // 512))
    torch.manual_seed(0)
    model = RewardModel(tiny.build_backbone(cfg), tok, tiny.build_processor("qwen2_vl", tok), RewardModelConfig())
    model.save_pretrained(out)
    del model
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"checkpoint: {out}, {size / 1e6:.0f} MB in {sum(len(fs) for _, _, fs in os.walk(out))} files; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    mrrm.load(out)  # the cold read, not counted
    plain, verified, alone = [], [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        mrrm.load(out)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        mrrm.load(out, verify=True)
        verified.append(time.perf_counter() - t)
        t = time.perf_counter()
        verify_checkpoint(out)
        alone.append(time.perf_counter() - t)
    p, v, a = statistics.median(plain), statistics.median(verified), statistics.median(alone)
    print(f"| load | median of {args.reps} (s) | all runs (s) |\n|---|---|---|")
    print(f"| mrrm.load(path) | {p:.2f} | {', '.join(f'{x:.2f}' for x in plain)} |")
    print(f"| mrrm.load(path, verify=True) | {v:.2f} | {', '.join(f'{x:.2f}' for x in verified)} |")
    print(f"| verify_checkpoint(path) alone | {a:.2f} | {', '.join(f'{x:.2f}' for x in alone)} |")
    print(f"verification: +{(v - p) / p * 100:.0f}% of a load (its own time: {a / p * 100:.0f}% of a load, "
          f"{size / 1e6 / a:.0f} MB/s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
