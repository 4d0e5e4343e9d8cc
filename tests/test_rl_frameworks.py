"""RL frameworks driving mrrm.serve through their OWN client code, as released (installed --no-deps in
the test setup; only ray and vllm, which a CPU test cannot start, are stubbed: tests/rl_stubs.py).

OpenRLHF 0.11: `RolloutRayActor.generate_responses` gathers `num_samples` rollouts of one prompt,
each through `SingleTurnAgentExecutor.execute`, which posts ONE query per request to
`--reward.remote_url`. With `mrrm.serve --group-size 4` the four requests of a prompt are scored
together: their rewards equal mrrm's joint scoring of the four (canonical order), also with the token
in the URL, a left-truncated prompt and an image prompt whose image comes from the label.
"""
import asyncio
import importlib
from types import SimpleNamespace

import pytest
import rl_stubs
from model_fixtures import build_family, rgb_image
from serving import running

import mrrm
from mrrm.grpo import canonical_order
from mrrm.serve import create_app

openrlhf = pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")
TOL = dict(rel=1e-4, abs=1e-6)
TOKEN = "rl-token"


@pytest.fixture(scope="module")
def family():
    return build_family("qwen2_vl")


@pytest.fixture(scope="module")
def openrlhf_rollout():
    """OpenRLHF's rollout actor class (ray / vllm stubbed) and its single-turn executor."""
    rl_stubs.install(["ray", "vllm"])
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
        assert app.app.state.assembler.counters == {"groups": 1, "groups_timed_out": 0}
        assert app.app.state.batcher.counters["passes"] == 1
    want = joint_rewards(model, "What is 2+2?", answers)
    assert got == [[pytest.approx(w, **TOL)] for w in want]  # OpenRLHF reads a 1-element list per query
    alone = mrrm.score({"prompt": "What is 2+2?", "responses": [answers[0]]}, model)[0][0]
    assert abs(alone - want[0]) > 1e-3  # scoring one at a time would have given something else


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
