import json
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.io import DataError, Record, load_records

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # datasets writes lock files (and, for CSV, Arrow caches) under its cache dir: keep them in tmp.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_data_error_message_format_and_pickling():
    e = DataError("chosen and rejected are identical", where="data/train.jsonl:17", field="chosen")
    assert str(e) == "data/train.jsonl:17: field 'chosen': chosen and rejected are identical"
    assert (e.where, e.field, e.reason) == ("data/train.jsonl:17", "chosen", "chosen and rejected are identical")
    assert isinstance(e, ValueError)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    assert str(DataError("no records", where="x.jsonl")) == "x.jsonl: no records"


def test_jsonl_records_keep_one_based_line_numbers_and_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1])])
    records = load_records(path)
    assert [dict(r) for r in records] == ROWS[:2]
    assert [(r.index, r.unit) for r in records] == [(1, "line"), (4, "line")]
    assert records[1].where == f"{path}:4"
    assert records[1]["prompt"] == "c" and "completion" in records[1] and len(records[1]) == 2


def test_json_file_may_hold_one_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS, indent=2))
    records = load_records(path)
    assert [dict(r) for r in records] == ROWS
    assert records[2].where == f"{path}:row 2"


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert [dict(r) for r in load_records(path)] == ROWS[:1]


def test_malformed_json_line_names_file_line_and_json_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "", '{"prompt": "x",}'])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes")
    assert info.value.where == f"{path}:3"


@pytest.mark.parametrize("line, kind", [('["a", "b"]', "an array"), ('"text"', "a string"),
                                        ("3", "a number"), ("null", "null")])
def test_non_object_line_is_an_error(tmp_path, line, kind):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), line])
    with pytest.raises(DataError, match=f"^{path}:2: expected a JSON object, got {kind}$"):
        load_records(path)


def test_parquet_rows_are_zero_based(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = load_records(path)
    assert [dict(r) for r in records] == ROWS
    assert [r.where for r in records] == [f"{path}:row {i}" for i in range(3)]


def test_parquet_nested_messages_come_back_as_python_lists(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [dict(r) for r in load_records(path)] == rows


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"^{path}: cannot read Parquet"):
        load_records(path)


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    records = load_records(tmp_path / "single")
    assert [dict(r) for r in records] == ROWS and records[1].where == f"{tmp_path / 'single'}:row 1"

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(tmp_path / "dict")
    assert [dict(r) for r in load_records(tmp_path / "dict")] == ROWS[:2]
    test = load_records(tmp_path / "dict", split="test")
    assert [dict(r) for r in test] == ROWS[2:] and test[0].where == f"{tmp_path / 'dict'}[test]:row 0"
    with pytest.raises(DataError, match=r"no split 'valid' \(available: train, test\)"):
        load_records(tmp_path / "dict", split="valid")


def test_folder_of_split_files_keeps_file_and_line(tmp_path):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    train = write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", [json.dumps(r) for r in ROWS[:2]])
    write_jsonl(tmp_path / "repo" / "data" / "test.jsonl", [json.dumps(r) for r in ROWS[2:]])
    records = load_records(tmp_path / "repo")
    assert [dict(r) for r in records] == ROWS[:2]
    assert records[1].where == f"{train}:2"
    test = load_records(tmp_path / "repo", split="test")
    assert [dict(r) for r in test] == ROWS[2:]
    with pytest.raises(DataError, match=r"no split 'valid' \(available: "):
        load_records(tmp_path / "repo", split="valid")


def test_folder_of_parquet_shards_reads_every_shard_in_order(tmp_path):
    (tmp_path / "shards").mkdir()
    for i, part in enumerate([ROWS[:2], ROWS[2:]]):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "shards" / f"train-0000{i}-of-00002.parquet")
    records = load_records(tmp_path / "shards")
    assert [dict(r) for r in records] == ROWS
    assert records[2].where == f"{tmp_path / 'shards' / 'train-00001-of-00002.parquet'}:row 0"


def test_folder_of_other_formats_goes_through_datasets(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("prompt,completion\na,b\nc,d\n")
    records = load_records(tmp_path / "csv")
    assert [dict(r) for r in records] == ROWS[:2]
    assert records[1].where.endswith("[train]:row 1")


def test_missing_path_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"x.txt: unsupported file type '.txt'"):
        load_records(tmp_path / "x.txt")


