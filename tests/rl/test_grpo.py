"""mrrm.grpo: the TRL reward function and the veRL batch adapter.

* a real trl.GRPOTrainer run on the CPU (tiny Qwen2 policy from a config, tokenizer built offline,
  num_generations=4, 2 steps) whose logged rewards equal direct mrrm.score of the same groups;
* grouping by prompt content: interleaved, shuffled, duplicated and (in independent mode) split
  groups score as whole ordered groups; chats, images, empty completions;
* veRL's compute_score loaded as a standalone file, the way veRL loads custom_reward_function.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import time
from pathlib import Path

import pytest
import torch
from model_fixtures import build_family, rgb_image

import mrrm
from mrrm.rl.grpo import RewardFunction, canonical_order, completion_text, compute_score, prompt_text

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rel=1e-4, abs=1e-6)  # packing differs between the two sides, hence the rounding

PROMPTS = ["What is shown in the image?", "How many dots are there?", "Which colour is the circle?"]
COMPLETIONS = [
    ["a red circle", "a blue square", "two dots", "the sky"],
    ["three", "five dots", "there are nine dots", "one"],
    ["green", "it is red", "yellow circle", "blue"],
]


@pytest.fixture(scope="module")
def fam():
    return build_family("qwen2_vl")


@pytest.fixture(scope="module")
def reward_model(fam):
    return fam.model


def sha_order(texts):
    """The documented canonical order, derived here independently of mrrm.grpo."""
    return sorted(set(texts), key=lambda t: hashlib.sha256(t.encode()).hexdigest())


def expected(model, rows, mode="joint", image_of=None):
    """Direct mrrm.score of whole groups: rows (prompt, completion) grouped by prompt, each group's
    distinct non-empty completions in canonical order; -> one reward (or None) per row."""
    groups = {}
    for p, c in rows:
        groups.setdefault(p, []).append(c)
    keys = list(groups)
    samples = []
    for p in keys:
        s = {"prompt": p, "responses": sha_order([c for c in groups[p] if c])}
        if image_of is not None:
            s["image"] = image_of[p]
        samples.append(s)
    scores = mrrm.score(samples, model, mode=mode)
    table = {p: dict(zip(s["responses"], sc)) for p, s, sc in zip(keys, samples, scores)}
    return [table[p].get(c) for p, c in rows]


def assert_rewards(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g == pytest.approx(w, **TOL)


def flat_rows():
    return [(p, c) for p, cs in zip(PROMPTS, COMPLETIONS) for c in cs]


# --------------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------------


def test_whole_ordered_groups_match_direct_score(reward_model):
    rows = flat_rows()
    rf = RewardFunction(reward_model)
    got = rf([p for p, _ in rows], [c for _, c in rows])
    assert_rewards(got, expected(reward_model, rows))
    assert rf.__name__ == "mrrm"
    # joint scores depend on the group: the last completion in canonical order, scored alone, differs
    last = sha_order(COMPLETIONS[0])[-1]
    alone = mrrm.score({"prompt": PROMPTS[0], "responses": [last]}, reward_model)[0][0]
    assert abs(alone - got[COMPLETIONS[0].index(last)]) > 1e-4


def test_shuffled_interleaved_and_duplicated_groups(reward_model):
    rows = flat_rows()
    rf = RewardFunction(reward_model)
    whole = dict(zip(rows, rf([p for p, _ in rows], [c for _, c in rows])))
    shuffled = rows + [rows[1], rows[6]]  # duplicates share their completion's reward
    random.Random(3).shuffle(shuffled)
    got = rf([p for p, _ in shuffled], [c for _, c in shuffled])
    assert_rewards(got, [whole[r] for r in shuffled])


def test_split_groups_across_calls_independent_mode(reward_model):
    """In independent mode a response's score does not depend on the others: a group split over
    two calls scores as the whole group (and as mode='single', the conventional reward model)."""
    rows = flat_rows()
    random.Random(5).shuffle(rows)
    rf = RewardFunction(reward_model, mode="independent")
    half = len(rows) // 2
    split = rf([p for p, _ in rows[:half]], [c for _, c in rows[:half]]) + \
        rf([p for p, _ in rows[half:]], [c for _, c in rows[half:]])
    whole = rf([p for p, _ in rows], [c for _, c in rows])
    assert_rewards(split, whole)
    assert_rewards(whole, expected(reward_model, rows, mode="single"))


def _rank_worker(rank, world, init_file, model, rows, out_dir):
    """One rank of a gloo group (a forked process): scores its half of the rows with RewardFunction."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rf = RewardFunction(model)
        mine = rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]
        out = rf([p for p, _ in mine], [c for _, c in mine])
        Path(out_dir, f"{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_groups_split_across_ranks_score_whole(reward_model, tmp_path):
    """Two processes (gloo), each holding half of the batch, a group split between them (as TRL
    distributes completions): every rank's rewards equal whole-group scoring."""
    import json

    import torch.multiprocessing as mp

    rows = flat_rows()
    random.Random(7).shuffle(rows)
    halves = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    assert {p for p, _ in halves[0]} & {p for p, _ in halves[1]}  # some group really is split
    ctx = mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), reward_model, rows, str(tmp_path)),
                             nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    got = json.loads((tmp_path / "0.json").read_text()) + json.loads((tmp_path / "1.json").read_text())
    assert_rewards(got, expected(reward_model, rows))
    # without the gather, the split groups would have scored differently
    alone = RewardFunction(reward_model)([p for p, _ in halves[0]], [c for _, c in halves[0]])
    assert any(abs(a - g) > 1e-4 for a, g in zip(alone, got))


