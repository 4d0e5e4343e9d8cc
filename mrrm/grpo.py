"""`python -m mrrm.grpo`: reward functions for TRL and veRL (mrrm.rl.grpo).

An entry point kept at this path (`python -m mrrm.grpo`, veRL's `pkg://mrrm.grpo`); the code lives in mrrm.rl.grpo, and
importing mrrm.grpo gives that very module."""
import sys

from mrrm.rl import grpo as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.grpo":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
