"""`python -m mrrm.score --data in.jsonl --out scored.jsonl`: the score command (mrrm.cli.score_file).

This file is only that command's entry point. `mrrm.score` is the scoring FUNCTION (mrrm.model.api.score);
a module of the same name, once imported, would replace it as an attribute of the package, so
importing this file is refused with a pointer to the two real homes.
"""
if __name__ not in ("__main__", "__mp_main__"):  # __mp_main__: a --workers process re-reading its parent's main
    raise ImportError("mrrm.score is the scoring function (mrrm.model.api.score), not a module: call mrrm.score(batch). "
                      "The command-line tool lives in mrrm.cli.score_file (`python -m mrrm.score`, `mrrm score`).")

if __name__ == "__main__":
    from mrrm.cli.score_file import main

    raise SystemExit(main())
