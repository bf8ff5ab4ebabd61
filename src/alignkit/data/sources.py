"""Where records come from: a file or folder path, a dataset name for ``datasets.load_dataset``
(a Hub dataset, e.g. ``trl-lib/Capybara``), or a built-in task (``task:NAME[:chat]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from alignkit.config import require
from alignkit.data.io import DataError, DataFiles, Record

TASK_PREFIX = "task:"


@dataclass(frozen=True)
class DataConfig:
    # A file or folder, a dataset name for datasets.load_dataset (trl-lib/Capybara; read from the
    # hub cache when there), or a built-in task: "task:sentiment" / "task:arithmetic:chat".
    train: str = ""
    eval: str | None = None         # the same kinds; its split is eval_split
    split: str = "train"            # split of data.train (TRL's dataset_train_split)
    eval_split: str = "test"        # split of data.eval (TRL's dataset_test_split)
    # The dataset's subset (TRL's dataset_config, load_dataset's name) and data_files: they
    # describe data.train, and data.eval when it names the same dataset.
    subset: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    format: str = "auto"
    max_length: int = 256
    overlong: Literal["truncate", "drop"] = "truncate"
    task_samples: int = 4000        # records drawn from a built-in task for training
    eval_samples: int = 200
    # String records are one chat exchange: the prompt a user turn, each completion an assistant
    # turn, tokenised with the chat template as chat-mode sampling renders them (e.g. the output
    # of `alignkit label chat=true`). Message-list records are chat already.
    chat: bool = False
    # The chat template for a tokenizer without one (or to replace its own): a Jinja template, a
    # .jinja file or a tokenizer folder; saved with the model, so later stages render the same.
    chat_template: str | None = None

    def __post_init__(self):
        require(bool(self.train), "data.train is required (a path, a dataset name, or task:NAME)")
        require(not (parse_task(self.train) and (self.subset or self.data_files)),
                "data.subset and data.data_files select a dataset's files; data.train is a task")
        require(self.max_length > 8, "data.max_length must be > 8")


def parse_task(spec: str) -> tuple[str, bool] | None:
    """``"task:arithmetic:chat"`` -> ``("arithmetic", True)``; a path -> ``None``."""
    if not spec.startswith(TASK_PREFIX):
        return None
    parts = spec[len(TASK_PREFIX):].split(":")
    return parts[0], len(parts) > 1 and parts[1] == "chat"


def sft_source(spec: str, split: str, n: int, seed: int = 0, subset: str | None = None,
               data_files: DataFiles | None = None) -> list[dict] | list[Record]:
    """Records of ``spec``: ``n`` demonstrations of a built-in task's ``split``, or every record
    of the ``split`` of a file, folder or named dataset (:func:`alignkit.data.io.load_records`),
    each knowing where it came from."""
    task = parse_task(spec)
    if task is None:
        from alignkit.data.io import load_records

        records = load_records(spec, split, subset, data_files)
        if not records:
            raise DataError(f"no records in split '{split}'", where=spec)
        return records
    from alignkit.tasks import get_task

    name, chat = task
    return get_task(name, chat=chat).sft_records(split, n, seed=seed)


def train_source(d: DataConfig, seed: int = 0) -> list[dict] | list[Record]:
    """The records of ``data.train``: its ``data.split``, ``data.subset``, ``data.data_files``."""
    return _load(d.train, d.split, d.task_samples, seed, d.subset, d.data_files, "train", "split")


def eval_source(d: DataConfig, seed: int = 0) -> list[dict] | list[Record]:
    """The records of ``data.eval`` (split ``data.eval_split``); the subset and data_files of
    ``data.train`` when it names the same dataset."""
    require(d.eval is not None, "data.eval is not set")
    same = d.eval == d.train
    return _load(d.eval, d.eval_split, d.eval_samples, seed, d.subset if same else None,
                 d.data_files if same else None, "eval", "eval_split")


def _load(spec, split, n, seed, subset, data_files, key, split_key):
    try:
        return sft_source(spec, split, n, seed, subset, data_files)
    except DataError as e:
        if e.where and re.search(r":(row )?\d+$", e.where):
            raise  # one bad record: its file and line say it all
        # A dataset that cannot be read at all (missing, no such split...): say which keys chose it.
        raise DataError(f"{e.reason} (reading data.{key}, data.{split_key}={split!r})",
                        where=e.where, field=e.field) from e


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
