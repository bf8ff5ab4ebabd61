"""Dataset formats: detect, validate, tokenise.

Formats (detected from a dataset's first record, or forced with ``format=``):

==================  ==========================================================================
prompt_completion   ``{prompt, completion}``: strings, or chat messages (see below)
messages            ``{messages: [{role, content}, ...]}``: loss on every assistant turn
preference          ``{prompt, chosen, rejected}``; chosen/rejected are strings or messages; the
                    prompt may be absent when chosen/rejected are full conversations, whose shared
                    leading turns are then the prompt (a ``prompt`` field is ignored in that case)
unpaired            ``{prompt, completion, label: bool}`` (KTO-style desirable / undesirable)
prompt              ``{prompt}`` or ``{messages}``: generation-only prompts
==================  ==========================================================================

Roles are ``system``, ``user`` and ``assistant``. When a prompt or completion is a message list,
the pair is rendered with the tokenizer's chat template (a string prompt becomes one user turn, a
string completion one assistant turn); two strings are plain text and no template is used.

Tokenisation rules (the padding and special-token bugs of GUIDE §4 are decided here):

- The prompt and each assistant turn are tokenised separately and concatenated, so the
  prompt/completion boundary is exact and the prompt tokens are those :func:`prompt_ids` feeds
  the model at generation time.
- BOS comes from the tokenizer, once: a text prompt is encoded with the tokenizer's own special
  tokens (``add_special_tokens=True``); a chat is encoded with ``add_special_tokens=False`` because
  the template writes BOS itself (as ``apply_chat_template`` does). A leading BOS that appears twice
  (a prompt whose text already starts with the BOS string) is collapsed to one. Tokenizers that add
  no BOS (GPT-2) get none.
- EOS ends every completion once: appended unless the completion's tokens already end with it
  (text path) or the rendered assistant turn already contains it (chat path).
- Labels are ``IGNORE_INDEX`` on prompt tokens and on non-assistant turns; targets are the
  assistant tokens including that EOS.

Overlong policy (``max_length`` counts prompt + completion tokens):
``"drop"`` drops the example; ``"truncate"`` cuts the completion from the right and keeps the
prompt; if the prompt alone fills ``max_length``, it keeps its last tokens (after BOS), as many as
leave room for the longest completion but never fewer than ``max_length // 2``, then cuts the
completion. Chosen and rejected share one truncated prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.data.io import DataError, Record, load_records
from alignkit.math.logprobs import IGNORE_INDEX

logger = logging.getLogger("alignkit.data")

FORMATS = ("prompt_completion", "messages", "preference", "unpaired", "prompt")
_FIELDS = {"prompt_completion": "prompt, completion", "messages": "messages",
           "preference": "prompt, chosen, rejected", "unpaired": "prompt, completion, label",
           "prompt": "a prompt only"}
ROLES = ("system", "user", "assistant")
Overlong = Literal["truncate", "drop"]

Message = dict[str, str]
Text = str | list[Message]  # a plain string or a chat message list


@dataclass(frozen=True)
class Encoded:
    """One tokenised sequence. ``labels[i]`` is the target at position ``i`` (not shifted)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass(frozen=True)
class DataStats:
    """Counts of one :func:`build_dataset` call; ``kept + dropped == total``, truncated ⊆ kept."""

    total: int
    kept: int
    truncated: int
    dropped: int


# ---------------------------------------------------------------------------------------------
# Parsed samples: a record after validation, before tokenisation.


@dataclass(frozen=True)
class PairSample:
    """prompt_completion, messages (empty prompt, whole conversation as completion) and unpaired."""

    prompt: Text
    completion: Text
    label: bool | None = None


@dataclass(frozen=True)
class PreferenceSample:
    prompt: Text
    chosen: Text
    rejected: Text


@dataclass(frozen=True)
class PromptSample:
    prompt: Text


Sample = PairSample | PreferenceSample | PromptSample


def detect_format(record: Mapping[str, Any]) -> str:
    """Name the format of ``record`` from its fields (see the module docstring for the table).

    ``{messages}`` ending with an assistant turn is ``messages`` (training); otherwise ``prompt``.
    """
    fields = {k for k, v in record.items() if v is not None}
    if "chosen" in fields or "rejected" in fields:
        return "preference"
    if "label" in fields:
        return "unpaired"
    if "completion" in fields:
        return "prompt_completion"
    if "messages" in fields:
        msgs = record["messages"]
        ends_with_answer = isinstance(msgs, list) and msgs and isinstance(msgs[-1], Mapping) \
            and msgs[-1].get("role") == "assistant"
        return "messages" if ends_with_answer else "prompt"
    if "prompt" in fields:
        return "prompt"
    where = record.where if isinstance(record, Record) else None
    raise DataError(f"cannot detect the format from fields {sorted(record)}; expected one of "
                    "{prompt, completion}, {messages}, {prompt, chosen, rejected}, "
                    "{prompt, completion, label} or {prompt}", where=where)


