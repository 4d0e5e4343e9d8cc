"""`python -m mrrm.eval`: the eval command (mrrm.eval.benchmarks)."""
from mrrm.eval.benchmarks import main

if __name__ == "__main__":
    raise SystemExit(main())
