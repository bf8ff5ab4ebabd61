"""Fuzzing (hypothesis): no command-line override and no data record ends in a traceback.

* Overrides: for every stage, ``alignkit <stage> key=value ...`` loads a valid config or stops with
  one ``ConfigError`` line that names a key; through :func:`alignkit.cli.main` that is exit code 2
  and exactly that line (the stage's ``main`` is replaced by a recorder: nothing is trained). The
  pipeline counts as loaded only once every stage config it composes is built, as its ``main``
  does before running anything.
* Data: :func:`load_records` and :func:`build_dataset` on arbitrary JSON-lines files (any format,
  plain and ``chat=True``) give rows, or a ``DataError`` whose message starts with ``path:LINE:``,
  LINE being the first line that is wrong.

Settings are derandomized, so CI runs the same cases every time. Each ``@example`` is an input
that once crashed (see the commit that added it), kept as a regression.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import re
import types
import typing
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from alignkit import cli
from alignkit.config import ConfigError, build, load_config, to_dict
from alignkit.data.formats import FORMATS, ROLES, build_dataset, detect_format
from alignkit.data.io import DataError, load_records
from alignkit.stages import STAGES

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MODULES = {name: importlib.import_module(path) for name, path in STAGES.items()}
PIPELINE = MODULES["pipeline"]


# --- the keys of each stage, walked from its Config dataclasses ------------------------------

def dotted_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of dataclass ``cls`` (sections and the keys inside) -> its annotation."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = out[prefix + f.name] = hints[f.name]
        section = next((a for a in (tp, *get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            out.update(dotted_keys(section, f"{prefix}{f.name}."))
    return out


def _pipeline_keys() -> dict[str, Any]:
    keys = {k: tp for k, tp in dotted_keys(PIPELINE.Config).items() if k != "sections"}
    for section, path in PIPELINE.MODULES.items():
        stage_keys = dotted_keys(importlib.import_module(path).Config)
        for name in (section, f"{section}@dpo", f"{section}@ai"):
            keys[name] = dict
            keys.update({f"{name}.{k}": tp for k, tp in stage_keys.items()})
    judge = dotted_keys(MODULES["label-ai"].Config)
    keys.update({k: tp for k, tp in judge.items() if k.startswith("judge")})
    return keys


KEYS = {name: _pipeline_keys() if name == "pipeline" else dotted_keys(m.Config)
        for name, m in MODULES.items()}

SHALLOW = {name: sorted(k for k in keys if "." not in k)
           for name, keys in KEYS.items()}

# The required keys of each stage, so that most cases get past them to the other checks.
REQUIRED = {"base": [], "sft": ["model=m", "data.train=d.jsonl"], "rm": ["model=m", "data.train=d.jsonl"],
            "dpo": ["model=m", "data.train=d.jsonl"], "label": ["policy=p"],
            "label-ai": ["pairs_dir=p", "judge.model=j"], "judge-model": ["model=m"],
            "evaluate": ["policy=p", "task=sentiment"], "ppo": ["model=m", "reward=gold:sentiment", "task=sentiment"],
            "rest": ["model=m", "reward=gold:sentiment", "task=sentiment"],
            "bon": ["policy=p", "reward=gold:sentiment", "task=sentiment"],
            "pipeline": ["stages=[base, sft, label, rm, dpo, ppo, rest, bon, judge_model, label_ai, "
                         "evaluate@dpo]"]}


# --- strategies: override values --------------------------------------------------------------

SURROGATES = st.characters(categories=["Cs"])
ANY_CHAR = st.one_of(st.characters(), SURROGATES, st.sampled_from(list("=.:[]{},#&*!|>'\"\n\r\t ")))

YAML_NASTIES = [
    "", "=", "a=b", "==", "null", "~", "yes", "no", "on", "off", "[]", "{}", "[1, [2, [3]]]",
    "{a: {b: 1}}", "{1: 2}", "{null: 1}", "{true: x}", "{[1]: 2}", "{? [1] : 2}", "[{}]", "[[]]",
    "&a [*a]", "&a {x: *a}", "[&a [*a]]", "!!binary aGVsbG8=", "!!set {a, b}", "2001-12-14",
    "2001-13-45", "2001-12-14 21:59:43.10 -5", "!!float abc", "!!int x", "!!bool maybe",
    "!!python/object/apply:os.system [ls]", "'unterminated", "[1, 2", "- a\n- b", "a: 1\nb: 2",
    "key: value", "1:2:3", "0o17", "0b101", "0x1F", ".5", "1_000", "+1", "-0", "1e400", "-1e400",
    "1e-400", ".nan", ".inf", "-.inf", "NaN", "nan", "inf", "1" + "0" * 400, "-" + "9" * 400,
    "9" * 5000, "0x" + "f" * 4000, "[" * 3000, "{a: " * 2000, "\x00", "\ud800", "\udcff",
    "é", "日本語", "\u2028", "\x85", "%TAG ! x", "---", "...", "|\n  block", "*undefined",
    "!!str", "! x", "@", "`", "#comment", "a # comment", "[a, b]=c", "\t", " ", "x" * 10000,
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(ANY_CHAR, max_size=6), inner,
                                                               max_size=3),
    max_leaves=8)


def junk_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(YAML_NASTIES), st.text(ANY_CHAR, max_size=12),
                     st.integers().map(str), st.floats().map(repr),
                     json_values.map(lambda v: json.dumps(v, ensure_ascii=False)))


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


# Numbers at the edges: beyond a float, beyond 64 bits, beyond Python's 4300-digit int parsing.
EDGE_NUMBERS = st.sampled_from(["1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 30, str(2**63),
                                "0x" + "f" * 4000, "9" * 5000, ".nan", ".inf", "-.inf", "-1", "0",
                                "1e-400", "-0.0"])


def typed_values(tp: Any) -> st.SearchStrategy[str]:
    """YAML text that fits annotation ``tp`` (often valid, so cases reach ``__post_init__``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return st.sampled_from([json.dumps(a) for a in get_args(tp)])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.just("null") if a is type(None) else typed_values(a) for a in get_args(tp)])
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return st.lists(typed_values(item), max_size=3).map(_flow)
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        # a section: mappings, and what a section must not be (where crashes were)
        return st.sampled_from(["{}", "{lr: 0.1}", "{chat: true}", "{model: m}", "{judge: x}", "null",
                                "x", "3", "[1]"])
    if tp is bool:
        return st.sampled_from(["true", "false", "yes", "off"])
    if tp is int:
        return st.integers(0, 64).map(str)
    if tp is float:
        return st.one_of(st.floats(0, 1, allow_nan=False).map(repr), st.integers(0, 5).map(str))
    if tp is str:
        return st.text("abcdefgt:/._-@ ", min_size=1, max_size=10) | st.sampled_from(
            ["sentiment", "arithmetic", "gold:sentiment", "model:m", "task:sentiment", "dpo", "sft@x"])
    return st.sampled_from(["x", "1", "{}", "[]"])