def parse_record(record: Mapping[str, Any], format: str) -> Sample:
    """Validate ``record`` as ``format`` and return its parsed sample; raises :class:`DataError`."""
    rec = record if isinstance(record, Record) else Record(record, "<record>", 0, "row")
    if format not in _PARSERS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    return _PARSERS[format](rec)


def _parse_prompt_completion(rec: Record) -> PairSample:
    return PairSample(_prompt_field(rec, "prompt"), _completion_field(rec, "completion"))


def _parse_messages(rec: Record) -> PairSample:
    messages = _messages(rec, "messages", _required(rec, "messages"))
    if not any(m["role"] == "assistant" for m in messages):
        raise rec.error("messages", "no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise rec.error("messages[0].role", "the conversation must not start with an assistant turn: "
                                            "the first answer would have nothing to condition on")
    _check_targets(rec, "messages", messages)
    return PairSample([], messages)


def _parse_unpaired(rec: Record) -> PairSample:
    pair = _parse_prompt_completion(rec)
    label = _required(rec, "label")
    if not isinstance(label, bool):
        raise rec.error("label", f"expected a boolean (true/false), got {type(label).__name__} {label!r}")
    return PairSample(pair.prompt, pair.completion, label)


def _parse_preference(rec: Record) -> PreferenceSample:
    chosen = _completion_field(rec, "chosen", allow_full_conversation=True)
    rejected = _completion_field(rec, "rejected", allow_full_conversation=True)
    if isinstance(chosen, list) != isinstance(rejected, list):
        # One answer in chat turns makes the pair chat: the string one is one assistant turn (as a
        # string completion beside a chat prompt is), so both answers share one prompt rendering.
        chosen, rejected = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
    if chosen == rejected:
        raise rec.error("chosen", "chosen and rejected are identical")
    if _is_full_conversation(chosen) or _is_full_conversation(rejected):
        return _split_conversations(rec, chosen, rejected)
    return PreferenceSample(_prompt_field(rec, "prompt"), chosen, rejected)


def _parse_prompt(rec: Record) -> PromptSample:
    if rec.get("prompt") is not None:
        prompt = _prompt_field(rec, "prompt")
        field = "prompt"
    else:
        prompt = _messages(rec, "messages", _required(rec, "messages"))
        field = "messages"
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise rec.error(field, "a generation prompt must not end with an assistant turn")
    return PromptSample(prompt)


_PARSERS: dict[str, Callable[[Record], Sample]] = {
    "prompt_completion": _parse_prompt_completion,
    "messages": _parse_messages,
    "preference": _parse_preference,
    "unpaired": _parse_unpaired,
    "prompt": _parse_prompt,
}


def _required(rec: Record, field: str) -> Any:
    # Arrow tables fill absent fields with null, so None means missing for every source.
    value = rec.get(field)
    if value is None:
        raise rec.error(field, "missing")
    return value


