"""Hub ids in and out, through huggingface_hub's real code: uploads and downloads go to a local stand-in
of the Hub's HTTP endpoints on loopback (tests/hub_server.py), the offline cases read the cache those
downloads populated with HF_HUB_OFFLINE=1. Each scenario runs in a fresh interpreter, because
huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hub_server import HubStandIn

from mrrm.model.hub import split_hub_id

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "reference_env")
CHECKPOINT = os.path.join(FIXTURES, "checkpoints", "qwen2_vl_merged")
SAMPLE = {"prompt": "What colour is the square?", "image": os.path.join(FIXTURES, "media", "images", "red_square.png"),
          "responses": ["red.", "blue\n"]}


def run(code: str, env: dict) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object last."""
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    full_env.pop("HF_HUB_OFFLINE", None) if "HF_HUB_OFFLINE" not in env else None
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_ids_are_told_apart_from_paths():
    assert split_hub_id("yinuoy/MR2-Molmo2-4B-RM") == ("yinuoy/MR2-Molmo2-4B-RM", None)
    assert split_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for bad in ("name", "org/name/extra", "../x", "org/..", "org/name@", "/abs/path", "org/ name"):
        assert split_hub_id(bad) is None, bad


def test_neither_a_directory_nor_a_hub_id_is_a_clear_error(tmp_path):
    import mrrm
    from mrrm.model.api import load_model

    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hub id"):
        mrrm.load(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="neither a directory .* nor a Hugging Face Hub id"):
        load_model(str(tmp_path / "missing" / "dir"), device="cpu")
    with pytest.raises(ValueError, match="revision='v2' applies to Hub ids"):
        mrrm.load(CHECKPOINT, revision="v2")
    with pytest.raises(ValueError, match="names revision 'v1' but revision='v2'"):
        mrrm.load("org/name@v1", revision="v2")


@pytest.mark.slow
def test_push_to_hub_then_load_by_id_online_and_offline(tmp_path):
    cache = str(tmp_path / "hf-cache")
    with HubStandIn() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": cache, "HF_TOKEN": "hf_standin_token"}
        online = run(f"""
            import json, mrrm
            from mrrm.model.api import load_model
            model = mrrm.load({CHECKPOINT!r})
            local = model.score({SAMPLE!r})[0]
            url = model.push_to_hub("org/rm", layout="reference")
            model.push_to_hub("org/rm-mrrm")
            first = url.rsplit("/", 1)[-1]
            with open({CHECKPOINT!r} + "/value_head.pt", "rb") as f:
                pass
            by_id = mrrm.load("org/rm").score({SAMPLE!r})[0]
            by_mrrm_id = mrrm.load("org/rm-mrrm").score({SAMPLE!r})[0]
            pinned = load_model("org/rm@" + first, device="cpu").score({SAMPLE!r})[0]
            errors = {{}}
            for name, spec in (("missing", "org/nothing-here"), ("revision", "org/rm@v9")):
                try:
                    mrrm.load(spec)
                except FileNotFoundError as e:
                    errors[name] = str(e)
            print(json.dumps(dict(local=local, by_id=by_id, by_mrrm_id=by_mrrm_id, pinned=pinned, url=url,
                                  errors=errors)))
        """, env)
        files = set(hub.repos["org/rm"][-1][1])
        card = hub.repos["org/rm"][-1][1]["README.md"].decode()
        mrrm_files = set(hub.repos["org/rm-mrrm"][-1][1])
    assert {"README.md", "config.json", "model.safetensors", "value_head.pt", "reward_model_config.json"} <= files
    assert {"README.md", "mrrm_config.json", "value_head.safetensors"} <= mrrm_files
    assert "| value head | mlp, hidden 24, silu |" in card and "| video sampling | `reference` |" in card
    assert 'mrrm.load("org/rm")' in card and "the authors' code" in card.lower()
    for key in ("by_id", "by_mrrm_id", "pinned"):
        assert max(abs(a - b) for a, b in zip(online[key], online["local"])) <= 1e-6, key
    assert "no such model on the Hub" in online["errors"]["missing"]
    assert "no revision 'v9'" in online["errors"]["revision"]

    # offline: the cache the downloads populated serves the id; an id it lacks is a clear error
    offline = run(f"""
        import json, mrrm
        got = mrrm.load("org/rm").score({SAMPLE!r})[0]
        try:
            mrrm.load("org/never-downloaded")
            error = None
        except FileNotFoundError as e:
            error = str(e)
        print(json.dumps(dict(got=got, error=error)))
    """, {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert max(abs(a - b) for a, b in zip(offline["got"], online["local"])) <= 1e-6
    assert "org/never-downloaded: not in the Hugging Face cache" in offline["error"]
    assert "HF_HUB_OFFLINE is set" in offline["error"] and "hf download org/never-downloaded" in offline["error"]


def test_model_card_from_a_training_record():
    import mrrm
    from mrrm.model.hub import model_card

    model = mrrm.load()
    model.config.training = {"command": "python -m mrrm.train --data a.jsonl --max-steps 10", "data": ["a.jsonl"],
                             "steps": 10, "eval": {"best_of_n": 0.5, "n": 4, "per_family": {"colour": 0.75}}}
    card = model_card(model, "org/tiny", "mrrm", evaluation={"benchmark": "vl_rewardbench", "accuracy": 0.61})
    assert "python -m mrrm.train --data a.jsonl --max-steps 10" in card and "Data: `a.jsonl`" in card
    assert "| held-out (all) | 50.0% |" in card and "| colour | 75.0% |" in card
    assert "vl_rewardbench:" in card and "| accuracy | 0.61 |" in card
    with pytest.raises(ValueError, match="layout must be"):
        model.push_to_hub("org/tiny", layout="published")
    with pytest.raises(ValueError, match="repo_id must be a Hub id"):
        model.push_to_hub("not an id")
