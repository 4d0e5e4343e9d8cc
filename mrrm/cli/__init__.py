"""The `mrrm` command: `mrrm <command> [args]`, the same as `python -m mrrm <command> [args]`.

Each command is the module of the same job, and `python -m mrrm.<module>` keeps working:

    mrrm score      python -m mrrm.score       score a JSONL/JSON/parquet file (resumable)
    mrrm train      python -m mrrm.train       train a reward model (no arguments: the built-in demo)
    mrrm eval       python -m mrrm.eval        reward benchmarks
    mrrm serve      python -m mrrm.serve       the reward server for GRPO trainers
    mrrm demo       python -m mrrm.demo        write a split of the synthetic task
    mrrm prefgraph  python -m mrrm.prefgraph   preference graphs from rankings and pairs
    mrrm flops      python -m mrrm.flops       FLOPs of one scoring pass
    mrrm tour       python -m mrrm.tour        a 10-second tour of the ops and packing
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from mrrm import __version__
from mrrm.train.threads import prefer_passive_waiting

# command -> module whose main(argv) runs it
COMMANDS = {
    "score": "mrrm.cli.score_file",
    "train": "mrrm.train.recipe",
    "eval": "mrrm.eval.benchmarks",
    "serve": "mrrm.rl.serve",
    "demo": "mrrm.train.demo",
    "prefgraph": "mrrm.eval.prefgraph",
    "flops": "mrrm.eval.flops",
    "tour": "mrrm.cli.tour",
}


def usage() -> str:
    return __doc__.split("\n\n", 1)[1].rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-V", "--version"):
        print(f"mrrm {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print("usage: mrrm <command> [args]   (or python -m mrrm <command> [args]; mrrm --version)\n\n" + usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mrrm: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "train":
        prefer_passive_waiting()  # before torch loads: GNU OpenMP reads OMP_WAIT_POLICY once (mrrm.train.threads)
    code = importlib.import_module(COMMANDS[command]).main(rest)
    return code if isinstance(code, int) else 0