def test_records_are_read_only_mappings():
    r = Record({"a": 1}, "f.jsonl", 3)
    assert dict(r) == {"a": 1} and r.get("b") is None and r.where == "f.jsonl:3"
    assert r.error("a", "bad").args == ("f.jsonl:3: field 'a': bad",)


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    from alignkit.data.io import read_jsonl, write_jsonl

    path = tmp_path / "new" / "rows.jsonl"
    rows = [{"a": 1, "t": "café"}, {"a": 2, "t": "x"}]
    assert write_jsonl(path, iter(rows)) == 2
    assert read_jsonl(path) == rows and "\\u00e9" in path.read_text()
    write_jsonl(path, rows[:1], ensure_ascii=False)
    assert path.read_text() == '{"a": 1, "t": "café"}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]   # no temporary left

    class Boom(Exception):
        pass

    def failing():
        yield {"a": 3}
        raise Boom

    with pytest.raises(Boom):
        write_jsonl(path, failing())
    assert read_jsonl(path) == rows[:1]   # the old file stands whole, and no temporary is left
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]


# ---------------------------------------------------------------------------------------------
# Names that are not local paths go through datasets.load_dataset, as TRL loads them.


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Offline mode, and a datasets cache holding "trl-lib/Capybara" (train: ROWS[:2], test:
    ROWS[2:]) as a first online load_dataset would have left it: the cache a local folder named
    capybara writes, moved to the Hub name's place."""
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "src" / "capybara"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", [json.dumps(r) for r in ROWS[:2]])
    write_jsonl(repo / "data" / "test.jsonl", [json.dumps(r) for r in ROWS[2:]])
    cache = datasets.config.HF_DATASETS_CACHE
    datasets.load_dataset(str(repo), cache_dir=str(cache))
    (cache / "capybara").rename(cache / "trl-lib___capybara")
    return cache


def test_hub_name_loads_offline_from_the_cache_with_its_split(offline_hub):
    train = load_records("trl-lib/Capybara")
    assert [dict(r) for r in train] == ROWS[:2]
    assert train[1].where == "trl-lib/Capybara[train]:row 1"
    test = load_records("trl-lib/Capybara", split="test")
    assert [dict(r) for r in test] == ROWS[2:] and test[0].where == "trl-lib/Capybara[test]:row 0"
    with pytest.raises(DataError, match=r"^trl-lib/Capybara\[valid\]: .*Unknown split \"valid\""):
        load_records("trl-lib/Capybara", split="valid")
    with pytest.raises(DataError, match=r"^trl-lib/Capybara\[other\]\[train\]: .*"
                                        r"Couldn't find cache for trl-lib/Capybara for config 'other'"):
        load_records("trl-lib/Capybara", subset="other")
    with pytest.raises(DataError, match=r"^trl-lib/Nope\[train\]: no local file or folder of that "
                                        r"name, and datasets.load_dataset cannot load it: "
                                        r"ConnectionError: Couldn't reach 'trl-lib/Nope'"):
        load_records("trl-lib/Nope")


def test_local_folder_with_data_files_and_split_keeps_file_and_line(tmp_path):
    (tmp_path / "repo").mkdir()
    a = write_jsonl(tmp_path / "repo" / "a.jsonl", [json.dumps(r) for r in ROWS[:2]])
    b = write_jsonl(tmp_path / "repo" / "b.jsonl", [json.dumps(r) for r in ROWS[2:]])
    files = {"train": "a.jsonl", "test": "b.jsonl"}
    test = load_records(tmp_path / "repo", split="test", data_files=files)
    assert [dict(r) for r in test] == ROWS[2:] and test[0].where == f"{b}:1"
    assert [r.where for r in load_records(tmp_path / "repo", data_files=files)] == [f"{a}:1", f"{a}:2"]
    # one file named: datasets makes it the train split
    assert [dict(r) for r in load_records(tmp_path / "repo", data_files="b.jsonl")] == ROWS[2:]
    with pytest.raises(DataError, match=r"repo: no split 'valid' \(available: train, test\)"):
        load_records(tmp_path / "repo", split="valid", data_files=files)
    # a builder name with data_files: load_dataset("json", data_files=..., split=...)
    rows = load_records("json", split="test", data_files={"train": str(a), "test": str(b)})
    assert [dict(r) for r in rows] == ROWS[2:] and rows[0].where == "json[test]:row 0"
    with pytest.raises(DataError, match=r"a.jsonl: data_files and subset select files of a folder"):
        load_records(a, data_files="b.jsonl")
    with pytest.raises(DataError, match=r"^no such file or directory: data/missing.parquet$"):
        load_records("data/missing.parquet")
