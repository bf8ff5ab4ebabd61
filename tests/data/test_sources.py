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


def test_data_config_picks_splits_subset_and_data_files(tmp_path, monkeypatch):
    import datasets

    from alignkit.config import ConfigError, build
    from alignkit.data.io import DataError
    from alignkit.data.sources import DataConfig, eval_source, train_source

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(tmp_path / "dd")
    d = build(DataConfig, {"train": str(tmp_path / "dd"), "eval": str(tmp_path / "dd")})
    assert [dict(r) for r in train_source(d)] == rows[:2]
    evals = eval_source(d)   # TRL's dataset_test_split: "test", not the train split
    assert [dict(r) for r in evals] == rows[2:] and evals[0].where == f"{tmp_path / 'dd'}[test]:row 0"
    swapped = build(DataConfig, {"train": str(tmp_path / "dd"), "split": "test",
                                 "eval": str(tmp_path / "dd"), "eval_split": "train"})
    assert [dict(r) for r in train_source(swapped)] == rows[2:]
    assert [dict(r) for r in eval_source(swapped)] == rows[:2]
    bad = build(DataConfig, {"train": str(tmp_path / "dd"), "eval": str(tmp_path / "dd"),
                             "eval_split": "validation"})
    with pytest.raises(DataError, match=r"dd: no split 'validation' \(available: train, test\) "
                                        r"\(reading data.eval, data.eval_split='validation'\)$"):
        eval_source(bad)

    # data_files (and subset) describe data.train, and data.eval when it names the same dataset
    (tmp_path / "repo").mkdir()
    for name, part in (("a.jsonl", rows[:1]), ("b.jsonl", rows[1:])):
        (tmp_path / "repo" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(rows[0]) + "\n")
    d = build(DataConfig, {"train": str(tmp_path / "repo"), "eval": str(tmp_path / "repo"),
                           "data_files": {"train": "a.jsonl", "test": "b.jsonl"}})
    assert [r.where for r in train_source(d)] == [f"{tmp_path / 'repo' / 'a.jsonl'}:1"]
    assert [dict(r) for r in eval_source(d)] == rows[1:]
    d = build(DataConfig, {"train": str(tmp_path / "repo"), "eval": str(other), "data_files": "b.jsonl"})
    assert [dict(r) for r in train_source(d)] == rows[1:] and [dict(r) for r in eval_source(d)] == rows[:1]
    with pytest.raises(ConfigError, match="data.subset and data.data_files select a dataset's files"):
        build(DataConfig, {"train": "task:sentiment", "subset": "main"})
