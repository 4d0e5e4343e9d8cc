"""`python -m mrrm.flops`: FLOPs of one scoring pass (mrrm.eval.flops).

An entry point kept at this path (`python -m mrrm.flops`); the code lives in mrrm.eval.flops, and
importing mrrm.flops gives that very module."""
import sys

from mrrm.eval import flops as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.flops":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