def _text(rec: Record, field: str, value: str) -> str:
    """``value``, refused unless it is Unicode text a tokenizer takes: JSON's ``"\\ud800"`` escape
    gives a lone surrogate, which no UTF-8 tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise rec.error(field, f"not valid Unicode text: a lone surrogate {value[e.start]!r} at "
                               f"character {e.start}") from None
    return value


def _prompt_field(rec: Record, field: str) -> Text:
    value = _required(rec, field)
    if isinstance(value, str):
        return _text(rec, field, value)  # an empty prompt is allowed: unconditional generation
    if isinstance(value, list):
        return _messages(rec, field, value)
    raise rec.error(field, f"expected a string or a list of messages, got {type(value).__name__}")


def _completion_field(rec: Record, field: str, allow_full_conversation: bool = False) -> Text:
    value = _required(rec, field)
    if isinstance(value, str):
        if not value.strip():
            raise rec.error(field, "empty completion")
        return _text(rec, field, value)
    if not isinstance(value, list):
        raise rec.error(field, f"expected a string or a list of messages, got {type(value).__name__}")
    messages = _messages(rec, field, value)
    if not allow_full_conversation and messages[0]["role"] != "assistant":
        raise rec.error(f"{field}[0].role", f"a completion must start with an assistant turn, "
                                             f"got '{messages[0]['role']}'")
    if not any(m["role"] == "assistant" for m in messages):
        raise rec.error(field, "empty completion: no assistant turn")
    _check_targets(rec, field, messages)
    return messages


def _messages(rec: Record, field: str, value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise rec.error(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise rec.error(field, "empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise rec.error(f"{field}[{i}]", f"expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise rec.error(f"{field}[{i}].role", "missing")
        if role not in ROLES:
            raise rec.error(f"{field}[{i}].role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if content is None:
            raise rec.error(f"{field}[{i}].content", "missing")
        if not isinstance(content, str):
            raise rec.error(f"{field}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": _text(rec, f"{field}[{i}].content", content)})
    return out


def _check_targets(rec: Record, field: str, messages: list[Message], start: int = 0) -> None:
    """Assistant turns from ``start`` on are trained, so each must have something to learn."""
    for i in range(start, len(messages)):
        if messages[i]["role"] == "assistant" and not messages[i]["content"].strip():
            raise rec.error(f"{field}[{i}].content", "empty completion")


def _is_full_conversation(value: Text) -> bool:
    return isinstance(value, list) and value[0]["role"] != "assistant"


def _split_conversations(rec: Record, chosen: Text, rejected: Text) -> PreferenceSample:
    """Full chosen/rejected conversations: their shared leading turns are the prompt."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_full_conversation(value):
            raise rec.error(field, "chosen and rejected must both be full conversations or both "
                                   "continuations of the prompt")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(value):
            raise rec.error(field, "empty completion: nothing after the turns shared with the other answer")
        if value[shared]["role"] != "assistant":
            raise rec.error(f"{field}[{shared}].role", "chosen and rejected must diverge at an assistant "
                                                       f"turn, got '{value[shared]['role']}'")
        _check_targets(rec, field, value, shared)
    return PreferenceSample(chosen[:shared], chosen[shared:], rejected[shared:])


# ---------------------------------------------------------------------------------------------
# Tokenisation.


def _encode_plain(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_bos(ids: list[int], tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    start = 0
    while bos is not None and start + 1 < len(ids) and ids[start] == bos and ids[start + 1] == bos:
        start += 1
    return ids[start:]


def _render(messages: list[Message], tokenizer, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages, but the tokenizer has no chat template; give one with "
                         "data.chat_template (sft, rm, dpo) or chat_template (the sampling "
                         "stages): a Jinja template or a .jinja file")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: completions could never end")
    return tokenizer.eos_token_id


def encode_prompt(prompt: Text, tokenizer) -> list[int]:
    """Token ids of a prompt exactly as training sees them, ready to be continued by the model."""
    if isinstance(prompt, str):
        return _single_bos(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), tokenizer)
    return _single_bos(_encode_plain(_render(prompt, tokenizer, True), tokenizer), tokenizer)


def _text_parts(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int], list[int]]:
    ids = _encode_plain(completion, tokenizer)
    if not ids or ids[-1] != _eos_id(tokenizer):
        ids.append(_eos_id(tokenizer))
    return encode_prompt(prompt, tokenizer), ids, list(ids)