def values_for(tp: Any | None) -> st.SearchStrategy[str]:
    if tp is None:
        return junk_values()
    numeric = any(t in (int, float) for t in (tp, *get_args(tp)))
    return st.one_of(typed_values(tp), typed_values(tp), EDGE_NUMBERS if numeric else typed_values(tp),
                     junk_values())


JUNK_KEYS = st.one_of(
    st.sampled_from(["", ".", "a..b", "optim.", ".lr", " model ", "x", "model.x", "optim.lr.x",
                     "__class__", "sections", "sections.sft", "stages.x", "é", "\ud800",
                     "sft@", "@dpo.beta", "judge.judge", "a" * 300]),
    st.text(ANY_CHAR.filter(lambda c: c != "="), max_size=8))


@st.composite
def stage_argv(draw) -> tuple[str, list[str]]:
    """A stage and its overrides: real keys, junk keys, key=value pairs, items without '=' and the
    same key twice."""
    stage = draw(st.sampled_from(sorted(STAGES) + ["pipeline"] * 2))   # the pipeline composes all
    keys = KEYS[stage]
    wild = draw(st.booleans())   # else: the required keys, then real keys with fitting values
    argv = [] if wild and draw(st.booleans()) else list(REQUIRED[stage])
    for _ in range(draw(st.integers(0, 5 if wild else 3))):
        if not wild:
            key = draw(st.sampled_from(sorted(keys)))
            argv.append(f"{key}={draw(typed_values(keys[key]))}")
            continue
        kind = draw(st.integers(0, 9))
        if kind == 0:   # no '=' at all
            argv.append(draw(st.sampled_from(sorted(keys)) | st.text(ANY_CHAR.filter(lambda c: c != "="),
                                                                      max_size=10)))
            continue
        # Top-level keys and sections half the time, or the long tail of a big tree hides them.
        pool = SHALLOW[stage] if kind < 4 else sorted(keys)
        key = draw(st.sampled_from(pool)) if kind < 7 else draw(JUNK_KEYS)
        argv.append(f"{key}={draw(values_for(keys.get(key.strip())))}")
    if argv and wild and draw(st.booleans()):   # a key given again, with another value
        key = draw(st.sampled_from(argv)).partition("=")[0]
        argv.append(f"{key}={draw(values_for(keys.get(key.strip())))}")
    return stage, argv


