"""Evaluation (`python -m mrrm.eval`, `mrrm eval`): the reward benchmarks (benchmarks), preference graphs
(prefgraph) and the FLOPs of one scoring pass (flops)."""
from mrrm.eval.benchmarks import BENCHMARKS, main, run

__all__ = ["BENCHMARKS", "main", "run"]
