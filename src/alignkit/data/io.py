"""Load dataset records from local files, folders or Hub datasets, keeping where each one came from.

Every record carries its provenance so that a validation error can name the exact place to fix:
``data/train.jsonl:17: field 'chosen': chosen and rejected are identical``. JSON lines are counted
from 1 (as editors count them); Parquet and ``datasets`` rows are counted from 0 (as pandas and
``datasets`` index them) and are written ``file:row 5`` (``trl-lib/Capybara[train]:row 5``) so the
two cannot be confused.

A name that is not a local path goes to ``datasets.load_dataset`` as TRL passes it (name, subset,
``split``, ``data_files``): a Hub dataset is read from the local cache when it is there, and
``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` keep it from ever asking the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# A missing path with one of these suffixes is a typo'd file, not a dataset name.
KNOWN_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst")


class DataError(ValueError):
    """A problem with one record, reported as ``where: field 'name': message``.

    ``where`` and ``field`` are optional so that file-level problems (a missing file) use the same
    type. The formatted text is the exception's only argument, which keeps it picklable.
    """

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        self.where = where
        self.field = field
        self.reason = message
        prefix = f"{where}: " if where else ""
        if field:
            prefix += f"field '{field}': "
        super().__init__(prefix + message)


@dataclass(frozen=True)
class Record(Mapping):
    """One dataset record (a JSON object / table row) plus where it came from.

    Behaves as a read-only mapping over ``data``. ``unit`` is ``"line"`` (1-based) for JSON lines
    or ``"row"`` (0-based) for tables and JSON arrays.
    """

    data: Mapping[str, Any]
    source: str
    index: int
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.source}:{self.index}" if self.unit == "line" else f"{self.source}:row {self.index}"

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(message, where=self.where, field=field)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


DataFiles = str | list[str] | dict[str, str | list[str]]


def load_records(path: str | Path, split: str = "train", subset: str | None = None,
                 data_files: DataFiles | None = None) -> list[Record]:
    """Read every record of a dataset.

    ``path`` may be a ``.jsonl``/``.json`` file (JSON lines; blank lines skipped; a ``.json`` file
    holding one top-level array also works), a ``.parquet`` file, a folder written by
    ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, any folder ``datasets.load_dataset``
    can read (e.g. ``data/train-*.jsonl`` files, a script-less Hub-style repository), or a name
    that is no local path: a Hub dataset (``trl-lib/Capybara``) or a ``datasets`` builder
    (``json`` with ``data_files``), loaded with ``datasets.load_dataset``. ``split`` picks the
    split of a ``DatasetDict``, of a multi-split folder or of a Hub dataset; a single file is a
    single split. ``subset`` (the Hub's subset, ``load_dataset``'s ``name``) and ``data_files``
    (relative to the folder) apply to folders and names.
    """
    p = Path(path)
    if not p.exists():
        if p.suffix.lower() in KNOWN_SUFFIXES or str(path).startswith((".", "/", "~")):
            raise DataError(f"no such file or directory: {path}")
        return _read_named_dataset(str(path), split, subset, data_files)
    if p.is_file():
        if data_files is not None or subset is not None:
            raise DataError("data_files and subset select files of a folder or a named dataset, "
                            "not of a single file", where=str(path))
        return _read_file(p, str(path))
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        return _read_saved_dataset(p, str(path), split)
    return _read_dataset_folder(p, str(path), split, subset, data_files)


def _read_file(p: Path, source: str) -> list[Record]:
    suffix = p.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_json(p, source)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(p, source)
    raise DataError(f"unsupported file type '{suffix}' (expected .jsonl, .json or .parquet)", where=source)


_BOM = b"\xef\xbb\xbf"


def _read_json(p: Path, source: str) -> list[Record]:
    data = p.read_bytes()
    body = data.removeprefix(_BOM)   # tolerate the byte-order mark some editors write
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body[:e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start + len(data) - len(body)})",
                        where=f"{source}:{line}") from e
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _read_json_array(text, source)
    records = []
    # Lines end at "\n" only (a "\r" before it is JSON whitespace), as editors count them:
    # str.splitlines also breaks at U+2028, U+0085 and \x1c, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        obj = _parse_json(line, where)
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {_json_type(obj)}", where=where)
        records.append(Record(obj, source, number, "line"))
    return records


def _parse_json(text: str, where: str) -> Any:
    """``json.loads`` of one line; what it refuses is a :class:`DataError` at ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=where) from e
    except ValueError as e:   # an integer of more than 4300 digits
        raise DataError(f"invalid JSON: {str(e).split(';')[0]}", where=where) from e
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", where=where) from None


