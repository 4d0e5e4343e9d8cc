"""`python -m mrrm <command> [args]`: the `mrrm` command (mrrm.cli)."""
from mrrm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
