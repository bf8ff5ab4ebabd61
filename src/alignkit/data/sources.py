"""Where records come from: a file or folder path, or a built-in task (``task:NAME[:chat]``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.config import require

TASK_PREFIX = "task:"


@dataclass(frozen=True)
class DataConfig:
    train: str = ""                 # path, or "task:sentiment" / "task:arithmetic:chat"
    eval: str | None = None         # path, or "task:..." (uses the task's held-out split)
    format: str = "auto"
    max_length: int = 256
    overlong: Literal["truncate", "drop"] = "truncate"
    task_samples: int = 4000        # records drawn from a built-in task for training
    eval_samples: int = 200
    # String records are one chat exchange: the prompt a user turn, each completion an assistant
    # turn, tokenised with the chat template as chat-mode sampling renders them (e.g. the output
    # of `alignkit label chat=true`). Message-list records are chat already.
    chat: bool = False

    def __post_init__(self):
        require(bool(self.train), "data.train is required (a path, or task:NAME)")
        require(self.max_length > 8, "data.max_length must be > 8")


def parse_task(spec: str) -> tuple[str, bool] | None:
    """``"task:arithmetic:chat"`` -> ``("arithmetic", True)``; a path -> ``None``."""
    if not spec.startswith(TASK_PREFIX):
        return None
    parts = spec[len(TASK_PREFIX):].split(":")
    return parts[0], len(parts) > 1 and parts[1] == "chat"


def sft_source(spec: str, split: str, n: int, seed: int = 0) -> list[dict] | Path:
    """Demonstrations: records from a built-in task, or the path itself for the loader."""
    task = parse_task(spec)
    if task is None:
        return Path(spec)
    from alignkit.tasks import get_task

    name, chat = task
    return get_task(name, chat=chat).sft_records(split, n, seed=seed)


# ---------------------------------------------------------------------------------------------
# Prompts: what every sampling stage continues (PPO rollouts, ReST's Grow, best-of-n, online DPO).


def prompt_records(prompts: list[str], chat: bool) -> list[dict]:
    """Prompt texts as records: ``{"prompt": text}``, or a one-turn chat (``messages``)."""
    if chat:
        return [{"messages": [{"role": "user", "content": p}]} for p in prompts]
    return [{"prompt": p} for p in prompts]


def prompt_text(record) -> str:
    """What a reward source reads: the prompt string, or the last user message of a chat."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in (prompt or record["messages"]) if m["role"] == "user"][-1]


def load_prompt_records(spec: str, split: str, n: int, chat: bool = False) -> list:
    """Prompt records of ``spec``: ``task:NAME[:chat]`` (the task's ``split`` prompts, chat turns
    with ``:chat`` or ``chat``) or a file of records (``{"prompt": ...}`` or ``{"messages": [...]}``;
    a plain prompt becomes a user turn with ``chat``). ``n`` > 0 keeps the first ``n``."""
    task = parse_task(spec)
    if task is not None:
        from alignkit.tasks import get_task

        name, task_chat = task
        texts = get_task(name, chat=chat or task_chat).prompts(split, n or None)
        return prompt_records(texts, chat or task_chat)
    from alignkit.data.io import load_records

    records = load_records(spec)[:n or None]
    if not chat:
        return records
    return [r if not isinstance(r.get("prompt"), str) else prompt_records([r["prompt"]], True)[0]
            for r in records]


def load_prompts(spec: str, split: str, n: int, chat: bool = False) -> list[str]:
    """The texts of :func:`load_prompt_records` (what reward sources and sampling read)."""
    return [prompt_text(r) for r in load_prompt_records(spec, split, n, chat)]
