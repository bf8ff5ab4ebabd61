"""Prompt sources: built-in task prompts and files of prompt records, as the texts reward
sources read and the records the policy continues."""

import json

import pytest

from alignkit.data.sources import load_prompt_records, load_prompts, prompt_records, prompt_text
from alignkit.tasks import get_task


def test_task_prompts_plain_and_chat():
    train = get_task("sentiment").prompts("train", 3)
    assert load_prompts("task:sentiment", "train", 3) == train
    assert load_prompt_records("task:sentiment", "train", 3) == [{"prompt": p} for p in train]
    chat = get_task("sentiment", chat=True).prompts("test", 2)
    for spec, flag in (("task:sentiment:chat", False), ("task:sentiment", True)):
        records = load_prompt_records(spec, "test", 2, chat=flag)
        assert records == [{"messages": [{"role": "user", "content": p}]} for p in chat]
        assert [prompt_text(r) for r in records] == chat


def test_prompt_files_plain_and_chat_records(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Plain one"},
            {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "First"},
                          {"role": "assistant", "content": "Ok."},
                          {"role": "user", "content": "Last turn"}]},
            {"prompt": "never read"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(path), "train", 2) == ["Plain one", "Last turn"]
    assert [dict(r) for r in load_prompt_records(str(path), "train", 0)] == rows
    # chat: a plain prompt becomes a user turn; a chat record stays as written
    chat = load_prompt_records(str(path), "train", 2, chat=True)
    assert chat[0] == {"messages": [{"role": "user", "content": "Plain one"}]}
    assert dict(chat[1]) == rows[1]


def test_prompt_records_by_hand():
    assert prompt_records(["a"], False) == [{"prompt": "a"}]
    assert prompt_records(["a"], True) == [{"messages": [{"role": "user", "content": "a"}]}]
    with pytest.raises(KeyError):
        prompt_text({"completion": "no prompt"})
