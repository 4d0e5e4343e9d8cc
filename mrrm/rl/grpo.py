"""GRPO reward scoring: a TRL reward function and veRL reward functions (per row for 0.9, batch for <= 0.6).

GRPO samples G completions per prompt and normalises rewards within each group. That group is
exactly what a multi-response reward model scores in one pass, so both adapters regroup the flat
batch a trainer hands them by prompt CONTENT and score every group as one sample.

    from mrrm.rl.grpo import RewardFunction
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[RewardFunction("path/to/rm")], ...)

Rules shared by both adapters (and by `python -m mrrm.serve`'s /get_reward):

* A group is every completion whose prompt has the same text and the same media (images and
  videos are compared by `mrrm.data.media.media_fingerprint`, i.e. by content, not by object). Its
  position in the batch does not matter: groups may be interleaved, shuffled or spread over the
  batch. In a multi-process run (torch.distributed initialised) RewardFunction gathers every
  rank's completions first, so a group split across ranks is scored whole on each rank that
  holds part of it.
* Within a group, identical completions are scored once and share one reward, and the distinct
  completions are put in a canonical order (by the SHA-256 of their text, `canonical_order`):
  in joint mode a response sees the earlier ones, so a fixed order makes a completion's reward
  independent of where the trainer placed it, without tying the order to the text's content.
* Rewards are the model's RAW scores (GRPO/veRL normalise per group themselves).
* An empty completion cannot be scored (it has no token to read a score at): RewardFunction
  returns None for it (TRL turns None into NaN, leaves it out of the group baseline and gives it
  zero advantage); compute_score and /get_reward need a float and give it `empty_reward`, by
  default the lowest score of its group (0.0 when the whole group is empty).

This module uses absolute imports only: veRL loads `custom_reward_function.path` as a standalone
file, outside the mrrm package.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import math
import os
import sys
import time
import weakref
from typing import Any, Sequence

from mrrm.common import MODES, check_choice, check_int, check_positive
from mrrm.data import media
from mrrm.errors import GroupConflict, GroupError, GroupIncomplete, GroupOverfull, PendingFull, RolloutRejected
from mrrm.model.api import load_model

__all__ = ["RewardFunction", "compute_score", "compute_score_row", "GroupAssembler", "RayGroupAssembler", "GroupError",
           "GroupIncomplete", "GroupOverfull", "GroupConflict", "RolloutRejected", "PendingFull", "canonical_order",
           "prompt_text", "completion_text", "group_sample", "ungroup", "score_groups", "fill_empty"]


# --------------------------------------------------------------------------------------------------
# Text of plain and conversational prompts / completions (TRL's formats)
# --------------------------------------------------------------------------------------------------


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of blocks whose text blocks are joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict):
                if block.get("type", "text") == "text":
                    text = block.get("text", "")
                    if not isinstance(text, str):
                        raise TypeError(f"{where}: a text block's 'text' must be a string, got {type(text).__name__}")
                    parts.append(text)
            else:
                raise TypeError(f"{where}: content blocks must be dicts or strings, got {type(block).__name__}")
        return "\n".join(parts)
    raise TypeError(f"{where}: message content must be a string or a list of blocks, got {type(content).__name__}")


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


def prompt_text(prompt: Any, where: str = "prompt") -> str:
    """The reward model's prompt text from a plain string or a chat (list of {"role", "content"}).

    A chat with one non-system turn gives that turn's text; a longer chat gives its non-system
    turns as "role: text" lines. System turns are dropped: the reward model has its own."""
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):  # numpy object arrays (veRL)
        prompt = prompt.tolist()
    if not _is_messages(prompt):
        raise TypeError(f"{where}: expected a string or a list of chat messages with 'role', "
                        f"got {type(prompt).__name__}")
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return _content_text(turns[0].get("content"), where)
    return "\n".join(f"{m['role']}: {_content_text(m.get('content'), where)}" for m in turns)


def prompt_images(prompt: Any) -> list:
    """Images embedded in a chat's content blocks ({"type": "image", "image": ...}), in order."""
    if not _is_messages(prompt):
        return []
    out = []
    for m in prompt:
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            out += [b["image"] for b in content
                    if isinstance(b, dict) and b.get("type") == "image" and b.get("image") is not None]
    return out