# --- the property: a valid config, or one line naming a key -----------------------------------

@pytest.fixture(scope="module")
def empty_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fuzz_cfg") / "pipeline.yaml"
    path.write_text("{}\n")
    return str(path)


def load_stage(stage: str, overrides: list[str], config: str) -> tuple[Any, list[Any]]:
    """The config ``alignkit <stage>`` runs with (for the pipeline: and each stage's config).
    A stage with its own file layout (``load``: the pipeline, the judge stages) gets ``config``,
    an empty YAML file, as the CLI requires ``--config`` for those."""
    module = MODULES[stage]
    if not hasattr(module, "load"):
        return load_config(module.Config, None, overrides), []
    cfg = module.load(config, overrides)
    if stage == "pipeline":
        return cfg, [PIPELINE.stage_config(name, cfg)[1] for name in cfg.stages]
    return cfg, []


def _key_names(stage: str, overrides: list[str]) -> set[str]:
    names = set()
    for key in KEYS[stage]:
        names.add(key)
        names.update(key.replace("@", ".").split("."))
    for item in overrides:
        key = item.partition("=")[0] if "=" in item else item
        for part in {key, key.strip(), *key.strip().split(".")}:
            names.update({part, repr(part)})
    return {n for n in names if n.strip()}


def names_a_key(message: str, stage: str, overrides: list[str]) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) if len(n) < 3 else n in message
               for n in _key_names(stage, overrides))


def _same_config(a: Any, b: Any) -> bool:
    return repr(to_dict(a)) == repr(to_dict(b))   # repr: NaN settings compare equal


def assert_saveable(cfg: Any) -> None:
    """What every stage does first (``save_config``, the resume fingerprint): dump it as YAML (UTF-8
    text), and read the dump back to the same config. (libyaml: the same YAML, faster.)"""
    text = yaml.dump(to_dict(cfg), Dumper=yaml.CSafeDumper, sort_keys=False)
    text.encode("utf-8")
    again = build(type(cfg), yaml.load(text, Loader=yaml.CSafeLoader))
    assert _same_config(again, cfg)


