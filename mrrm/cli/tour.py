"""`mrrm tour` (`python -m mrrm tour`): a 10-second tour of the ops and packing, no model.

Packs a few random multi-response samples in the three modes, runs a one-layer toy scorer built
from mrrm.ops (embedding -> varlen attention -> gather_value_head), and shows:
  * joint vs independent vs single scores, with independent == single (the mask/position check);
  * the listwise loss and its gradient through every op, on the default backends;
  * the token cost of each mode (one pass over V+P+N*R tokens vs N passes over V+P+R).
"""
from __future__ import annotations

import argparse
import math

import torch

from mrrm import ops
from mrrm._args import doc_epilog
from mrrm.common import MODES
from mrrm.data.packing import SampleLayout, pack, split_scores
from mrrm.ops._dispatch import choose_backend

SEP = [7, 2, 7]  # stands for the ids of "\n\n<|resp_sep|>\n\n"; index 1 is <|resp_sep|>


class ToyScorer(torch.nn.Module):
    """Embedding (token + position) -> one attention layer (mrrm.ops.varlen_attention) -> value head."""

    def __init__(self, vocab=64, heads=4, kv_heads=2, head_dim=16, max_pos=512):
        super().__init__()
        H = heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.tok = torch.nn.Embedding(vocab, H)
        self.pos = torch.nn.Embedding(max_pos, H)
        self.q = torch.nn.Linear(H, heads * head_dim)
        self.kv = torch.nn.Linear(H, 2 * kv_heads * head_dim)
        self.head = torch.nn.Sequential(torch.nn.Linear(H, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))

    def forward(self, batch):
        x = self.tok(batch.input_ids) + self.pos(batch.position_ids)
        T = x.shape[0]
        q = self.q(x).view(T, self.heads, self.head_dim)
        k, v = self.kv(x).view(T, 2, self.kv_heads, self.head_dim).unbind(1)
        seg = batch.segment_ids if batch.mask == "shared_prefix" else None
        h = x + ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, mask=batch.mask,
                                     segment_ids=seg).reshape(T, -1)
        l1, l2 = self.head[0], self.head[2]
        return ops.gather_value_head(h, batch.score_positions, l1.weight, l1.bias, l2.weight, l2.bias,
                                     scale=1.0 / math.sqrt(h.shape[1]))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrrm tour", description="A 10-second tour of the ops and packing, no model.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc_epilog(__doc__, "Packs a few random"))
    ap.add_argument("--samples", type=int, default=3, help="random multi-response samples packed (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples and the toy scorer (default 0)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    rnd = lambda n: torch.randint(10, 64, (n,), generator=g).tolist()  # noqa: E731
    layouts = []
    for s in range(args.samples):
        n = int(torch.randint(2, 6, (1,), generator=g))
        layouts.append(SampleLayout(prefix_ids=rnd(int(torch.randint(8, 40, (1,), generator=g)))
                                    , response_ids=[rnd(int(torch.randint(1, 12, (1,), generator=g))) for _ in range(n)],
                                    separator_ids=SEP, sample_id=f"demo-{s}"))
    torch.manual_seed(args.seed)
    model = ToyScorer()
    print("backends (auto, CPU tensors):",
          {op: choose_backend(op, torch.device("cpu")) for op in ("varlen_attention", "gather_value_head", "listwise_ce")})
    results = {}
    for mode in MODES:
        batch = pack(layouts, mode)
        with torch.no_grad():
            results[mode] = split_scores(model(batch), batch.group_offsets)
        print(f"{mode:>11}: {batch.num_tokens:4d} tokens in {batch.cu_seqlens.numel() - 1:2d} sequences")
    for i, lay in enumerate(layouts):
        print(f"sample {i} ({lay.num_responses} responses)")
        for mode in results:
            print(f"  {mode:>11}: " + "  ".join(f"{s:+.5f}" for s in results[mode][i]))
    worst = max(abs(a - b) for si, ss in zip(results["independent"], results["single"]) for a, b in zip(si, ss))
    print(f"max |independent - single| = {worst:.2e}  (equal up to rounding: same masks and positions)")
    batch = pack(layouts, "joint")
    targets = torch.zeros(len(layouts), dtype=torch.int64)  # pretend response 0 is the best of each
    loss = ops.listwise_ce(model(batch), batch.group_offsets, targets, loss="best")
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    print(f"listwise CE (joint) = {loss.item():.4f}, gradient norm through all ops = {grad_norm:.4f}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
