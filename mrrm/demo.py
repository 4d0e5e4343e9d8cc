"""`python -m mrrm.demo`: write a split of the synthetic task (mrrm.train.demo).

An entry point kept at this path (`python -m mrrm.demo`); the code lives in mrrm.train.demo, and
importing mrrm.demo gives that very module."""
import sys

from mrrm.train import demo as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.demo":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