def completion_text(completion: Any, where: str = "completion") -> str:
    """A completion's text: a string, or a chat whose assistant turns' texts are joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return _content_text(completion["content"], where)
    if _is_messages(completion):
        return "\n".join(_content_text(m.get("content"), where) for m in completion if m["role"] == "assistant")
    raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(completion).__name__}")


def canonical_order(texts: Sequence[str]) -> list[str]:
    """The distinct texts ordered by the SHA-256 of their UTF-8 bytes: the order in which a group's
    completions are scored (the same set gives the same order however it arrives)."""
    return sorted(set(texts), key=lambda t: (hashlib.sha256(t.encode("utf-8")).hexdigest(), t))


# --------------------------------------------------------------------------------------------------
# Scoring groups
# --------------------------------------------------------------------------------------------------


def _media_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [m for m in x if m is not None]
    return [x]


class _Fingerprints:
    """media_fingerprint with a per-call cache keyed by object identity (a trainer repeats the same
    image object for all G completions of a prompt)."""

    def __init__(self):
        self._cache: dict[int, tuple[Any, str]] = {}

    def __call__(self, items: list) -> tuple[str, ...]:
        out = []
        for it in items:
            hit = self._cache.get(id(it))
            if hit is None or hit[0] is not it:
                hit = (it, media.media_fingerprint(it))
                self._cache[id(it)] = hit
            out.append(hit[1])
        return tuple(out)


def _resolve_model(model, device=None, dtype=None, mode="joint"):
    if model is None or isinstance(model, (str, os.PathLike)):
        return _load_cached(None if model is None else os.fspath(model), None if device is None else str(device),
                            dtype, mode)
    if not hasattr(model, "score"):
        raise TypeError(f"model must be an mrrm RewardModel, a checkpoint path or None, got {type(model).__name__}")
    return model


@functools.lru_cache(maxsize=4)
def _load_cached(path, device, dtype, mode):

    return load_model(path, device=device, dtype=dtype, mode=mode)


def score_groups(model, groups: Sequence[dict], *, mode: str | None = None,
                 max_batch_tokens: int | None = None) -> list[list[float | None]]:
    """Score groups {"prompt", "responses", optional "images"/"videos"/"id"} with `model`: each
    group's distinct non-empty responses in `canonical_order`, one sample (one joint sequence) per
    group, all groups packed by RewardModel.score. Returns one list per group, aligned with its
    `responses`; duplicates share a score, empty responses get None."""
    plans = [group_sample(g) for g in groups]
    samples = [s for s in plans if s is not None]
    scores = iter(model.score(samples, mode=mode, max_batch_tokens=max_batch_tokens) if samples else [])
    return [ungroup(g["responses"], s, next(scores) if s is not None else None) for g, s in zip(groups, plans)]


def group_sample(group: dict) -> dict | None:
    """The sample that scores a group {"prompt", "responses", optional "images"/"videos"/"id"}: its
    distinct non-empty responses in canonical_order (None when every response is empty)."""
    distinct = canonical_order([r for r in group["responses"] if r != ""])
    if not distinct:
        return None
    sample = {"prompt": group["prompt"], "responses": distinct}
    for k in ("images", "videos", "id"):
        if group.get(k) not in (None, []):
            sample[k] = group[k]
    return sample


def ungroup(responses: Sequence[str], sample: dict | None, scores: Sequence[float] | None) -> list[float | None]:
    """A group's scores aligned with its `responses` from the scores of `group_sample`'s sample
    (duplicates share a score; empty responses get None)."""
    by_text = dict(zip(sample["responses"], scores)) if sample is not None else {}
    return [by_text.get(r) for r in responses]


def fill_empty(group_scores: list[float | None], empty_reward: float | None = None) -> list[float]:
    """Floats for a group's scores: None (an empty response) becomes `empty_reward`, or by default
    the lowest score of the group (0.0 when no response of the group was scored)."""
    if empty_reward is None:
        scored = [s for s in group_scores if s is not None]
        empty_reward = min(scored) if scored else 0.0
    return [float(empty_reward) if s is None else s for s in group_scores]


def _check_mode(mode):
    check_choice("mode", mode, MODES)


# --------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------


class RewardFunction:
    """A TRL reward function (`GRPOTrainer(reward_funcs=[RewardFunction(model)])`).

    model: an mrrm RewardModel, a checkpoint path, or None (the built-in default model).
    mode: joint (the paper, default) / independent / single. max_batch_tokens: the packing budget
    of one pass (default: the model's config).

    __call__(prompts, completions, **kwargs) -> list[float | None], one reward per completion in
    input order. prompts/completions: plain strings or chats (TRL's conversational format).
    Images come from the `images` (a list per row) or `image` (one per row) keyword columns, else
    from image blocks in the chat; videos from `videos` / `video`. Other keyword arguments that
    TRL passes (completion_ids, trainer_state, log_extra, dataset columns) are ignored.
    """

    __name__ = "mrrm"

    def __init__(self, model=None, *, mode: str = "joint", max_batch_tokens: int | None = None):
        _check_mode(mode)
        check_int("max_batch_tokens", max_batch_tokens, allow_none=True)
        self.model = _resolve_model(model, mode=mode)
        self.mode = mode
        self.max_batch_tokens = max_batch_tokens

    def _rows(self, prompts, completions, kwargs) -> list[tuple]:
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"got {n} prompts but {len(completions)} completions")
        columns = {}
        for key in ("images", "image", "videos", "video"):
            col = kwargs.get(key)
            if col is not None:
                if not isinstance(col, (list, tuple)) or len(col) != n:
                    size = len(col) if hasattr(col, "__len__") else "?"
                    raise ValueError(f"keyword column {key!r} must be a list with one entry per completion ({n}), "
                                     f"got {type(col).__name__} of length {size}")
                columns[key] = col
        fingerprint = _Fingerprints()
        rows = []
        for i in range(n):
            text = prompt_text(prompts[i], f"prompt {i}")
            if "images" in columns:
                images = _media_list(columns["images"][i])
            elif "image" in columns:
                images = _media_list(columns["image"][i])
            else:
                images = prompt_images(prompts[i])
            videos = _media_list(columns["videos"][i] if "videos" in columns else
                                 columns["video"][i] if "video" in columns else None)
            key = (text, fingerprint(images), fingerprint(videos))
            rows.append((key, text, images, videos, completion_text(completions[i], f"completion {i}")))
        return rows

    @staticmethod
    def _world():
        try:
            import torch.distributed as dist
        except ImportError:
            return None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist
        return None

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        local = self._rows(prompts, completions, kwargs)
        everyone = local
        dist = self._world()
        if dist is not None:  # a group may be split across ranks: see every rank's rows
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            everyone = [row for part in gathered for row in part]
        members: dict[tuple, list[str]] = {}
        first: dict[tuple, tuple] = {}
        for key, text, images, videos, comp in everyone:
            members.setdefault(key, []).append(comp)
            first.setdefault(key, (text, images, videos))
        wanted = list(dict.fromkeys(key for key, *_ in local))  # only the groups this call returns
        groups = [{"prompt": first[k][0], "responses": canonical_order(members[k]),
                   "images": first[k][1], "videos": first[k][2]} for k in wanted]
        scored = score_groups(self.model, groups, mode=self.mode, max_batch_tokens=self.max_batch_tokens)
        table = {k: dict(zip(g["responses"], s)) for k, g, s in zip(wanted, groups, scored)}
        return [table[key].get(comp) for key, _, _, _, comp in local]


# --------------------------------------------------------------------------------------------------
# veRL
# --------------------------------------------------------------------------------------------------


_VERL_KWARGS = ("model", "mode", "max_batch_tokens", "device", "dtype", "media_root", "empty_reward")


def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list[float]:
    """veRL batch reward function (veRL <= 0.6: reward_model.reward_manager=batch; veRL 0.9 calls a
    function per row: compute_score_row).

    Each row's extra_info (a dict set by your dataset preprocessing) must hold "uid" (one value per
    prompt, shared by its rollouts) and "prompt" (a string or a chat); optional "image"/"images"/
    "video"/"videos" (anything mrrm.data.media reads: path, bytes, base64, HF {"bytes","path"} dict).
    Rows are grouped by uid (veRL reorders batches, so never by position) and each group is scored
    in one pass. data_sources and ground_truths are not used by the reward model (checked for length).

    Keyword arguments (veRL's custom_reward_function.reward_kwargs): model (checkpoint path; default:
    the built-in model), mode ("joint"), max_batch_tokens, device, dtype ("bfloat16", ...),
    media_root (base directory of relative media paths), empty_reward (see fill_empty).
    Returns one float per row, in input order.
    """
    mode, max_batch_tokens, empty_reward = _verl_options(kwargs)
    solution_strs, extra_infos = list(solution_strs), list(extra_infos)
    n = len(solution_strs)
    _check_verl_lengths(n, (("data_sources", data_sources), ("ground_truths", ground_truths),
                            ("extra_infos", extra_infos)))
    if n == 0:
        return []
    # every row is checked (and media under media_root read) before a model is loaded
    groups = _verl_groups(solution_strs, extra_infos, kwargs.get("media_root"))
    model = _resolve_model(kwargs.get("model"), kwargs.get("device"), kwargs.get("dtype"), mode)
    scored = score_groups(model, groups, mode=mode, max_batch_tokens=max_batch_tokens)
    return _verl_rewards(groups, scored, n, empty_reward)


def _verl_options(kwargs: dict) -> tuple[str, int | None, float | None]:
    """compute_score's reward_kwargs, checked: (mode, max_batch_tokens, empty_reward)."""
    unknown = set(kwargs) - set(_VERL_KWARGS)
    if unknown:
        raise TypeError(f"compute_score: unknown keyword argument(s) {sorted(unknown)}")
    mode = kwargs.get("mode", "joint")
    _check_mode(mode)
    max_batch_tokens = kwargs.get("max_batch_tokens")
    check_int("max_batch_tokens", max_batch_tokens, allow_none=True)
    empty_reward = kwargs.get("empty_reward")
    if empty_reward is not None and not (isinstance(empty_reward, (int, float)) and math.isfinite(empty_reward)):
        raise ValueError(f"empty_reward must be a finite number or None, got {empty_reward!r}")
    return mode, max_batch_tokens, empty_reward


def _check_verl_lengths(n: int, columns: Sequence[tuple[str, Any]]) -> None:
    """Every (name, column) that is not None has one entry per solution string."""
    for name, seq in columns:
        if seq is not None and len(seq) != n:
            raise ValueError(f"compute_score: {name} has {len(seq)} entries but solution_strs has {n}")


def _verl_groups(solution_strs: list, extra_infos: list, root) -> list[dict]:
    """The rows grouped by uid, in order of first appearance: one score_groups group per uid
    {"prompt", "images", "videos", "id", "rows" (row indices), "responses"}; media from its first row."""
    by_uid: dict[Any, dict] = {}
    for i, (sol, info) in enumerate(zip(solution_strs, extra_infos)):
        uid, text = _verl_row(i, sol, info)
        g = by_uid.get(uid)
        if g is None:
            images, videos = _verl_media(info, root)
            by_uid[uid] = g = {"prompt": text, "images": images, "videos": videos, "id": str(uid), "rows": []}
        elif g["prompt"] != text:
            first = g["rows"][0]
            raise ValueError(f"compute_score: uid {uid!r} has two different prompts (rows {first} and {i}); "
                             "a uid must name one prompt")
        g["rows"].append(i)
    groups = list(by_uid.values())
    for g in groups:
        g["responses"] = [solution_strs[i] for i in g["rows"]]
    return groups


def _verl_row(i: int, sol: Any, info: Any) -> tuple[Any, str]:
    """Row i checked: (its uid, its prompt text)."""
    if not isinstance(sol, str):
        raise TypeError(f"compute_score: solution_strs[{i}] is a {type(sol).__name__}, not a string")
    if not isinstance(info, dict) or "uid" not in info or "prompt" not in info:
        raise ValueError(f"compute_score: extra_infos[{i}] must be a dict with 'uid' and 'prompt' "
                         f"(add them in your dataset preprocessing), got "
                         f"{sorted(info) if isinstance(info, dict) else type(info).__name__}")
    uid = info["uid"]
    try:
        hash(uid)
    except TypeError:
        raise ValueError(f"compute_score: extra_infos[{i}]['uid'] must be hashable, "
                         f"got {type(uid).__name__}") from None
    return uid, prompt_text(info["prompt"], f"extra_infos[{i}]['prompt']")


def _verl_media(info: dict, root) -> tuple[list, list]:
    """A row's (images, videos). With media_root, images are decoded now and relative video paths
    are joined to it."""
    images = _media_list(info.get("images", info.get("image")))
    if root is not None:  # relative paths are read under media_root
        images = [media.load_image(im, base_dir=root) for im in images]
    videos = _media_list(info.get("videos", info.get("video")))
    if root is not None:
        videos = [os.path.join(root, v) if isinstance(v, str) and not os.path.isabs(v) else v for v in videos]
    return images, videos


def _verl_rewards(groups: list[dict], scored: list[list[float | None]], n: int,
                  empty_reward: float | None) -> list[float]:
    """One float per row, in input order, from each group's scores (empty responses: fill_empty)."""
    out = [0.0] * n
    for g, s in zip(groups, scored):
        for i, v in zip(g["rows"], fill_empty(s, empty_reward)):
            out[i] = float(v)
    return out


# --------------------------------------------------------------------------------------------------
# Groups assembled across calls: one rollout per call (veRL 0.9's reward loop, OpenRLHF's requests)
# --------------------------------------------------------------------------------------------------

DEFAULT_GROUP_TIMEOUT = 120.0  # seconds a group's first rollout waits for the rest (OpenRLHF's client gives up at 180)
PARTIAL_GROUPS = ("error", "score")
MIN_WINDOW = 30.0  # seconds a closed group is kept at least: OpenRLHF retries a failed request 5 times, 1 s apart
ASSEMBLERS = ("auto", "local", "ray")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class PendingPool:
    """Responses held for their groups, counted across GroupAssemblers (the reward server keeps one
    assembler per client and one pool for all): a NEW group that would bring the count over `limit`
    is refused (PendingFull)."""

    def __init__(self, limit: int | None = None):
        self.limit = None if limit is None else check_int("max_pending", limit)
        self.used = 0


class _Group:
    """One prompt's rollouts: open until `size` arrived (or the timeout), then scored once, then kept
    (closed) for the window so that a client's retry gets the same answer and an extra rollout is seen."""

    def __init__(self, key, base: dict, size: int, signature, future):
        self.key, self.base, self.size, self.signature, self.future = key, base, size, signature, future
        self.arrived = 0
        self.responses: list[str] = []        # the valid rollouts, in arrival order (scored as one group)
        self.rejected: dict[bytes, str] = {}  # digest of a rejected rollout -> why
        self.closed = False
        self.timer = None
        self.expires = 0.0


class GroupAssembler:
    """Holds the rollouts of each group (one prompt) across calls until `group_size` of them arrived,
    then scores them ONCE as one group: `await score({**base, "responses": [...]})` returns a reward per
    response. Used where a trainer hands over one rollout at a time: the reward server's /get_reward
    (OpenRLHF), compute_score_row (veRL 0.9) in one process, and the Ray actor every veRL reward worker
    shares (`RayGroupAssembler`). One event loop per assembler.

    Never a plausible wrong reward:
    * a group short of its size after `group_timeout` s: GroupIncomplete for every member
      (partial="error", the default), or scored as it is (partial="score");
    * more rollouts of a prompt than its size within `window` s of the group's close (default: the group
      timeout, at least MIN_WINDOW): GroupOverfull, and from then on every call fails with that message (the trainer
      and the group size disagree for every prompt; a restart with the right size clears it);
    * a uid shared by two prompts, or two sizes for one group: GroupConflict for the whole group;
    * a rollout whose input is invalid (`reject`): RolloutRejected for it alone; it counts as an arrival,
      the rest of its group is scored without it.
    A call repeated after its group closed (a client's retry) gets the same rewards (or error) again.
    `max_pending` (or a shared `pool`): a NEW group that would bring the held responses over it ->
    PendingFull; `max_groups`: a NEW group beyond that many open ones -> PendingFull (an open group's
    rollouts are always taken, so a group is never split). Counters: groups, groups_timed_out,
    groups_failed, groups_overfull, rollouts_rejected; `pending`: responses held now."""

    COUNTERS = ("groups", "groups_timed_out", "groups_failed", "groups_overfull", "rollouts_rejected")

    def __init__(self, score, *, group_size: int, group_timeout: float, partial: str = "error",
                 max_pending: int | None = None, window: float | None = None, max_recent: int = 1 << 17,
                 size_hint: str = "the group size", pool: PendingPool | None = None, max_groups: int | None = None):
        check_int("group_size", group_size)
        check_positive("group_timeout", group_timeout, unit="seconds")
        check_choice("partial", partial, PARTIAL_GROUPS)
        self.pool = pool if pool is not None else PendingPool(max_pending)
        if self.pool.limit is not None and self.pool.limit < group_size:
            raise ValueError(f"max_pending ({self.pool.limit}) must be at least the group size ({group_size}): "
                             "a group could never be held whole")
        self.max_groups = check_int("max_groups", max_groups, allow_none=True)
        self.open_groups = 0
        self.score, self.group_size, self.group_timeout, self.partial = score, group_size, group_timeout, partial
        self.window = float(window) if window is not None else max(float(group_timeout), MIN_WINDOW)
        self.max_recent, self.size_hint = max_recent, size_hint
        self.groups: dict = {}           # key -> its open group, or its closed one for the window
        self._closed_order: collections.deque = collections.deque()  # (expires, key, group), in closing order
        self.pending = 0
        self.misconfigured: str | None = None
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    # -- arrivals -----------------------------------------------------------------------------------
    async def add(self, key, base: dict, responses: list[str], *, group_size: int | None = None,
                  signature=None) -> tuple[list[float], int]:
        """Add one call's rollouts of one group; returns (their rewards, the number of responses the group
        was scored with) once the group is scored. `signature`: what every call of the group must agree
        on (the prompt's text and media) when the key is an id; `group_size` overrides the default for
        this group (validation with n=1)."""
        size = self._size(group_size)
        digests = [_digest(r) for r in responses]
        g = self._arrival(key, base, size, signature, digests)
        if g.closed:  # a retry of rollouts the group already holds
            rewards = await asyncio.shield(g.future)
            by_digest = {_digest(r): v for r, v in zip(g.responses, rewards)}
            return [by_digest[d] for d in digests], len(rewards)
        lo = len(g.responses)
        g.responses.extend(responses)
        g.arrived += len(responses)
        self.pending += len(responses)
        self.pool.used += len(responses)
        self._after_arrival(g)
        rewards = await asyncio.shield(g.future)
        return rewards[lo:lo + len(responses)], len(rewards)

    def reject(self, key, base: dict, rollout: str, reason: str, *, group_size: int | None = None,
               signature=None) -> RolloutRejected:
        """Count an invalid rollout (`rollout`: its raw text, `reason`: why) as one arrival of its group,
        which is then scored without it. Returns the RolloutRejected to raise for it (the same one for a
        retry); raises GroupError when the group is over its size or in conflict."""
        size = self._size(group_size)
        digest = _digest(rollout)
        g = self.groups.get(key)
        if g is not None and digest in g.rejected:  # a retry of a rollout already refused
            return RolloutRejected(g.rejected[digest])
        g = self._arrival(key, base, size, signature, [digest], retry_ok=False)
        g.rejected[digest] = reason
        g.arrived += 1
        self.counters["rollouts_rejected"] += 1
        self._after_arrival(g)
        return RolloutRejected(reason)

    def _size(self, group_size) -> int:
        if self.misconfigured is not None:
            raise GroupOverfull(self.misconfigured)
        return self.group_size if group_size is None else check_int("group_size", group_size)

    def _arrival(self, key, base, size: int, signature, digests: list[bytes], *, retry_ok: bool = True) -> _Group:
        """The group a call's rollouts (their `digests`) join, opened if new. A closed group is returned only
        for a retry (retry_ok: every rollout is one the group was scored with); otherwise a call that comes
        after its group closed is over the group's size."""
        count = len(digests)
        self._forget_expired()
        g = self.groups.get(key)
        if g is not None and g.signature != signature:
            self._fail(g, GroupConflict(f"one group id names two different prompts ({_short(g.base)} and "
                                        f"{_short(base)}): give every prompt its own uid"))
        if g is not None and g.closed:
            error = g.future.exception() if g.future.done() and not g.future.cancelled() else None
            if error is not None:
                raise error  # a late or retried member of a group that failed
            if retry_ok and set(digests) <= {_digest(r) for r in g.responses}:
                return g
            self._overfull(g, count)
        if g is not None and g.size != size:
            self._fail(g, GroupConflict(f"the rollouts of one prompt give two group sizes, {g.size} and {size}"))
        if g is None:
            if self.pool.limit is not None and self.pool.used + count > self.pool.limit:
                raise PendingFull(f"{self.pool.used} responses are waiting for their groups (max_pending "
                                  f"{self.pool.limit}); retry later")
            if self.max_groups is not None and self.open_groups >= self.max_groups:
                raise PendingFull(f"{self.open_groups} groups of this client are waiting for their rollouts "
                                  f"(max_groups {self.max_groups}); retry later")
            self.open_groups += 1
            loop = asyncio.get_running_loop()
            g = self.groups[key] = _Group(key, base, size, signature, loop.create_future())
            g.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
            g.timer = loop.call_later(self.group_timeout, self._close, g, True)
        return g

    def _after_arrival(self, g: _Group) -> None:
        if g.arrived > g.size:
            self._overfull(g, 0)
        if g.arrived == g.size:
            self._close(g, False)

    # -- outcomes -----------------------------------------------------------------------------------
    def _overfull(self, g: _Group, extra: int):
        seen = g.arrived + extra
        self.misconfigured = (
            f"more rollouts of one prompt than its group size arrived: {g.size} expected, {seen} within "
            f"{self.window:g} s. The trainer's samples per prompt (OpenRLHF --rollout.n_samples_per_prompt, veRL "
            f"actor_rollout_ref.rollout.n) must equal {self.size_hint} ({g.size}); if they do, the same prompt "
            "came twice in one batch: give each dataset row its own uid. Every reward is refused until the "
            "reward function or server is restarted with matching settings")
        self.counters["groups_overfull"] += 1
        error = GroupOverfull(self.misconfigured)
        self._fail(g, error)

    def _fail(self, g: _Group, error: GroupError):
        """End `g` with `error` for every member, keep it for the window (retries get the error), raise it."""
        if not g.closed:
            self._mark_closed(g)
        if not g.future.done():
            self.counters["groups_failed"] += 1
            g.future.set_exception(error)
        raise error

    def _mark_closed(self, g: _Group) -> None:
        g.closed = True
        g.timer.cancel()
        self.pending -= len(g.responses)
        self.pool.used -= len(g.responses)
        self.open_groups -= 1
        g.expires = time.monotonic() + self.window
        self._closed_order.append((g.expires, g.key, g))
        self.counters["groups"] += 1
        while len(self._closed_order) > self.max_recent:
            self._forget(self._closed_order.popleft())

    def _close(self, g: _Group, timed_out: bool) -> None:
        if g.closed:
            return
        self._mark_closed(g)
        if timed_out:
            self.counters["groups_timed_out"] += 1
        if timed_out and self.partial == "error":
            self.counters["groups_failed"] += 1
            g.future.set_exception(GroupIncomplete(
                f"only {g.arrived} of the {g.size} rollouts of this prompt arrived within {self.group_timeout:g} s: "
                f"the trainer sends fewer samples per prompt than {self.size_hint}, or they reach more than one "
                "assembler (several reward servers or reward workers that do not share one; use one front server / "
                "the Ray assembler), or generation takes longer than the group timeout (raise it). Scoring "
                "partial groups is an explicit choice: --partial-groups score (server) or "
                "reward_kwargs.partial_groups=score (veRL)"))
        elif not g.responses:
            g.future.set_result([])
        else:
            g.task = asyncio.get_running_loop().create_task(self._run(g))

    async def _run(self, g: _Group) -> None:
        try:
            rewards = list(await self.score({**g.base, "responses": list(g.responses)}))
        except Exception as e:  # noqa: BLE001 - handed to every call of the group
            if not g.future.done():
                g.future.set_exception(e)
            return
        if not g.future.done():  # (an extra rollout that came while it was scored failed the group)
            g.future.set_result(rewards)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._closed_order and self._closed_order[0][0] <= now:
            self._forget(self._closed_order.popleft())

    def _forget(self, entry) -> None:
        _, key, g = entry
        if self.groups.get(key) is g:
            del self.groups[key]

    def idle(self) -> bool:
        """No group open, and none closed within the window."""
        self._forget_expired()
        return not self.groups

    @property
    def open(self) -> dict:
        """The groups still waiting for rollouts, by key."""
        return {k: g for k, g in self.groups.items() if not g.closed}


def _short(base: dict) -> str:
    text = str(base.get("prompt", ""))
    return repr(text if len(text) <= 40 else text[:37] + "...")


# --------------------------------------------------------------------------------------------------
# veRL 0.9: one call per row (the reward loop); one assembler for all reward workers
# --------------------------------------------------------------------------------------------------

_ROW_KWARGS = _VERL_KWARGS + ("group_size", "group_timeout", "partial_groups", "assembler", "assembler_options")
_ROW_SIZE_HINT = "reward_kwargs.group_size"

# event loop -> {the reward options -> its GroupAssembler}: veRL awaits a worker's rows in one loop
_ROW_ASSEMBLERS = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def _row_model_thread():
    import concurrent.futures

    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrrm-verl")


def _group_scorer(model, mode, max_batch_tokens, empty_reward):
    """score(group) -> a reward per response, on one model thread (off the event loop)."""
    def score_one(group: dict) -> list[float]:
        (values,) = score_groups(model, [group], mode=mode, max_batch_tokens=max_batch_tokens)
        return fill_empty(values, empty_reward)

    async def score(group: dict) -> list[float]:
        return await asyncio.get_running_loop().run_in_executor(_row_model_thread(), score_one, group)

    return score


class RayGroupAssembler:
    """The one GroupAssembler of a veRL run, as a named Ray actor: veRL's reward workers (`reward.num_workers`,
    8 by default) are separate Ray actors, and its agent loop sends each rollout to a random one, so the
    rollouts of a prompt meet only here. It holds the reward model (one copy for all workers) and scores
    each group once. Created by the first worker that needs it (`get_if_exists`), found by name by the
    others; its lifetime is that worker's."""

    def __init__(self, settings: dict):
        mode = settings["mode"]
        model = _resolve_model(settings["model"], settings["device"], settings["dtype"], mode)
        self.assembler = GroupAssembler(_group_scorer(model, mode, settings["max_batch_tokens"], settings["empty_reward"]),
                                        group_size=settings["group_size"], group_timeout=settings["group_timeout"],
                                        partial=settings["partial_groups"], size_hint=_ROW_SIZE_HINT)

    async def add(self, key, base: dict, responses: list[str], group_size: int | None, signature):
        return await self.assembler.add(key, base, responses, group_size=group_size, signature=signature)

    def counters(self) -> dict:
        return dict(self.assembler.counters)


def _in_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (a veRL reward worker). Ray is only looked at when the
    process already imported it."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and isinstance(ray.get_runtime_context().get_actor_id(), str)
    except Exception:  # noqa: BLE001 - anything but a real Ray runtime: not in an actor
        return False


_RAY_ASSEMBLERS: dict = {}  # name -> this process's handle: a named actor lives while some handle to it does


def assembler_name(settings: dict) -> str:
    """The Ray actor name of the assembler for these reward settings (reward functions with other
    settings get their own)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return "mrrm-group-assembler-" + digest


def ray_assembler(settings: dict, actor_options: dict | None = None):
    """The named Ray actor (RayGroupAssembler) for these reward settings, created if missing. Each process
    keeps its handle, so the actor (and the model it holds) lives for the whole run, not for one call."""
    name = assembler_name(settings)
    handle = _RAY_ASSEMBLERS.get(name)
    if handle is None:
        import ray

        options = {"name": name, "get_if_exists": True, "max_concurrency": 1 << 16}
        if str(settings.get("device") or "").startswith("cuda"):
            options["num_gpus"] = 1
        options.update(actor_options or {})
        handle = _RAY_ASSEMBLERS[name] = ray.remote(RayGroupAssembler).options(**options).remote(settings)
    return handle


async def compute_score_row(data_source=None, solution_str=None, ground_truth=None, extra_info=None, **kwargs):
    """veRL 0.9 reward function: veRL's reward loop calls it once per rollout (naive / dapo / gdpo /
    rate_limited managers). The rows of one prompt are held until `group_size` (set it to
    `${actor_rollout_ref.rollout.n}`) of them arrived and scored together in one pass; each row gets its
    own reward. Returns {"score": reward, "mrrm_group_size": responses the group was scored with}.

    Where the rows meet (`assembler`): "auto" (default) = inside a Ray actor (veRL's reward workers, however
    many), one named Ray actor (`RayGroupAssembler`, holding the model) that every worker finds; elsewhere,
    this process's event loop ("local"). `assembler_options`: Ray actor options for it (num_cpus, num_gpus,
    resources, ...; a cuda device asks for one GPU).

    extra_info (set by your dataset preprocessing, as for compute_score): "prompt" (string or chat),
    optional "uid" (rows are grouped by it, else by prompt text and media), "image"/"images"/"video"/
    "videos", and "group_size" (this row's group size, e.g. 1 in a validation set generated with n=1).
    reward_kwargs: group_size (required), group_timeout (default 120 s), partial_groups ("error": a group
    short after the timeout raises GroupIncomplete; "score": scored as it is), assembler, assembler_options,
    and compute_score's model, mode, max_batch_tokens, device, dtype, media_root, empty_reward.
    Misconfiguration raises (GroupIncomplete, GroupOverfull, GroupConflict), never a reward.
    """
    unknown = set(kwargs) - set(_ROW_KWARGS) - {"reward_router_address", "reward_model_tokenizer"}
    if unknown:
        raise TypeError(f"compute_score_row: unknown keyword argument(s) {sorted(unknown)}")
    group_size = check_int("group_size", kwargs.get("group_size"))
    timeout = float(check_positive("group_timeout", kwargs.get("group_timeout", DEFAULT_GROUP_TIMEOUT), unit="seconds"))
    partial = check_choice("partial_groups", kwargs.get("partial_groups", "error"), PARTIAL_GROUPS)
    where = check_choice("assembler", kwargs.get("assembler", "auto"), ASSEMBLERS)
    actor_options = kwargs.get("assembler_options")
    if actor_options is not None and not isinstance(actor_options, dict):
        raise TypeError(f"assembler_options must be a dict of Ray actor options, got {type(actor_options).__name__}")
    mode, max_batch_tokens, empty_reward = _verl_options({k: v for k, v in kwargs.items() if k in _VERL_KWARGS})
    info = dict(extra_info) if isinstance(extra_info, dict) else extra_info
    if isinstance(info, dict) and "uid" not in info and "prompt" in info:
        info["uid"] = None  # grouped by prompt text and media below
    uid, text = _verl_row(0, solution_str, info)
    row_size = info.get("group_size")
    if row_size is not None:
        check_int("extra_info['group_size']", row_size)
    images, videos = _verl_media(info, kwargs.get("media_root"))
    fp = _Fingerprints()
    signature = (text, fp(images), fp(videos))
    key = ("prompt",) + signature if uid is None else ("uid", uid)
    base = {"prompt": text, "images": images, "videos": videos, "id": str(uid if uid is not None else text)}
    model_path = kwargs.get("model")
    settings = {"model": os.fspath(model_path) if isinstance(model_path, (str, os.PathLike)) else model_path,
                "device": kwargs.get("device"),
                "dtype": kwargs.get("dtype"), "mode": mode, "max_batch_tokens": max_batch_tokens,
                "empty_reward": empty_reward, "group_size": group_size, "group_timeout": timeout,
                "partial_groups": partial}
    if where == "ray" or (where == "auto" and _in_ray_actor()):
        if not isinstance(settings["model"], (str, type(None))):
            raise TypeError("the Ray assembler loads the model itself: pass model as a checkpoint path (or None)")
        actor = ray_assembler(settings, actor_options)
        (reward,), size = await actor.add.remote(key, base, [solution_str], row_size, signature)
    else:
        model = _resolve_model(model_path, kwargs.get("device"), kwargs.get("dtype"), mode)
        loop = asyncio.get_running_loop()
        options = (id(model), mode, max_batch_tokens, empty_reward, group_size, timeout, partial)
        assemblers = _ROW_ASSEMBLERS.setdefault(loop, {})
        if options not in assemblers:
            assemblers[options] = GroupAssembler(_group_scorer(model, mode, max_batch_tokens, empty_reward),
                                                 group_size=group_size, group_timeout=timeout, partial=partial,
                                                 size_hint=_ROW_SIZE_HINT)
        (reward,), size = await assemblers[options].add(key, base, [solution_str], group_size=row_size,
                                                        signature=signature)
    return {"score": float(reward), "mrrm_group_size": size}