def test_conversational_format_matches_plain(reward_model):
    rows = flat_rows()
    rf = RewardFunction(reward_model)
    plain = rf([p for p, _ in rows], [c for _, c in rows])
    chat_prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}] for p, _ in rows]
    chat_completions = [[{"role": "assistant", "content": c}] for _, c in rows]
    assert_rewards(rf(chat_prompts, chat_completions), plain)
    # TRL's multimodal layout: content blocks
    blocks = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p, _ in rows]
    assert_rewards(rf(blocks, [c for _, c in rows]), plain)
    assert prompt_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "q2"}]) == "user: q\nassistant: a\nuser: q2"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]) == "x"


def test_images_split_groups_by_content(reward_model):
    """The same prompt text with two different images is two groups; images come from the
    `image` column (one per row), from `images` (a list per row) or from chat image blocks."""
    red, noise = rgb_image(1), rgb_image(2)
    prompt = "What is shown in the image?"
    comps = ["a cat", "a dog", "noise", "a car"]
    rows = [(prompt, c) for c in comps] * 2
    imgs = [red] * 4 + [rgb_image(2)] * 4  # a different object with the same pixels as `noise`
    rf = RewardFunction(reward_model)
    got = rf([p for p, _ in rows], [c for _, c in rows], image=imgs)
    want = {}
    for key, im in (("red", red), ("noise", noise)):
        s = {"prompt": prompt, "responses": sha_order(comps), "image": im}
        want[key] = dict(zip(s["responses"], mrrm.score(s, reward_model)[0]))
    assert_rewards(got, [want["red"][c] for c in comps] + [want["noise"][c] for c in comps])
    assert got[0] != pytest.approx(got[4], **TOL)  # the image matters
    assert_rewards(rf([p for p, _ in rows], [c for _, c in rows], images=[[im] for im in imgs]), got)
    chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": prompt}]}]
             for im in imgs]
    assert_rewards(rf(chats, [c for _, c in rows]), got)


def test_empty_completion_is_none_and_left_out_of_its_group(reward_model):
    rows = [(PROMPTS[0], c) for c in ["a red circle", "", "two dots"]]
    got = RewardFunction(reward_model)([p for p, _ in rows], [c for _, c in rows])
    assert got[1] is None
    assert_rewards(got, expected(reward_model, rows))
    assert RewardFunction(reward_model)([PROMPTS[0]], [""]) == [None]