def _value_at(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def assert_overrides_landed(cfg: Any, stage: str, overrides: list[str]) -> None:
    """The last value of each plain key given (no section of it set as well) is the config's."""
    final = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        final[key.strip()] = raw
    for key, raw in final.items():
        tp = KEYS[stage].get(key)
        if tp not in (int, bool, str) or any(key.startswith(k + ".") for k in final):
            continue
        try:
            value = yaml.safe_load(raw)
        except Exception:
            continue
        if type(value) is tp:
            assert _value_at(cfg, key) == value, (key, raw)


def outcome(stage: str, overrides: list[str], config: str) -> Any:
    """The config loaded, or the one line ``alignkit <stage>`` prints for the ConfigError."""
    try:
        cfg, parts = load_stage(stage, overrides, config)
    except ConfigError as exc:
        message = str(exc)
        event(f"{stage}: ConfigError")
        assert message.strip() and "\n" not in message and "\r" not in message, message
        assert names_a_key(message, stage, overrides), message
        return f"alignkit {stage}: {message}"
    event(f"{stage}: config")
    assert isinstance(cfg, MODULES[stage].Config)
    # The pipeline hands its sections on as they are; the configs built from them are what run.
    for c in parts if stage == "pipeline" else [cfg]:
        assert_saveable(c)
    if stage != "pipeline":
        assert_overrides_landed(cfg, stage, overrides)
    return cfg


def test_required_keys_alone_load_and_the_walk_finds_every_section(empty_yaml):
    """The fuzzer's starting points are valid, so cases do reach every later check."""
    assert {"optim.lr", "train.batch_size", "data.train", "lora.r"} <= set(KEYS["sft"])
    assert {"rollout.sampling.top_p", "ppo.algo", "kl.beta"} <= set(KEYS["ppo"])
    assert {"sft.optim.lr", "evaluate@dpo.num_prompts", "judge.http.base_url"} <= set(KEYS["pipeline"])
    for stage in STAGES:
        cfg, parts = load_stage(stage, REQUIRED[stage], empty_yaml)
        assert isinstance(cfg, MODULES[stage].Config)
        assert len(parts) == (11 if stage == "pipeline" else 0)


FF = "0x" + "f" * 4000   # an integer of 4817 digits: Python refuses to print it
SFT = ["model=m", "data.train=d.jsonl"]


@settings(FUZZ, max_examples=500)
@given(case=stage_argv())
# Each of these once ended in a traceback:
@example(case=("pipeline", ["stages=[bon]"]))                 # wiring gave bon 'model', not 'policy'
@example(case=("pipeline", ["label=x"]))                      # AttributeError: str has no .get
@example(case=("pipeline", ["stages=[evaluate@dpo]", "evaluate=3"]))   # TypeError in _merge
@example(case=("pipeline", ["stages=[label_ai]", "label_ai={judge: x}"]))   # AttributeError
@example(case=("sft", [*SFT, "optim.lr=1" + "0" * 400]))     # OverflowError: int to float
@example(case=("evaluate", ["policy=p", "task=sentiment", f"split={FF}"]))      # ValueError: str() of the int
@example(case=("base", [f"arch={FF}"]))                       # ValueError: repr() in the message
@example(case=("base", [f"arch.hidden_size={FF}"]))           # accepted, then unsaveable
@example(case=("sft", [*SFT, "model=" + "9" * 5000]))        # ValueError: YAML int digits limit
@example(case=("sft", [*SFT, "model=2001-13-45"]))           # ValueError: YAML date, month 13
@example(case=("sft", [*SFT, "model=" + "[" * 3000]))        # RecursionError in YAML
@example(case=("sft", [*SFT, "optim={1: 2}"]))               # TypeError: str + int key
@example(case=("sft", [*SFT, "optim={1: 2, a: 3}"]))         # TypeError: sorting str and int keys
@example(case=("label-ai", ["pairs_dir=p", "judge.model=j", "judge.pairwise.few_shot="
                            "[&a {prompt: *a, response_a: b, response_b: c, answer: 1}]"]))  # cyclic
def test_overrides_give_a_config_or_one_line_naming_the_key(case, empty_yaml):
    outcome(*case, empty_yaml)


def test_bare_dict_settings_take_their_entries(empty_yaml):
    """Found by the fuzzer's typed values: ``list[dict]`` (few-shot examples) refused every entry
    ("unsupported annotation <class 'dict'>"), so no judge could have few-shot examples."""
    shot = {"prompt": "p", "response_a": "a", "response_b": "b", "answer": "1"}
    cfg, _ = load_stage("label-ai", [*REQUIRED["label-ai"], f"judge.pairwise.few_shot=[{json.dumps(shot)}]"],
                        empty_yaml)
    assert cfg.judge.pairwise.few_shot == [shot]
    with pytest.raises(ConfigError, match=r"^config key 'judge.pairwise.few_shot\[0\]': expected a mapping"):
        load_stage("label-ai", [*REQUIRED["label-ai"], "judge.pairwise.few_shot=[1]"], empty_yaml)


@settings(FUZZ, max_examples=100)
@given(case=stage_argv())
def test_cli_exits_2_with_that_line_and_runs_nothing_else(case, empty_yaml):
    stage, overrides = case
    # A leading '-' is a flag (argparse's own errors; --overwrite deletes runs): not fuzzed here.
    argv = ["k" + o if o.startswith("-") else o for o in overrides]
    expected = outcome(stage, argv, empty_yaml)
    seen = []

    def record(cfg):   # the pipeline's main builds its stages' configs before running anything
        seen.append(cfg)
        if stage == "pipeline":
            for name in cfg.stages:
                PIPELINE.stage_config(name, cfg)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stderr(err), redirect_stdout(io.StringIO()):
        mp.setattr(MODULES[stage], "main", record)
        config = ["--config", empty_yaml] if hasattr(MODULES[stage], "load") else []
        try:
            cli.main([stage, *config, *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    if isinstance(expected, str):
        assert (code, err.getvalue()) == (2, expected + "\n")
    else:
        assert code == 0 and err.getvalue() == "" and len(seen) == 1
        assert _same_config(seen[0], expected)


# --- data: strategies ---------------------------------------------------------------------------

WORDS = "the film was good bad plot great acting boring fine a an it and".split()
CLEAN = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
WILD = st.lists(st.one_of(ANY_CHAR, st.sampled_from(["<|eos|>", "<|bos|>", "<|user|>", "<|assistant|>",
                                                     "<|pad|>", "\u2028", "\x85", "{{", "{%"])),
                max_size=12).map("".join)
TEXT = st.one_of(CLEAN, CLEAN, WILD, st.sampled_from(["", " ", "good " * 3000, "\ud800x", "\udcff"]))


def well_formed(text: st.SearchStrategy[str]) -> dict[str, st.SearchStrategy[dict]]:
    """Records of each format (and "auto": of any), their texts drawn from ``text``."""
    def turn(role):
        return st.fixed_dictionaries({"role": st.just(role), "content": text})

    conversation = st.tuples(st.lists(turn("system"), max_size=1), turn("user"), turn("assistant"),
                             st.lists(st.tuples(turn("user"), turn("assistant")), max_size=1)
                             ).map(lambda t: [*t[0], t[1], t[2], *[m for pair in t[3] for m in pair]])
    answer = st.one_of(text, st.lists(turn("assistant"), min_size=1, max_size=2))
    prompt = st.one_of(text, st.lists(turn("user"), min_size=1, max_size=2))
    formats = {
        "prompt_completion": st.fixed_dictionaries({"prompt": prompt, "completion": answer}),
        "messages": st.fixed_dictionaries({"messages": conversation}),
        "preference": st.one_of(
            st.fixed_dictionaries({"prompt": prompt, "chosen": answer, "rejected": answer}),
            st.fixed_dictionaries({"chosen": conversation, "rejected": conversation})),
        "unpaired": st.fixed_dictionaries({"prompt": prompt, "completion": answer, "label": st.booleans()}),
        "prompt": st.one_of(st.fixed_dictionaries({"prompt": prompt}),
                            st.fixed_dictionaries({"messages": st.lists(turn("user"), min_size=1,
                                                                        max_size=2)})),
    }
    return {**formats, "auto": st.one_of(*formats.values())}


CLEAN_RECORDS, WILD_RECORDS = well_formed(CLEAN), well_formed(TEXT)

FIELDS = ["prompt", "completion", "messages", "chosen", "rejected", "label", "role", "content", "text"]
MESSAGE_JUNK = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["role", "content", "name"]),
                    st.one_of(st.sampled_from([*ROLES, "tool", "", "User"]), TEXT, json_values), max_size=3),
    json_values), max_size=3)