def _read_json_array(text: str, source: str) -> list[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{source}:{e.lineno}") from e
    except ValueError as e:
        raise DataError(f"invalid JSON: {str(e).split(';')[0]}", where=source) from e
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", where=source) from None
    records = []
    for row, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {_json_type(obj)}", where=f"{source}:row {row}")
        records.append(Record(obj, source, row, "row"))
    return records


def _json_type(obj: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def _read_parquet(p: Path, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read Parquet: {e}", where=source) from e
    return [Record(row, source, i, "row") for i, row in enumerate(rows)]


def _read_saved_dataset(p: Path, source: str, split: str) -> list[Record]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' (available: {', '.join(ds)})", where=source)
        ds = ds[split]
        source = f"{source}[{split}]"
    return [Record(row, source, i, "row") for i, row in enumerate(ds.to_list())]


def _read_dataset_folder(p: Path, source: str, split: str, subset: str | None = None,
                         data_files: DataFiles | None = None) -> list[Record]:
    """A folder in any layout ``datasets.load_dataset`` understands.

    ``datasets`` resolves which files belong to ``split`` (file-name patterns, README configs,
    ``subset``, ``data_files``). Files we can read ourselves are read here, so errors name the
    real file and line; anything else (CSV, compressed files...) is loaded by ``datasets`` and
    named by row.
    """
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(p), subset, data_files=data_files)
    except Exception as e:  # datasets raises several unrelated types for "cannot infer a dataset"
        raise DataError(f"not a dataset folder datasets can read: {_first_line(e)}",
                        where=source) from e
    resolved = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    if split not in resolved:
        available = ", ".join(resolved) or "none"
        raise DataError(f"no split '{split}' (available: {available})", where=source)
    files = [Path(f) for f in resolved[split]]
    if all(f.suffix.lower() in JSON_SUFFIXES + PARQUET_SUFFIXES for f in files):
        return [r for f in sorted(files) for r in _read_file(f, str(f))]
    ds = datasets.load_dataset(str(p), subset, split=split, data_files=data_files)
    return [Record(row, f"{source}[{split}]", i, "row") for i, row in enumerate(ds.to_list())]


def _read_named_dataset(name: str, split: str, subset: str | None,
                        data_files: DataFiles | None) -> list[Record]:
    """``datasets.load_dataset(name, subset, split=split, data_files=data_files)``: a Hub dataset
    (from the local cache when it is there; offline with ``HF_DATASETS_OFFLINE=1``) or a builder
    such as ``json``. Records are named ``name[split]:row N`` (``name[subset][split]``)."""
    import datasets

    source = f"{name}[{subset}][{split}]" if subset else f"{name}[{split}]"
    try:
        ds = datasets.load_dataset(name, subset, split=split, data_files=data_files)
    except Exception as e:  # not found, not cached while offline, unknown split or subset, ...
        raise DataError(f"no local file or folder of that name, and datasets.load_dataset "
                        f"cannot load it: {_first_line(e)}", where=source) from e
    if not isinstance(ds, datasets.Dataset):   # an IterableDataset (streaming) or a dict
        raise DataError(f"expected one split, got {type(ds).__name__}", where=source)
    return [Record(row, source, i, "row") for i, row in enumerate(ds.to_list())]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a file alignkit wrote (one a line, blank lines skipped), as plain
    dicts; user data goes through :func:`load_records`, which names file and line on errors."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n")
            if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[Mapping], ensure_ascii: bool = True) -> int:
    """Write ``rows`` one JSON object a line, atomically (a temporary file, then renamed: a crash
    never leaves a half file), creating the folder; returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
                n += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then renamed), creating the
    folder: a file that marks a step done or caches a result is never seen half-written (a kill
    between ``open`` and the first write would leave it empty)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place, creating the
    folder: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