def test_canonical_order_is_sha256():
    texts = ["b", "a", "c", "a"]
    assert canonical_order(texts) == sha_order(texts)
    assert canonical_order(list(reversed(texts))) == canonical_order(texts)


def test_bad_arguments(reward_model):
    with pytest.raises(ValueError, match="mode"):
        RewardFunction(reward_model, mode="pairwise")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        RewardFunction(reward_model, max_batch_tokens=0)
    with pytest.raises(TypeError, match="model"):
        RewardFunction(42)
    rf = RewardFunction(reward_model)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rf(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="'image'"):
        rf(["a", "b"], ["x", "y"], image=[None])
    with pytest.raises(TypeError, match="prompt 1"):
        rf(["a", 7], ["x", "y"])
    with pytest.raises(TypeError, match="completion 0"):
        rf(["a"], [3.5])


# --------------------------------------------------------------------------------------------------
# A real GRPOTrainer run
# --------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps the reward function to capture what TRL hands it and what it returns."""

    __name__ = "mrrm"

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, prompts, completions, **kwargs):
        out = self.fn(prompts, completions, **kwargs)
        self.calls.append((list(prompts), list(completions), sorted(kwargs), list(out)))
        return out


def test_grpo_trainer_logs_mrrm_rewards(reward_model, tmp_path):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from mrrm.model import tiny

    tok = tiny.build_tokenizer()
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True))
    data = Dataset.from_dict({"prompt": PROMPTS + ["Describe the picture."]})
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=2,
                      max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to="none",
                      use_vllm=False, save_strategy="no", use_cpu=True, bf16=False, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True)
    recorder = Recorder(RewardFunction(reward_model))
    trainer = GRPOTrainer(model=policy, reward_funcs=[recorder], args=args, train_dataset=data, processing_class=tok)
    trainer.train()

    assert trainer.state.global_step == 2
    assert len(recorder.calls) == 2  # one generation batch per step
    logged_means = [h["rewards/mrrm/mean"] for h in trainer.state.log_history if "rewards/mrrm/mean" in h]
    assert len(logged_means) == 2
    for (prompts, completions, kw, out), logged in zip(recorder.calls, logged_means):
        assert len(prompts) == 8 and len(set(prompts)) == 2  # two groups of num_generations=4
        assert "completion_ids" in kw and "trainer_state" in kw
        rows = list(zip(prompts, completions))
        assert_rewards(out, expected(reward_model, rows))  # the rewards equal direct mrrm.score of the groups
        values = [v for v in out if v is not None]
        assert values and logged == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-6)
    # the per-completion rewards TRL keeps for its completions table: the last generation batch
    last_out = recorder.calls[-1][3]
    logged_rows = list(trainer._logs["rewards"]["mrrm"])
    assert len(logged_rows) == len(last_out)
    for lg, v in zip(logged_rows, last_out):
        assert math.isnan(lg) if v is None else lg == pytest.approx(v, rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# veRL
# --------------------------------------------------------------------------------------------------


def load_as_verl_does():
    """veRL's get_custom_reward_fn: importlib spec_from_file_location on custom_reward_function.path."""
    spec = importlib.util.spec_from_file_location("custom_module", str(REPO / "mrrm" / "grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_score


def verl_batch(rows, uids):
    n = len(rows)
    return dict(data_sources=["mrrm_demo"] * n, solution_strs=[c for _, c in rows], ground_truths=[None] * n,
                extra_infos=[{"uid": uids[p], "prompt": p, "index": k} for k, (p, _) in enumerate(rows)])


def test_verl_compute_score_groups_by_uid(reward_model):
    fn = load_as_verl_does()
    rows = flat_rows()
    random.Random(11).shuffle(rows)  # veRL reorders batches
    uids = {p: f"uid-{k}" for k, p in enumerate(PROMPTS)}
    got = fn(**verl_batch(rows, uids), model=reward_model)
    assert all(isinstance(x, float) for x in got)
    assert_rewards(got, expected(reward_model, rows))
    assert_rewards(compute_score(**verl_batch(rows, uids), model=reward_model), got)


def test_verl_chat_prompts_images_and_empty(reward_model, tmp_path):
    img = rgb_image(4)
    img.save(tmp_path / "pic.png")
    p = PROMPTS[0]
    rows = [(p, "a cat"), (p, ""), (p, "a dog")]
    batch = verl_batch(rows, {p: 0})
    for info in batch["extra_infos"]:
        info.update(prompt=[{"role": "user", "content": p}], image="pic.png")
    got = compute_score(**batch, model=reward_model, media_root=str(tmp_path))
    want = mrrm.score({"prompt": p, "responses": sha_order(["a cat", "a dog"]), "image": img}, reward_model)[0]
    want = dict(zip(sha_order(["a cat", "a dog"]), want))
    assert got[0] == pytest.approx(want["a cat"], **TOL) and got[2] == pytest.approx(want["a dog"], **TOL)
    assert got[1] == pytest.approx(min(got[0], got[2]))  # empty: the lowest score of its group by default
    assert compute_score(**batch, model=reward_model, media_root=str(tmp_path), empty_reward=-5.0)[1] == -5.0


def test_verl_bad_batches(reward_model):
    rows = flat_rows()[:4]
    uids = {PROMPTS[0]: 1}
    batch = verl_batch(rows, uids)
    batch["extra_infos"][2] = {"prompt": PROMPTS[0]}
    with pytest.raises(ValueError, match=r"extra_infos\[2\].*'uid'"):
        compute_score(**batch, model=reward_model)
    batch = verl_batch(rows, uids)
    batch["extra_infos"][3]["prompt"] = "another prompt"
    with pytest.raises(ValueError, match="uid 1 has two different prompts"):
        compute_score(**batch, model=reward_model)
    batch = verl_batch(rows, uids)
    batch["ground_truths"] = [None]
    with pytest.raises(ValueError, match="ground_truths has 1"):
        compute_score(**batch, model=reward_model)
    with pytest.raises(TypeError, match="unknown keyword"):
        compute_score(**verl_batch(rows, uids), model=reward_model, temperature=1.0)
    with pytest.raises(ValueError, match="mode"):
        compute_score(**verl_batch(rows, uids), model=reward_model, mode="best")


def test_compute_score_row_groups_rows_and_times_out(reward_model):
    """veRL 0.9's per-row function without veRL: rows awaited concurrently in one loop are scored as
    one group; a group short of group_size is scored as it is after group_timeout; bad kwargs refused."""
    import asyncio

    from mrrm.rl.grpo import GroupIncomplete, compute_score_row

    info = {"prompt": "Name a colour."}

    async def rows(answers, **kw):
        return await asyncio.gather(*(compute_score_row("src", a, "", dict(info), model=reward_model, **kw)
                                      for a in answers))

    full = asyncio.run(rows(["red", "blue", "green"], group_size=3))
    short = asyncio.run(rows(["red", "blue"], group_size=3, group_timeout=0.3, partial_groups="score"))
    with pytest.raises(GroupIncomplete, match="only 2 of the 3 rollouts"):  # the default: never a partial reward
        asyncio.run(rows(["red", "blue"], group_size=3, group_timeout=0.3))
    distinct = canonical_order(["red", "blue", "green"])
    want = dict(zip(distinct, mrrm.score({"prompt": "Name a colour.", "responses": distinct}, reward_model)[0]))
    assert [r["score"] for r in full] == [pytest.approx(want[a], rel=1e-5) for a in ("red", "blue", "green")]
    assert {r["mrrm_group_size"] for r in full} == {3} and {r["mrrm_group_size"] for r in short} == {2}
    two = canonical_order(["red", "blue"])
    want2 = dict(zip(two, mrrm.score({"prompt": "Name a colour.", "responses": two}, reward_model)[0]))
    assert [r["score"] for r in short] == [pytest.approx(want2[a], rel=1e-5) for a in ("red", "blue")]
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        asyncio.run(rows(["red"]))
    with pytest.raises(TypeError, match="unknown keyword"):
        asyncio.run(rows(["red"], group_size=1, groupsize=2))
    with pytest.raises(ValueError, match="'uid' and 'prompt'"):
        asyncio.run(compute_score_row("src", "red", "", {"question": "x"}, group_size=1, model=reward_model))


def test_compute_score_row_misconfigurations_raise_never_reward(reward_model):
    """veRL per-row calls: a uid shared by two prompts, more rollouts than group_size and a group short after
    the timeout each raise an error naming the cause; a validation row's extra_info group_size=1 is scored
    at once."""
    import asyncio

    from mrrm.rl.grpo import GroupConflict, GroupOverfull, compute_score_row

    async def rows(items, **kw):
        return await asyncio.gather(*(compute_score_row("src", a, "", dict(info), model=reward_model, **kw)
                                      for a, info in items), return_exceptions=True)

    shared = asyncio.run(rows([("red", {"prompt": "Name a colour.", "uid": 7}),
                               ("4", {"prompt": "What is 2+2?", "uid": 7})], group_size=2))
    assert all(isinstance(r, GroupConflict) for r in shared) and "one group id names two different prompts" in str(shared[0])
    eight = asyncio.run(rows([(a, {"prompt": "Name a colour."}) for a in "abcdefgh"], group_size=4))
    assert all(isinstance(r, GroupOverfull) for r in eight)  # the extra ones came before the first four were scored
    assert "4 expected, 5 within" in str(next(r for r in eight if isinstance(r, GroupOverfull)))
    assert "reward_kwargs.group_size" in str(next(r for r in eight if isinstance(r, GroupOverfull)))
    (val,) = asyncio.run(rows([("red", {"prompt": "Name a colour.", "group_size": 1})], group_size=8, group_timeout=600))
    assert val["mrrm_group_size"] == 1
    assert val["score"] == pytest.approx(mrrm.score({"prompt": "Name a colour.", "responses": ["red"]}, reward_model)[0][0],
                                         rel=1e-5)


def test_group_assembler_retries_rejects_and_windows():
    """GroupAssembler alone (a fake scorer): a retry after the group closed gets the same reward, a
    rejected rollout counts as an arrival and its retry is refused again, the closed group is forgotten
    after the window (the same prompt may come back in a later step)."""
    import asyncio

    from mrrm.rl.grpo import GroupAssembler, RolloutRejected

    calls = []

    async def score(group):
        calls.append(list(group["responses"]))
        return [float(len(r)) for r in group["responses"]]

    async def go():
        a = GroupAssembler(score, group_size=3, group_timeout=5, window=0.3)
        got = await asyncio.gather(a.add("k", {}, ["a"]), a.add("k", {}, ["bb"]),
                                   asyncio.sleep(0.05, a.reject("k", {}, "x\ud800", "bad text")))
        again = await a.add("k", {}, ["bb"])
        refused = a.reject("k", {}, "x\ud800", "ignored")
        await asyncio.sleep(0.4)  # past the window: a new group of the same prompt
        later = await asyncio.gather(*(a.add("k", {}, [r]) for r in ("c", "dd", "eee")))
        return got, again, refused, later, a

    got, again, refused, later, a = asyncio.run(go())
    assert got[0] == ([1.0], 2) and got[1] == ([2.0], 2) and isinstance(got[2], RolloutRejected)
    assert again == ([2.0], 2) and str(refused) == "bad text"
    assert [r for r, _ in later] == [[1.0], [2.0], [3.0]] and calls == [["a", "bb"], ["c", "dd", "eee"]]
    assert a.counters["groups"] == 2 and a.counters["rollouts_rejected"] == 1 and a.pending == 0
