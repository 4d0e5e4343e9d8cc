"""RL frameworks driving mrrm through their OWN code, as released (installed --no-deps in the test
setup: requirements-rl-nodeps.txt; only ray and vllm, which a CPU test cannot start, are stubbed:
tests/rl_stubs.py).

OpenRLHF 0.11: `RolloutRayActor.generate_responses` gathers `num_samples` rollouts of one prompt,
each through `SingleTurnAgentExecutor.execute`, which posts ONE query per request to
`--reward.remote_url`. With `mrrm.serve --group-size 4` the four requests of a prompt are scored
together: their rewards equal mrrm's joint scoring of the four (canonical order), also with the token
in the URL, a left-truncated prompt and an image prompt whose image comes from the label.

veRL 0.9: its `RewardLoopWorker`, built from its own Hydra config with the README's lines, calls
`mrrm.grpo.compute_score_row` once per rollout; the rows of a prompt are scored together, and the
rewards equal joint scoring of each group, whatever the order of the batch.
"""
import asyncio
import importlib
from types import SimpleNamespace

import httpx
import pytest
import rl_stubs
from model_fixtures import build_family, rgb_image
from serving import running

import mrrm
from mrrm.rl.grpo import canonical_order
from mrrm.rl.serve import create_app

rl_stubs.install(["ray", "vllm"])  # before any framework import: both import ray at the top
openrlhf = pytest.importorskip("openrlhf", reason="installed by .ci/run: pip install --no-deps -r requirements-rl-nodeps.txt")
verl = pytest.importorskip("verl", reason="installed by .ci/run: pip install --no-deps -r requirements-rl-nodeps.txt")
TOL = dict(rel=1e-4, abs=1e-6)
TOKEN = "rl-token"


@pytest.fixture(scope="module")
def family():
    return build_family("qwen2_vl")


@pytest.fixture(scope="module")
def openrlhf_rollout():
    """OpenRLHF's rollout actor class (ray / vllm stubbed) and its single-turn executor."""
    vllm_engine = importlib.import_module("openrlhf.trainer.ray.vllm_engine")
    agent = importlib.import_module("openrlhf.utils.agent")
    return rl_stubs.actor_class(vllm_engine.RolloutRayActor), agent.SingleTurnAgentExecutor


class CannedEngine:
    """Stands in for vLLM's engine: each call returns the next canned answer's token ids + EOS (vLLM
    keeps the stop token in token_ids)."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, iter(answers)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        text = next(self.answers)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, text=text, finish_reason="stop", logprobs=None)])


def rollout(openrlhf_rollout, url, tokenizer, prompt, answers, *, label=None, max_length=1024, images=None,
            hf_tokenizer=None):
    """OpenRLHF's own path: generate_responses -> execute x num_samples -> one POST each."""
    actor_cls, executor_cls = openrlhf_rollout
    actor = actor_cls.__new__(actor_cls)  # RolloutRayActor.__init__ starts vLLM; set what it would set
    actor.executor = executor_cls(url)
    actor.generate = CannedEngine(tokenizer, answers).generate
    params = SimpleNamespace(max_tokens=None, logprobs=None)
    kwargs = dict(images=images) if images is not None else {}
    outs = asyncio.run(actor.generate_responses(prompt=prompt, label=label, sampling_params=params,
                                                max_length=max_length, hf_tokenizer=hf_tokenizer or tokenizer,
                                                num_samples=len(answers), **kwargs))
    return [o["reward"] for o in outs]


def joint_rewards(model, user, answers, **media):
    distinct = canonical_order(answers)
    scores = dict(zip(distinct, mrrm.score({"prompt": user, "responses": distinct, **media}, model)[0]))
    return [scores[a] for a in answers]


def chat(tokenizer, content):
    # what OpenRLHF's PromptDataset does with --data.apply_chat_template
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def test_openrlhf_group_of_four_scored_together(family, openrlhf_rollout):
    model, tok = family.model, family.model.tokenizer
    answers = ["4", "Four.", "It is 4", "5"]
    app = create_app(model, group_size=4, group_timeout=30)
    with running(app) as url:
        got = rollout(openrlhf_rollout, f"{url}/get_reward", tok, chat(tok, "What is 2+2?"), answers, label="4")
        health = app.app.state.server.health()
        assert health["groups"] == 1 and health["groups_failed"] == 0
        assert app.app.state.batcher.counters["passes"] == 1
    want = joint_rewards(model, "What is 2+2?", answers)
    assert got == [[pytest.approx(w, **TOL)] for w in want]  # OpenRLHF reads a 1-element list per query
    alone = mrrm.score({"prompt": "What is 2+2?", "responses": [answers[0]]}, model)[0][0]
    assert abs(alone - want[0]) > 1e-3  # scoring one at a time would have given something else


