"""`python -m mrrm.prefgraph`: preference graphs from rankings and pairs (mrrm.eval.prefgraph).

An entry point kept at this path (`python -m mrrm.prefgraph`); the code lives in mrrm.eval.prefgraph, and
importing mrrm.prefgraph gives that very module."""
import sys

from mrrm.eval import prefgraph as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.prefgraph":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
