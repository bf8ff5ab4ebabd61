"""Offline worlds with a hidden gold reward.

A task supplies pretraining text for a tiny base model, SFT records, fixed train/test prompts,
and a gold reward that no training stage reads unless the user asks for it (e.g. as a
verifier). Simulated annotators (:mod:`alignkit.feedback.simulate`) label pairs from the gold
reward; the proxy reward model learns only from those labels, so a run can show the proxy rising
while the gold falls (the setup of Gao, Schulman & Hilton 2022).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from alignkit.tasks.arithmetic import ArithmeticTask
from alignkit.tasks.sentiment import SentimentTask


@runtime_checkable
class Task(Protocol):
    name: str
    chat: bool  # True: records are chat ``messages`` and a prompt is the user's message text

    def corpus(self, n: int, seed: int = 0) -> list[str]:
        """``n`` full documents for base-model pretraining."""

    def sft_records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """``{"prompt", "completion"}`` records, or ``{"messages": [...]}`` when ``chat``."""

    def prompts(self, split: str, n: int | None = None) -> list[str]:
        """The first ``n`` of a fixed prompt list; "train" and "test" are disjoint."""

    def gold_reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Hidden gold reward of each continuation (decoded text without the prompt)."""

    def gold_details(self, prompt: str, response: str) -> dict[str, float]:
        """The gold reward's components for one continuation, for reports."""


TASKS: dict[str, Callable[..., Task]] = {
    "sentiment": SentimentTask,
    "arithmetic": ArithmeticTask,
}


def get_task(name: str, chat: bool = False) -> Task:
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
    return factory(chat=chat)


__all__ = ["Task", "TASKS", "get_task", "SentimentTask", "ArithmeticTask"]
