"""`python -m mrrm.train`: the train command (mrrm.train.recipe)."""
from mrrm.train.threads import prefer_passive_waiting

prefer_passive_waiting()  # before torch loads with the recipe: GNU OpenMP reads OMP_WAIT_POLICY once, at load
from mrrm.train.recipe import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
