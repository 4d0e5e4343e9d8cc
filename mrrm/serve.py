"""`python -m mrrm.serve`: the reward server for GRPO trainers (mrrm.rl.serve).

An entry point kept at this path (`python -m mrrm.serve`); the code lives in mrrm.rl.serve, and
importing mrrm.serve gives that very module."""
import sys

from mrrm.rl import serve as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.serve":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