JUNK_RECORD = st.dictionaries(st.sampled_from(FIELDS) | st.text(ANY_CHAR, max_size=4),
                              st.one_of(TEXT, MESSAGE_JUNK, json_values), max_size=5)

JUNK_LINES = [
    "[" * 5000, "{\"a\": " * 3000, "1" * 5000, '{"prompt": ' + "1" * 5000 + ', "completion": "x"}',
    "{", "}", "[]", "null", "NaN", '{"prompt": NaN, "completion": Infinity}', "\x00", "\ufeff{}",
    '{"prompt": "\\ud800", "completion": "x"}', '{"prompt": "a", "completion": "b\\udcff"}',
    '{"prompt": "a\u2028b", "completion": "c\x85d"}', '{"prompt": "a", "completion": "b"} trailing',
    '{"prompt": "a", "prompt": "b", "completion": "c"}', "\x1c", "\u2029", "\x0c", "\r",
]


def dumps(record: Any, ascii_only: bool) -> str:
    return json.dumps(record, ensure_ascii=ascii_only)


LINE = st.one_of(
    st.builds(dumps, JUNK_RECORD, st.booleans()),
    st.builds(dumps, json_values, st.booleans()),
    st.sampled_from(JUNK_LINES),
    st.text(ANY_CHAR, max_size=20),
    st.binary(max_size=24),
)


