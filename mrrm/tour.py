"""`python -m mrrm.tour`: a 10-second tour of the ops and packing (mrrm.cli.tour).

An entry point kept at this path (`python -m mrrm.tour`); the code lives in mrrm.cli.tour, and
importing mrrm.tour gives that very module."""
import sys

from mrrm.cli import tour as _impl

if __name__ == "__main__":
    raise SystemExit(_impl.main())
elif __name__ == "mrrm.tour":
    sys.modules[__name__] = _impl  # one module under both names (monkeypatching either patches both)
else:  # loaded from its file path under another name: the same objects as attributes
    globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
