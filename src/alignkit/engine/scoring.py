"""Reward sources: one interface for every stage that scores responses.

A reward source maps ``(prompts, responses)`` (text) to one float per response. Specs:

* ``model:PATH``        a trained reward model (``alignkit rm`` output or any scalar-head model)
* ``gold:TASK``         a built-in task's hidden gold reward / verifier (explicit opt-in only)
* ``python:MOD:FUNC``   a user function ``FUNC(prompts, responses) -> list[float]``
* ``judge:CONFIG``      an AI judge's pointwise score (see :mod:`alignkit.engine.judges`)

Text in, scores out: the reward model may use a different tokenizer from the policy. A reward
model's batches run where its ``workers`` say (a stage's ``workers`` section): in this process,
or each batch on a Ray actor holding a copy of the model (:func:`alignkit.engine.workers.map_chunks`);
the batches, and so the scores, are the same either way.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch


class RewardSource(Protocol):
    name: str

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class GoldReward:
    def __init__(self, task_name: str, chat: bool = False):
        from alignkit.tasks import get_task

        self.task = get_task(task_name, chat=chat)
        self.name = f"gold:{task_name}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(x) for x in self.task.gold_reward(prompts, responses)]


class PythonReward:
    def __init__(self, target: str):
        module, _, func = target.rpartition(":")
        if not module:
            raise ValueError(f"reward 'python:{target}' must be python:module:function")
        self.fn: Callable = getattr(importlib.import_module(module), func)
        self.name = f"python:{target}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores = [float(x) for x in self.fn(prompts, responses)]
        if len(scores) != len(responses):
            raise ValueError(f"{self.name} returned {len(scores)} scores for {len(responses)} responses")
        return scores


class RewardModel:
    """A scalar-head model scoring ``prompt + response`` encoded exactly as in RM training."""

    def __init__(self, path: str, batch_size: int = 32, chat: bool = False, model=None,
                 tokenizer=None, max_length: int = 512, workers=None):
        from alignkit.engine.models import load_scalar_model, load_tokenizer

        self.tokenizer = tokenizer or load_tokenizer(path)
        self.model = model or load_scalar_model(path, tokenizer=self.tokenizer)
        self.model.eval()
        self.batch_size = batch_size
        self.chat = chat
        self.max_length = max_length
        self.workers = workers           # WorkersConfig | None: where the batches run
        self.name = f"model:{path}"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from alignkit.data.collate import collate_sft
        from alignkit.data.formats import encode_prompt_completion

        encoded = []
        for p, r in zip(prompts, responses):
            r = r or " "  # an empty response is still scored (at its EOS)
            if self.chat:
                p, r = [{"role": "user", "content": p}], [{"role": "assistant", "content": r}]
            enc = encode_prompt_completion(p, r, self.tokenizer, self.max_length, "truncate")
            encoded.append({"input_ids": enc.input_ids, "labels": enc.labels})
        from alignkit.engine.workers import map_chunks

        batches = [collate_sft(encoded[s:s + self.batch_size], self.tokenizer.pad_token_id)
                   for s in range(0, len(encoded), self.batch_size)]
        chunks = [(b["input_ids"], b["attention_mask"]) for b in batches]
        return [x for part in map_chunks(scalar_scores, self.model, chunks, self.workers)
                for x in part]


@torch.no_grad()
def scalar_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[float]:
    """The scalar head's output of one padded batch (a reward model's scores)."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return logits[:, 0].float().tolist()


def _model(spec: str, **kwargs) -> RewardModel:
    return RewardModel(spec, **kwargs)


def _gold(spec: str, **kwargs) -> GoldReward:
    name, _, variant = spec.partition(":")
    return GoldReward(name, chat=variant == "chat")


def _python(spec: str, **kwargs) -> PythonReward:
    return PythonReward(spec)


def _judge(spec: str, **kwargs):
    from alignkit.engine.judges import make_judge_reward

    return make_judge_reward(spec, **kwargs)


# The one registry of reward-source kinds: ``KIND:REST`` -> ``REWARD_SOURCES[KIND](REST, **kwargs)``.
REWARD_SOURCES: dict[str, Callable[..., RewardSource]] = {
    "model": _model, "gold": _gold, "python": _python, "judge": _judge,
}


def make_reward_source(spec: str, **kwargs) -> RewardSource:
    """The reward source of ``spec`` (``model:PATH``, ``gold:TASK[:chat]``, ``python:MOD:FUNC``,
    ``judge:CONFIG``); ``kwargs`` go to sources that take them (a reward model's ``chat``,
    ``batch_size``; ``workers``: where a reward model's or a local judge's batches run)."""
    kind, _, rest = spec.partition(":")
    if kind not in REWARD_SOURCES:
        raise ValueError(f"unknown reward source {spec!r}: use "
                         + ", ".join(f"{k}:..." for k in REWARD_SOURCES))
    return REWARD_SOURCES[kind](rest, **kwargs)
