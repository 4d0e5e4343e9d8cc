"""The Hugging Face Hub, in and out, through huggingface_hub's own download, cache and upload.

    resolve("org/name", revision="v1")  -> a local snapshot directory (huggingface_hub's cache)
    push_to_hub(model, "org/name", layout="mrrm" | "reference")  -> the commit URL

The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`) unless given;
HF_HUB_OFFLINE=1 and HF_HUB_CACHE / HF_HOME are honoured as huggingface_hub honours them. On the
command line a revision is written `--model org/name@revision`.
"""
from __future__ import annotations

import os
import re
import tempfile

from mrrm.model.parts import unwrap

# owner/name as the Hub spells repository ids (letters, digits, "-", "_", "."), with an optional @revision
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")


def split_hub_id(spec: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) for a Hub id ("org/name" or "org/name@revision"), else None."""
    m = _HUB_ID.match(spec) if isinstance(spec, str) else None
    if m is None or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("revision")


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError("loading or pushing a Hub id needs huggingface_hub: pip install huggingface_hub "
                          "(it comes with transformers, the model extra)") from e
    return huggingface_hub


def resolve(path_or_id, *, revision: str | None = None, token=None) -> str:
    """A local directory holding `path_or_id`: the directory itself, or the snapshot of a Hub id
    downloaded (or found in the cache) by huggingface_hub.snapshot_download. Raises FileNotFoundError
    for something that is neither (a missing path), and naming the fix for an id that is not on the
    Hub or, offline, not in the cache."""
    spec = os.fspath(path_or_id)
    if os.path.isdir(spec):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids; {spec!r} is a local directory")
        return spec
    parts = split_hub_id(spec)
    if parts is None:
        raise FileNotFoundError(f"{spec!r} is neither a directory nor a Hub id (org/name, or org/name@revision): "
                         "give an mrrm checkpoint, a checkpoint in the authors' layout, or a Hub model id")
    repo, at = parts
    if at is not None and revision is not None and at != revision:
        raise ValueError(f"{spec!r} names revision {at!r} but revision={revision!r} was given; give one")
    revision = revision or at
    hub = _hub()
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hub.snapshot_download(repo, revision=revision, token=token)
    except GatedRepoError as e:
        raise PermissionError(f"{repo}: gated on the Hub; accept its terms on the Hub and log in "
                              "(`hf auth login`, or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo}: no revision {revision!r} on the Hub") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo}: no such model on the Hub, or it is private (log in with `hf auth login` "
                                "or set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        offline = hub.constants.HF_HUB_OFFLINE
        raise FileNotFoundError(
            f"{repo}{'@' + revision if revision else ''}: not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the Hub could not be reached")
            + ": download it once where the Hub is reachable (`hf download " + repo + "`), point HF_HUB_CACHE at a "
            "cache that holds it, or give a local directory") from e


def model_card(model, repo_id: str, layout: str, evaluation=None) -> str:
    """README.md for the Hub: base model, head, representation, video sampling, how it was trained
    (config.training, written by mrrm.train), evaluation tables (the training's held-out evaluation and
    any mrrm.eval metrics given), and how to load it with mrrm and with the authors' code."""

    cfg = model.config
    base = unwrap(model.backbone)
    lines = ["---", "library_name: mrrm", "tags: [reward-model, multi-response-reward-model, mrrm]"]
    if cfg.base_model and split_hub_id(cfg.base_model):
        lines.append(f"base_model: {cfg.base_model}")
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              "A multi-response reward model: the N candidate responses to one prompt (with images or video) are "
              "scored in one forward pass (\"You Only Judge Once\", arXiv 2604.10966).", "", "## Model", "",
              "| | |", "|---|---|",
              f"| backbone | `{base.config.model_type}`" + (f", base `{cfg.base_model}`" if cfg.base_model else "") + " |",
              f"| value head | {cfg.value_head_type}"
              + (f", hidden {cfg.value_head_hidden_dim or 'input size'}, {cfg.value_head_activation}"
                 if cfg.value_head_type == "mlp" else "") + " |",
              f"| response representation | `{cfg.resp_repr_mode}`"
              + ("" if cfg.final_norm else " (last layer before the final norm)") + " |",
              f"| video sampling | `{cfg.video_sampling}` |",
              f"| files | {'mrrm layout' if layout == 'mrrm' else 'the authors layout (reward_model_config.json, value_head.pt)'} |",
              "", "## Training", ""]
    training = cfg.training or {}
    if training:
        lines += ["```bash", training.get("command", "(command not recorded)"), "```", ""]
        data = training.get("data")
        if data:
            lines += ["Data: " + ", ".join(f"`{d}`" for d in data), ""]
    else:
        lines += ["Not recorded (trained outside `python -m mrrm.train`, or loaded from another layout).", ""]
    tables = []
    if training.get("eval"):
        ev = training["eval"]
        rows = [f"| held-out (all) | {ev['best_of_n'] * 100:.1f}% |"]
        rows += [f"| {k} | {v * 100:.1f}% |" for k, v in ev.get("per_family", {}).items()]
        tables.append(("Held-out best-of-N accuracy (training's evaluation, "
                       f"{ev.get('n', '?')} samples)", ["| set | best-of-N |", "|---|---|"] + rows))
    for i, result in enumerate(_evaluations(evaluation)):
        rows = [f"| {k} | {v:.4g} |" for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if rows:
            tables.append((result.get("benchmark", f"evaluation {i + 1}") if isinstance(result.get("benchmark"), str)
                           else f"evaluation {i + 1}", ["| metric | value |", "|---|---|"] + rows))
    if tables:
        lines += ["## Evaluation", ""]
        for title, rows in tables:
            lines += [f"{title}:", "", *rows, ""]
    lines += ["## Usage", "", "With mrrm:", "", "```python", "import mrrm", "",
              f"model = mrrm.load(\"{repo_id}\")", "model.score({\"prompt\": \"What is shown?\", \"image\": \"cat.png\",",
              "             \"responses\": [\"a cat\", \"a dog\"]})", "```", ""]
    if layout == "reference":
        lines += ["With the authors' code (github `yinuoyang01/multi-response-rm`, their README's inference): load the "
                  "processor and `AutoModelForImageTextToText` from this repository, build `MultiResponseRewardModel` "
                  "from `reward_model_config.json` and load `value_head.pt`.", ""]
    else:
        lines += ["The authors' code (github `yinuoyang01/multi-response-rm`) loads the files that "
                  "`model.save_pretrained(dir, layout=\"reference\")` writes; this repository holds mrrm's layout.", ""]
    return "\n".join(lines)


def _evaluations(evaluation):
    """mrrm.eval results: dicts, or paths of metrics.json files; a single one or a list."""
    import json

    if evaluation is None:
        return []
    items = evaluation if isinstance(evaluation, (list, tuple)) else [evaluation]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            with open(item) as f:
                item = json.load(f)
        if not isinstance(item, dict):
            raise ValueError(f"evaluation: expected mrrm.eval metrics (a dict or a metrics.json path), got {type(item).__name__}")
        out.append(item)
    return out


def push_to_hub(model, repo_id: str, *, layout: str = "mrrm", token=None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, evaluation=None) -> str:
    """Save `model` in `layout` with a model card (README.md) and upload it as one commit to `repo_id`
    (created when missing) with huggingface_hub. Returns the commit's URL."""
    if layout not in ("mrrm", "reference"):
        raise ValueError(f"layout must be 'mrrm' or 'reference', got {layout!r}")
    parts = split_hub_id(repo_id)
    if parts is None or parts[1] is not None:
        raise ValueError(f"repo_id must be a Hub id 'org/name' (revision= for a branch), got {repo_id!r}")
    hub = _hub()
    card = model_card(model, repo_id, layout, evaluation)
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mrrm-push-") as folder:
        model.save_pretrained(folder, layout=layout)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or f"Upload reward model ({layout} layout) with mrrm")
    return info.commit_url