@st.composite
def jsonl_file(draw, format: str = "auto") -> bytes:
    """Records of ``format`` (as JSON, ASCII or not), of plain words or of wild text among junk
    lines; blank lines, LF or CRLF, a byte-order mark."""
    clean = draw(st.booleans())   # else: wild texts, and junk lines among the records
    records = (CLEAN_RECORDS if clean else WILD_RECORDS)[format]
    lines = [dumps(r, draw(st.booleans())) for r in draw(st.lists(records, max_size=4))]
    for _ in range(0 if clean else draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(LINE))
    if draw(st.integers(0, 4)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), "")
    eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    data = eol.join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines)
    data += eol if draw(st.booleans()) else b""
    return (b"\xef\xbb\xbf" if draw(st.integers(0, 9)) == 0 else b"") + data


# --- data: the properties -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    """The tiny_base tokenizer (tests/conftest.py): BPE on the sentiment corpus, vocabulary 400,
    with alignkit's chat template."""
    from alignkit.engine.tokenizer import train_tokenizer
    from alignkit.tasks import get_task

    return train_tokenizer(get_task("sentiment").corpus(400, seed=0), vocab_size=400)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_data") / "train.jsonl"


def read_independently(data: bytes) -> tuple[list[tuple[int, dict]], int | None]:
    """The records (line number, object) of JSON-lines ``data`` and the first bad line (None when
    all are good), read without alignkit: lines end at LF only, as editors count them."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], data[:e.start].count(b"\n") + 1
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return records, number
        if not isinstance(obj, dict):
            return records, number
        records.append((number, obj))
    return records, None


def line_of(message: str, path) -> int:
    match = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
    assert match, f"the message does not start with {path}:LINE: {message!r}"
    return int(match.group(1))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


@settings(FUZZ, max_examples=250)
@given(data=jsonl_file())
@example(data=b"[" * 5000)                                           # RecursionError
@example(data=b'{"prompt": "a", "completion": "b"}\n' + b"1" * 5000)  # int digits limit: ValueError
@example(data='{"prompt": "a\u2028b", "completion": "c"}\n[1]'.encode())  # U+2028 is no line end
@example(data=b'{"prompt": "a"}\n\n{"prompt": "\xff"}')               # names the line of the byte
@example(data=b'[{"prompt": "a"}]')                                  # .jsonl: an array is one bad line
def test_load_records_reads_every_line_or_names_the_first_bad_one(data, data_path):
    data_path.write_bytes(data)
    expected, bad_line = read_independently(data)
    try:
        records = load_records(data_path)
    except DataError as exc:
        assert line_of(str(exc), data_path) == bad_line, str(exc)
        return
    assert bad_line is None
    assert [(r.index, _canonical(dict(r))) for r in records] == [(n, _canonical(o)) for n, o in expected]


def _rows_are_consistent(rows: list[dict], max_length: int) -> None:
    for row in rows:
        for prefix in ("", "chosen_", "rejected_"):
            ids = row.get(prefix + "input_ids")
            if ids is None:
                continue
            assert 1 <= len(ids) <= max_length and all(isinstance(i, int) and i >= 0 for i in ids)
            if prefix + "labels" in row:
                assert len(row[prefix + "labels"]) == len(ids)


@st.composite
def dataset_case(draw) -> tuple[str, bool, bytes, int]:
    """A format (or auto), chat on or off, a file (mostly of that format) and a max_length."""
    format = draw(st.sampled_from(["auto", *FORMATS]))
    raw = draw(jsonl_file(format if draw(st.integers(0, 3)) else "auto"))
    return format, draw(st.booleans()), raw, draw(st.integers(2, 48))


@settings(FUZZ, max_examples=250)
@given(case=dataset_case())
# TypeError from the tokenizer: a lone surrogate ("\ud800" in JSON) in a message
@example(case=("auto", False, b'{"messages": [{"role": "user", "content": "hi"}, '
                              b'{"role": "assistant", "content": "\\ud800"}]}', 16))
@example(case=("prompt", True, b'{"prompt": "a\\udcff"}', 16))
# AssertionError: a string chosen beside a chat rejected tokenised the prompt two ways
@example(case=("preference", False, b'{"prompt": "the", "chosen": "the", '
                                    b'"rejected": [{"role": "assistant", "content": "the"}]}', 2))
def test_build_dataset_tokenises_every_record_or_names_the_first_bad_line(case, tok, data_path):
    format, chat, raw, max_length = case
    data_path.write_bytes(raw)
    _, bad_line = read_independently(raw)
    try:
        rows, stats = build_dataset(data_path, tok, format=format, max_length=max_length, chat=chat)
    except DataError as exc:
        message = str(exc)
        event(f"{format}, chat={chat}: DataError")
        if message == f"{data_path}: no records":
            assert not load_records(data_path)
            return
        line = line_of(message, data_path)
        if bad_line is not None:
            assert line == bad_line, message
            return
        records = load_records(data_path)
        numbers = [r.index for r in records]
        assert line in numbers, message
        before = records[:numbers.index(line)]
        if before:   # every record before the line named is fine (as the first of the file)
            fmt = detect_format(records[0]) if format == "auto" else format
            build_dataset(before, tok, format=fmt, max_length=max_length, chat=chat)
        return
    event(f"{format}, chat={chat}: {'rows' if rows else 'no rows kept'}")
    assert bad_line is None
    assert stats.total == len(load_records(data_path)) and stats.kept + stats.dropped == stats.total
    assert len(rows) == stats.kept and stats.truncated <= stats.kept
    _rows_are_consistent(rows, max_length)