def _as_messages(value: Text, role: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _chat_parts(context: list[Message], continuation: list[Message],
                tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids, completion ids and completion labels of ``context + continuation``.

    Each trained assistant turn ``i`` is located in the rendered conversation as the text between
    ``render(turns[:i], generation_prompt=True)`` and ``render(turns[:i + 1])``; a template for
    which these are not prefixes of the full rendering cannot be split and is rejected.
    """
    turns = context + continuation
    targets = [i for i in range(len(context), len(turns)) if turns[i]["role"] == "assistant"]
    if not targets or targets[0] == 0:
        raise ValueError("the completion needs an assistant turn that follows at least one other turn")
    full = _render(turns, tokenizer, False)
    eos = _eos_id(tokenizer)
    prompt = encode_prompt(turns[:targets[0]], tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    pos = None
    for i in targets:
        before = _render(turns[:i], tokenizer, True)
        through = _render(turns[:i + 1], tokenizer, False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(f"the chat template renders turn {i} differently depending on what follows it, "
                             "so the assistant tokens cannot be located; use a prefix-consistent template")
        if pos is not None and len(before) > pos:  # context between two trained turns: no loss
            between = _encode_plain(full[pos:len(before)], tokenizer)
            ids += between
            labels += [IGNORE_INDEX] * len(between)
        turn = _encode_plain(full[len(before):len(through)], tokenizer)
        if eos not in turn:
            turn.append(eos)
        ids += turn
        labels += turn
        pos = len(through)
    # Whatever follows the last trained turn (e.g. a final user turn) is context, not target.
    tail = _encode_plain(full[pos:], tokenizer) if pos < len(full) else []
    return prompt, ids + tail, labels + [IGNORE_INDEX] * len(tail)


def _parts(prompt: Text, completion: Text, tokenizer) -> tuple[list[int], list[int], list[int]]:
    if isinstance(prompt, str) and isinstance(completion, str):
        return _text_parts(prompt, completion, tokenizer)
    return _chat_parts(_as_messages(prompt, "user"), _as_messages(completion, "assistant"), tokenizer)


def _left_truncate(ids: list[int], keep: int, bos: int | None) -> list[int]:
    # BOS stays first: the model was trained with it at position 0 and generation will feed it.
    if bos is not None and ids and ids[0] == bos:
        return [bos] + (ids[len(ids) - (keep - 1):] if keep > 1 else [])
    return ids[len(ids) - keep:]


def _fit(prompt: list[int], completions: list[tuple[list[int], list[int]]], max_length: int,
         overlong: str, bos: int | None) -> list[Encoded] | None:
    """Apply the overlong policy to one prompt and the completion(s) that share it."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for a prompt token and a target, got {max_length}")
    longest = max(len(ids) for ids, _ in completions)
    truncated = len(prompt) + longest > max_length
    if truncated and overlong == "drop":
        return None
    if len(prompt) >= max_length:
        prompt = _left_truncate(prompt, max(max_length - longest, max_length // 2), bos)
    room = max_length - len(prompt)
    return [Encoded(prompt + ids[:room], [IGNORE_INDEX] * len(prompt) + labels[:room], truncated)
            for ids, labels in completions]


def encode_prompt_completion(prompt: Text, completion: Text, tokenizer, max_length: int,
                             overlong: Overlong = "truncate") -> Encoded | None:
    """Tokenise one prompt/completion pair for SFT; ``None`` when ``overlong="drop"`` drops it.

    ``prompt`` and ``completion`` are strings (plain text) or message lists (chat template); a
    ``messages``-format conversation is ``encode_prompt_completion([], messages, ...)``.
    """
    p, ids, labels = _parts(prompt, completion, tokenizer)
    out = _fit(p, [(ids, labels)], max_length, overlong, tokenizer.bos_token_id)
    return None if out is None else out[0]


def encode_preference(prompt: Text, chosen: Text, rejected: Text, tokenizer, max_length: int,
                      overlong: Overlong = "truncate") -> tuple[Encoded, Encoded] | None:
    """Tokenise a preference pair; chosen and rejected start with the same prompt tokens."""
    p_chosen, c_ids, c_labels = _parts(prompt, chosen, tokenizer)
    p_rejected, r_ids, r_labels = _parts(prompt, rejected, tokenizer)
    assert p_chosen == p_rejected, "the prompt is tokenised independently of the completion"
    out = _fit(p_chosen, [(c_ids, c_labels), (r_ids, r_labels)], max_length, overlong, tokenizer.bos_token_id)
    return None if out is None else (out[0], out[1])


def encode_unpaired(prompt: Text, completion: Text, label: bool, tokenizer, max_length: int,
                    overlong: Overlong = "truncate") -> tuple[Encoded, bool] | None:
    """Tokenise a KTO-style example; returns the encoding and its desirability ``label``."""
    enc = encode_prompt_completion(prompt, completion, tokenizer, max_length, overlong)
    return None if enc is None else (enc, label)


def prompt_ids(record: Mapping[str, Any], tokenizer) -> list[int]:
    """The prompt tokens of ``record`` for generation: the same tokens training conditions on.

    For a ``messages`` record this is everything before its last assistant turn (rendered with
    the generation prompt); for a preference record the prompt both answers share.
    """
    sample = parse_record(record, detect_format(record))
    if isinstance(sample, PairSample) and sample.prompt == [] and isinstance(sample.completion, list):
        last = max(i for i, m in enumerate(sample.completion) if m["role"] == "assistant")
        return encode_prompt(sample.completion[:last], tokenizer)
    return encode_prompt(sample.prompt, tokenizer)


# ---------------------------------------------------------------------------------------------
# Whole datasets.


def _encode_pair(s: PairSample, tokenizer, max_length, overlong) -> tuple[dict | None, bool]:
    enc = encode_prompt_completion(s.prompt, s.completion, tokenizer, max_length, overlong)
    if enc is None:
        return None, False
    row = {"input_ids": enc.input_ids, "labels": enc.labels}
    if s.label is not None:
        row["label"] = s.label
    return row, enc.truncated


def _encode_pref(s: PreferenceSample, tokenizer, max_length, overlong) -> tuple[dict | None, bool]:
    out = encode_preference(s.prompt, s.chosen, s.rejected, tokenizer, max_length, overlong)
    if out is None:
        return None, False
    chosen, rejected = out
    return ({"chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
             "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels},
            chosen.truncated or rejected.truncated)


def _encode_prompt_only(s: PromptSample, tokenizer, max_length, overlong) -> tuple[dict | None, bool]:
    ids = encode_prompt(s.prompt, tokenizer)
    if len(ids) <= max_length:
        return {"input_ids": ids}, False
    if overlong == "drop":
        return None, False
    # Generation continues from the end of the prompt, so the end is what must survive.
    return {"input_ids": _left_truncate(ids, max_length, tokenizer.bos_token_id)}, True


_ENCODERS: dict[type, Callable[..., tuple[dict | None, bool]]] = {
    PairSample: _encode_pair,
    PreferenceSample: _encode_pref,
    PromptSample: _encode_prompt_only,
}


def as_chat(sample: Sample) -> Sample:
    """``sample`` with its plain-string fields as chat turns: the prompt one user turn, each
    completion one assistant turn. Message lists are left as they are."""
    def turn(value: Text, role: str) -> Text:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    if isinstance(sample, PromptSample):
        return PromptSample(turn(sample.prompt, "user"))
    if isinstance(sample, PreferenceSample):
        return PreferenceSample(turn(sample.prompt, "user"), turn(sample.chosen, "assistant"),
                                turn(sample.rejected, "assistant"))
    if sample.prompt == "":   # a whole conversation already
        return sample
    return PairSample(turn(sample.prompt, "user"), turn(sample.completion, "assistant"), sample.label)


def build_dataset(source: str | Path | Iterable[Mapping[str, Any]], tokenizer, format: str = "auto", *,
                  max_length: int, overlong: Overlong = "truncate", split: str = "train",
                  chat: bool = False, accepts: tuple[str, ...] | None = None,
                  ) -> tuple[list[dict], DataStats]:
    """Load, validate and tokenise a dataset.

    ``source`` is a path (see :func:`alignkit.data.io.load_records`) or records (plain dicts are
    numbered as rows from 0). ``format="auto"`` detects the format from the first record; every
    record must then match it. Rows are dicts of lists:

    - prompt_completion, messages: ``input_ids``, ``labels``
    - unpaired: ``input_ids``, ``labels``, ``label``
    - preference: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``
    - prompt: ``input_ids`` (collate with :func:`alignkit.data.collate.collate_prompts`)

    ``chat=True`` renders plain-string records as chat turns (:func:`as_chat`). ``accepts``: the
    formats the caller trains on; another one (detected or given) is a :class:`DataError` naming
    the first record and what the data is.
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for a prompt token and a target, got {max_length}")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    records = _as_records(source, split)
    name = str(source) if isinstance(source, (str, Path)) else \
        records[0].source if records else "<records>"   # loaded records name their dataset
    if not records:
        raise DataError("no records", where=name)
    if format == "auto":
        format = detect_format(records[0])
    if accepts is not None and format not in accepts:
        raise records[0].error(None, f"{format} records ({_FIELDS[format]}), but this stage "
                               f"trains on {' or '.join(accepts)} records")
    rows, truncated, dropped = [], 0, 0
    for rec in records:
        sample = parse_record(rec, format)
        if chat:
            sample = as_chat(sample)
        try:
            row, was_truncated = _ENCODERS[type(sample)](sample, tokenizer, max_length, overlong)
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise rec.error(None, str(e)) from e
        if row is None:
            dropped += 1
            continue
        rows.append(row)
        truncated += was_truncated
    stats = DataStats(total=len(records), kept=len(rows), truncated=truncated, dropped=dropped)
    log = logger.warning if stats.kept == 0 else logger.info
    log("%s: %d %s records, kept %d, truncated %d, dropped %d (max_length=%d, overlong=%s)",
        name, stats.total, format, stats.kept, stats.truncated, stats.dropped, max_length, overlong)
    return rows, stats


def _as_records(source: str | Path | Iterable[Mapping[str, Any]], split: str) -> Sequence[Record]:
    if isinstance(source, (str, Path)):
        return load_records(source, split)
    return [r if isinstance(r, Record) else Record(r, "<records>", i, "row") for i, r in enumerate(source)]
