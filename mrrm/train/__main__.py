"""`python -m mrrm.train`: the train command (mrrm.train.recipe)."""
from mrrm.train.recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
