"""`python -m mrrm.score --engine ray`: the same scoring, spread over a Ray cluster with Ray Data.

The driver (mrrm.cli.score_file) keeps everything that decides the output: reading the input, the bad-line
records, the order, the durable appends, resuming. What it hands to Ray is the list of samples still to
score, as rows {"line": input line number, "raw": the line's JSON text}, written to a temporary JSONL
that `ray.data.read_json` streams (the driver never holds the whole input). `map_batches` runs model
actors (`ScoreActor`: one model replica each; `num_gpus=1` per actor where the cluster has GPUs, else
one CPU) over batches of exactly --batch-size samples, the chunks the local engine scores, so every
sample is packed with the same neighbours and scored the same way (equal up to the float rounding of
another thread count). Ray Data keeps the rows in input order (`preserve_order`); the driver takes the
results as they stream back and writes them chunk by chunk.

Resources: on a local Ray (started here unless --ray-address is given), the actors take all CPUs but
one, so Ray Data's read tasks always find a CPU (with every CPU held by actors, the read starves and the
pipeline stalls). Ray stays an optional extra: `pip install "mrrm[ray]"`.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Iterator

from mrrm._args import text_budget_overrides
from mrrm.data.budgets import media_budgets_from_args
from mrrm.data.media import DEFAULT_MEDIA_BUDGETS, MediaBudgets
from mrrm.data.records import normalize
from mrrm.errors import CLIError
from mrrm.model.api import load_model, skip_reason


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CLIError('--engine ray needs Ray Data: pip install "mrrm[ray]" (ray[data])') from None
    return ray


class ScoreActor:
    """One model replica: scores a batch of samples (one local-engine chunk) with errors skipped,
    giving the reason for each skipped one. The budgets are the driver's, passed in and set on the
    loaded model's encoder (the actor's own process): `media_budgets` (a MediaBudgets; None: the
    defaults) and the text budgets given as flags (`text_budgets`: TextBudgets fields; the others are
    the model's own)."""

    def __init__(self, model, device, dtype, mode, max_batch_tokens, permutations, media_dir,
                 media_budgets: MediaBudgets | None = None, text_budgets=None, verify=False):
        self.model = load_model(model, device=device, dtype=dtype, mode=mode, verify=verify)
        self.model.encoder.set_media_budgets(media_budgets or DEFAULT_MEDIA_BUDGETS)
        if text_budgets:
            self.model.encoder.set_text_budgets(**text_budgets)
        self.mode, self.max_batch_tokens, self.permutations = mode, max_batch_tokens, permutations
        self.media_dir = media_dir

    def __call__(self, batch: dict) -> dict:
        samples = [normalize(json.loads(raw)) for raw in batch["raw"]]  # pairwise records as the local engine scores them
        scores = self.model.score(samples, mode=self.mode, max_batch_tokens=self.max_batch_tokens,
                                  permutations=self.permutations, errors="skip", media_dir=self.media_dir)
        results = []
        for i, (sample, s) in enumerate(zip(samples, scores)):
            reason = skip_reason(self.model, sample, i, self.media_dir) if s is None else None
            results.append(json.dumps({"scores": None if s is None else [float(x) for x in s], "reason": reason}))
        return {"line": batch["line"], "result": results}


class RayScorer:
    """The local engine's per-chunk scoring call, served from a Ray Data stream of the samples still
    to score (`rows`: (line number, raw JSON) of every sample the driver will pass, in order)."""

    def __init__(self, rows: Iterable[tuple[int, bytes]], args, media_dir: str):
        ray = _require_ray()
        self._tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="mrrm-ray-", delete=False,
                                                encoding="utf-8")
        n = 0
        with self._tmp as fh:
            for lineno, raw in rows:
                fh.write(json.dumps({"line": lineno, "raw": raw.decode("utf-8")}) + "\n")
                n += 1
        self._results: Iterator = iter(())
        if n == 0:
            return
        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        actors = args.actors or (gpus if gpus else max(1, cpus - 1))
        media_budgets = media_budgets_from_args(args)  # the driver's flags, checked there already
        ds = ray.data.read_json(self._tmp.name, lines=True)
        ds = ds.map_batches(ScoreActor, batch_size=args.batch_size, concurrency=actors, batch_format="numpy",
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                            fn_constructor_kwargs=dict(model=args.model, device=args.device or ("cuda" if gpus else "cpu"),
                                                       dtype=args.dtype, mode=args.mode,
                                                       max_batch_tokens=args.max_batch_tokens,
                                                       permutations=args.permutations, media_dir=media_dir,
                                                       media_budgets=media_budgets,
                                                       text_budgets=text_budget_overrides(args),
                                                       verify=args.verify))
        self._results = iter(ds.iter_rows())

    def __call__(self, chunk: list[tuple[int, dict]]) -> list[tuple[list[float] | None, str | None]]:
        out = []
        for lineno, _ in chunk:
            row = next(self._results, None)
            if row is None or int(row["line"]) != lineno:
                got = "the end of the results" if row is None else f"line {int(row['line'])}"
                raise RuntimeError(f"the Ray engine returned {got} where line {lineno} was expected")
            result = json.loads(row["result"])
            out.append((result["scores"], result["reason"]))
        return out

    def close(self) -> None:
        try:
            os.unlink(self._tmp.name)
        except OSError:
            pass


__all__ = ["RayScorer", "ScoreActor"]
