"""veRL 0.9's reward path on a REAL local Ray, as a training run has it: `RewardLoopManager` starts
`reward.num_workers` reward workers (8 by default: separate Ray actor processes), and the agent loop's own
`AgentLoopWorker._compute_score` sends each rollout to a random one of them (`random.choice`). With
`mrrm.grpo.compute_score_row` as the reward function, every worker forwards its rows to the one named
assembler actor, so each prompt's rollouts are scored together.

Run by tests/rl/test_rl_frameworks.py in a subprocess (the other tests there stub ray in-process):

    python tests/verl_ray_run.py OUT_DIR [--num-workers N] [--assemblers auto:60,local:5] [--n N]

For each assembler setting in turn (reward_kwargs.assembler; the reward workers of the previous one
killed first) it writes into OUT_DIR/result.json under that name: {"rewards": [...] or "error": "...",
"group_sizes", "workers": N, "actors": [named actors]}, plus "rows": [[question, answer], ...] and
"want": {question: {answer: joint reward}}. Nothing here
imitates veRL: the workers, the dispatch and the reward manager are veRL's code; only vLLM is absent
(the rollouts are canned token ids).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTIONS = ["What is 2+2?", "Name a colour."]
ANSWERS = [["4", "four", "It is 4", "5"], ["red", "blue", "a colour", "red"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--num-workers", type=int, default=None, help="reward.num_workers (default: veRL's own, 8)")
    ap.add_argument("--n", type=int, default=4, help="actor_rollout_ref.rollout.n: rollouts sent per prompt")
    ap.add_argument("--group-size", default="${actor_rollout_ref.rollout.n}")
    ap.add_argument("--assemblers", default="auto:60",
                    help="comma-separated reward_kwargs.assembler:group_timeout pairs, run in turn")
    args = ap.parse_args()
    out = Path(args.out)

    import ray
    import torch
    import verl
    from hydra import compose, initialize_config_dir
    from model_fixtures import build_family

    import mrrm
    from mrrm.rl.grpo import canonical_order

    fam = build_family("qwen2_vl")
    model, tok = fam.model, fam.model.tokenizer
    model.save_pretrained(out / "rm")
    tok.save_pretrained(out / "policy")

    def verl_config(assembler: str, group_timeout: str):
        overrides = [f"actor_rollout_ref.model.path={out / 'policy'}", f"actor_rollout_ref.rollout.n={args.n}",
                     "reward.custom_reward_function.path=pkg://mrrm.grpo",
                     "reward.custom_reward_function.name=compute_score_row",
                     f"+reward.custom_reward_function.reward_kwargs.model={out / 'rm'}",
                     "+reward.custom_reward_function.reward_kwargs.device=cpu",
                     f"+reward.custom_reward_function.reward_kwargs.group_timeout={group_timeout}",
                     f"+reward.custom_reward_function.reward_kwargs.assembler={assembler}",
                     f"+reward.custom_reward_function.reward_kwargs.group_size={args.group_size}"]
        if args.num_workers is not None:
            overrides.append(f"reward.num_workers={args.num_workers}")
        config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return compose(config_name="ppo_trainer", overrides=overrides)

    # CPU resources are logical: the workers only need to be schedulable; one torch thread each
    ray.init(num_cpus=32, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    result: dict = {}
    per_prompt = [answers[:args.n] + answers[: max(0, args.n - len(answers))] for answers in ANSWERS]
    rows = [(q, a) for j in range(args.n) for q, answers in zip(QUESTIONS, per_prompt) for a in [answers[j]]]
    result["rows"] = rows
    try:
        for phase in args.assemblers.split(","):
            assembler, group_timeout = phase.split(":")
            result[assembler] = run_phase(verl_config(assembler, group_timeout), tok, rows)
        want = {}
        with torch.no_grad():
            for q, answers in zip(QUESTIONS, per_prompt):
                distinct = canonical_order(answers)
                want[q] = dict(zip(distinct, mrrm.score({"prompt": q, "responses": distinct}, model)[0]))
        result["want"] = want
    finally:
        ray.shutdown()
    (out / "result.json").write_text(json.dumps(result))


def run_phase(config, tok, rows) -> dict:
    """One reward-loop setup: veRL's workers started, every rollout dispatched by veRL's agent loop code,
    the workers killed again."""
    import numpy as np
    import ray
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager

    result: dict = {}
    manager = RewardLoopManager(config)
    handles = manager.reward_loop_worker_handles
    result["workers"] = len(handles)
    try:
        agent = AgentLoopWorker.__new__(AgentLoopWorker)  # its __init__ starts vLLM servers; set what _compute_score reads
        agent.reward_loop_worker_handles, agent.processor, agent.tokenizer = handles, None, tok
        agent.mm_processor_kwargs = {}

        def uid(q):
            return f"uid-{QUESTIONS.index(q)}"

        async def one(q, a):
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            output = AgentLoopOutput(prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"],
                                     response_ids=tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                                     response_mask=[1] * (len(tok(a, add_special_tokens=False)["input_ids"]) + 1),
                                     metrics=AgentLoopMetrics())
            kwargs = {"data_source": "mrrm_demo", "reward_model": {"ground_truth": "", "style": "model"},
                      "extra_info": {"prompt": q, "uid": uid(q)}, "uid": uid(q), "index": QUESTIONS.index(q),
                      "raw_prompt": np.array([{"role": "user", "content": q}], dtype=object)}
            await agent._compute_score([output], kwargs)
            return output.reward_score, output.extra_fields["reward_extra_info"]

        async def everything():
            return await asyncio.gather(*(one(q, a) for q, a in rows), return_exceptions=True)

        got = asyncio.run(everything())
        errors = [g for g in got if isinstance(g, BaseException)]
        if errors:
            result["error"] = f"{type(errors[0]).__name__}: {errors[0]}"
        else:
            result["rewards"] = [float(r) for r, _ in got]
            result["group_sizes"] = [info["mrrm_group_size"] for _, info in got]
        result["actors"] = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
    finally:
        for h in handles:
            ray.kill(h)
    return result


if __name__ == "__main__":
    main()
