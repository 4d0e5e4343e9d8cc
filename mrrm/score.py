"""`python -m mrrm.score --data in.jsonl --out scored.jsonl`: score a file (see mrrm.score_cli).

`mrrm.score` is also the scoring FUNCTION (mrrm.api.score). Importing this module would normally
replace that attribute of the package with the module; the module is therefore made callable with
the function's behaviour, so `mrrm.score(batch)` works whichever of the two the name holds.
"""
import sys
import types

from .api import score as _score


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _score(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from .score_cli import main

    raise SystemExit(main())