def test_openrlhf_several_reward_urls(family, openrlhf_rollout):
    """OpenRLHF with two --reward.remote_url (round-robin per request). Both naming one front server (the
    documented setup; its --replicas carry the load): the joint rewards. Naming two separate servers, each
    sees half of every group: no reward at all (each server's 504 says why), never a half-group's."""
    model, tok = family.model, family.model.tokenizer
    answers = ["4", "Four.", "It is 4", "5"]
    app = create_app(model, group_size=4, group_timeout=30)
    with running(app) as url:
        other_name = url.replace("127.0.0.1", "localhost")
        got = rollout(openrlhf_rollout, [f"{url}/get_reward", f"{other_name}/get_reward"], tok,
                      chat(tok, "What is 2+2?"), answers)
    assert got == [[pytest.approx(w, **TOL)] for w in joint_rewards(model, "What is 2+2?", answers)]

    apps = [create_app(model, group_size=4, group_timeout=1) for _ in range(2)]
    with running(apps[0]) as url0, running(apps[1]) as url1:
        got = rollout(openrlhf_rollout, [f"{url0}/get_reward", f"{url1}/get_reward"], tok, chat(tok, "What is 2+2?"),
                      answers)
        health = [httpx.get(f"{u}/health").json() for u in (url0, url1)]
    assert got == [None] * 4
    assert [h["groups_timed_out"] for h in health] == [1, 1] and [h["groups_failed"] for h in health] == [1, 1]


def test_openrlhf_token_in_the_url(family, openrlhf_rollout):
    model, tok = family.model, family.model.tokenizer
    answers = ["blue", "red"]
    app = create_app(model, group_size=2, token=TOKEN)
    with running(app) as url:
        got = rollout(openrlhf_rollout, f"{url}/t/{TOKEN}/get_reward", tok, chat(tok, "Name a colour."), answers)
        jobs = app.app.state.batcher.counters["requests"]
    assert got == [[pytest.approx(w, **TOL)] for w in joint_rewards(model, "Name a colour.", answers)]
    assert jobs == 1  # both requests, one group


def test_openrlhf_left_truncated_prompt(family, openrlhf_rollout):
    """max_length leaves too little room: OpenRLHF cuts the prompt's tokens at the left, so its query no
    longer starts with the prompt; the rewards are those of the whole prompt."""
    model, tok = family.model, family.model.tokenizer
    question = "Please read the following carefully. " * 6 + "What is 2+2?"
    prompt = chat(tok, question)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answers = ["4", "5"]
    app = create_app(model, group_size=2)
    with running(app) as url:
        got = rollout(openrlhf_rollout, f"{url}/get_reward", tok, prompt, answers, max_length=n_prompt - 10)
    assert got == [[pytest.approx(w, **TOL)] for w in joint_rewards(model, question, answers)]


def test_openrlhf_image_prompt_with_the_image_in_the_label(family, openrlhf_rollout, tmp_path):
    """A VLM rollout: OpenRLHF tokenizes with the processor (expanded image pads in the query) and sends
    no image; the dataset's label field carries the image path under --media-root."""
    model, tok = family.model, family.model.tokenizer
    img = rgb_image(11)
    img.save(tmp_path / "cat.png")
    content = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    prompt = model.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
    assert "<|image_pad|>" in prompt
    answers = ["a cat", "a dog"]
    app = create_app(model, group_size=2, media_root=tmp_path)
    with running(app) as url:
        got = rollout(openrlhf_rollout, f"{url}/get_reward", tok, prompt, answers, label={"images": ["cat.png"]},
                      images=[str(tmp_path / "cat.png")], hf_tokenizer=model.processor)
    assert got == [[pytest.approx(w, **TOL)] for w in joint_rewards(model, "What is shown?", answers, image=img)]


# --------------------------------------------------------------------------------------------------
# veRL 0.9.1
# --------------------------------------------------------------------------------------------------
VERL_QUESTIONS = ["What is 2+2?", "Name a colour."]
VERL_ANSWERS = [["4", "four", "It is 4", "5"], ["red", "blue", "a colour", "red"]]


def verl_worker(tmp_path, model, n):
    """veRL's RewardLoopWorker from its own Hydra config with the README's reward lines."""
    import os

    from hydra import compose, initialize_config_dir
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    model.save_pretrained(tmp_path / "rm")
    model.tokenizer.save_pretrained(tmp_path / "policy")
    overrides = [f"actor_rollout_ref.model.path={tmp_path / 'policy'}", f"actor_rollout_ref.rollout.n={n}",
                 "reward.num_workers=1",
                 "reward.custom_reward_function.path=pkg://mrrm.grpo",
                 "reward.custom_reward_function.name=compute_score_row",
                 f"+reward.custom_reward_function.reward_kwargs.model={tmp_path / 'rm'}",
                 "+reward.custom_reward_function.reward_kwargs.device=cpu",
                 "+reward.custom_reward_function.reward_kwargs.group_size=${actor_rollout_ref.rollout.n}"]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    return RewardLoopWorker(config)


def verl_batch(tok, rows, step=0):
    """A batch as veRL's agent loop hands it over: [prompt | response + EOS, right-padded], one row per
    rollout; the dataset's extra_info carries the prompt (README: veRL)."""
    import numpy as np
    import torch
    from tensordict import TensorDict
    from verl import DataProto

    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q, _ in rows]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    resp = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in rows]
    P, R, n = max(map(len, prompt_ids)), max(map(len, resp)), len(rows)
    prompt_t = torch.full((n, P), tok.pad_token_id)
    responses = torch.full((n, R), tok.pad_token_id)
    attn = torch.zeros(n, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, resp)):
        prompt_t[i, P - len(p):] = torch.tensor(p)  # prompts are left-padded, responses right-padded
        responses[i, :len(r)] = torch.tensor(r)
        attn[i, P - len(p):P + len(r)] = 1
    batch = TensorDict({"prompts": prompt_t, "responses": responses, "attention_mask": attn,
                        "input_ids": torch.cat([prompt_t, responses], 1)}, batch_size=n)

    def column(values):
        out = np.empty(n, dtype=object)
        out[:] = values
        return out
    return DataProto(batch=batch, non_tensor_batch={
        "data_source": column(["mrrm_demo"] * n),
        "reward_model": column([{"ground_truth": "", "style": "model"} for _ in rows]),
        "extra_info": column([{"prompt": q, "uid": f"step{step}-q{VERL_QUESTIONS.index(q)}"} for q, _ in rows]),
        "uid": column([f"uid-{VERL_QUESTIONS.index(q)}" for q, _ in rows]),
        "raw_prompt": column([[{"role": "user", "content": q}] for q, _ in rows])})


def test_verl_reward_loop_scores_each_prompts_rollouts_together(family, tmp_path):
    model, tok = family.model, family.model.tokenizer
    worker = verl_worker(tmp_path, model, n=4)
    rows = [(q, a) for j in range(4) for q, answers in zip(VERL_QUESTIONS, VERL_ANSWERS) for a in [answers[j]]]
    want = {q: dict(zip(answers, joint_rewards(model, q, answers))) for q, answers in zip(VERL_QUESTIONS, VERL_ANSWERS)}
    for step, order in enumerate((list(range(8)), [7, 2, 5, 0, 3, 6, 1, 4])):
        batch = [rows[i] for i in order]
        outs = worker.loop.run_until_complete(worker.compute_score_batch(verl_batch(tok, batch, step)))
        for (q, a), out in zip(batch, outs):
            assert out["reward_score"] == pytest.approx(want[q][a], **TOL), (q, a)
            assert out["reward_extra_info"]["mrrm_group_size"] == 4
    from mrrm.rl.grpo import _ROW_ASSEMBLERS
    (assembler,) = _ROW_ASSEMBLERS[worker.loop].values()  # one set of reward options in this loop
    assert assembler.counters["groups"] == 4 and assembler.counters["groups_failed"] == 0  # 2 batches x 2 prompts


@pytest.mark.slow
def test_verl_eight_reward_workers_on_ray_share_one_assembler(tmp_path):
    """veRL's default reward.num_workers=8 on a REAL local Ray (tests/verl_ray_run.py, a subprocess: this
    module stubs ray): veRL's RewardLoopManager starts the 8 worker actors and its agent loop code sends
    each rollout to a random one. With compute_score_row every worker forwards to the one named assembler
    actor: rewards equal joint scoring of each group. The same run with assembler=local (each worker on its
    own) fails with GroupIncomplete instead of scoring fragments."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "verl_ray_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--assemblers", "auto:60,local:5"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    shared, alone = result["auto"], result["local"]
    assert shared["workers"] == 8 and "error" not in shared, shared.get("error")
    assert any(name.startswith("mrrm-group-assembler-") for name in shared["actors"])
    for (q, a), reward, size in zip(result["rows"], shared["rewards"], shared["group_sizes"]):
        assert reward == pytest.approx(result["want"][q][a], **TOL), (q, a)
        assert size == 4
    assert alone["workers"] == 8 and "GroupIncomplete" in alone["error"] and "the Ray assembler" in alone["error"]
