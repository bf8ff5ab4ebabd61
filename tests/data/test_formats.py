import copy
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.formats import (
    DataStats, Encoded, PairSample, PreferenceSample, PromptSample, build_dataset, detect_format,
    encode_preference, encode_prompt, encode_prompt_completion, encode_unpaired, parse_record, prompt_ids,
)
from alignkit.data.io import DataError, Record
from alignkit.math.logprobs import IGNORE_INDEX as IGN


def plain(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT = [{"role": "system", "content": "be brief"}, user("hi"), assistant("the cat sat."),
        user("and?"), assistant("a dog.")]


# --- detection and parsing -------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"messages": [user("a"), assistant("b")]}, "messages"),
    ({"messages": [user("a")]}, "prompt"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}, "preference"),
    ({"prompt": "a", "completion": "b", "label": True}, "unpaired"),
    ({"prompt": "a"}, "prompt"),
    ({"prompt": "a", "completion": None}, "prompt"),  # Arrow fills absent fields with null
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_undetectable_record_names_its_place():
    with pytest.raises(DataError, match=r"^f.jsonl:4: cannot detect the format from fields \['text'\]"):
        detect_format(Record({"text": "x"}, "f.jsonl", 4))


def test_full_conversations_split_at_their_shared_prefix():
    chosen = [user("q1"), assistant("a1"), user("q2"), assistant("good")]
    rejected = [user("q1"), assistant("a1"), user("q2"), assistant("bad"), user("q3"), assistant("x")]
    sample = parse_record({"chosen": chosen, "rejected": rejected, "prompt": "ignored"}, "preference")
    assert sample == PreferenceSample(chosen[:3], [assistant("good")], rejected[3:])


def test_messages_record_is_whole_conversation_as_completion():
    assert parse_record({"messages": CHAT}, "messages") == PairSample([], CHAT)
    assert parse_record({"prompt": [user("x")]}, "prompt") == PromptSample([user("x")])


# --- plain text prompt/completion ------------------------------------------------------------

def test_prompt_completion_hand_built(tok):
    enc = encode_prompt_completion("the cat", " sat on the mat.", tok, max_length=64)
    p, c = plain(tok, "the cat"), plain(tok, " sat on the mat.")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert enc == Encoded([bos] + p + c + [eos], [IGN] * (1 + len(p)) + c + [eos], truncated=False)
    assert enc.input_ids.count(bos) == 1 and enc.input_ids.count(eos) == 1
    assert tok.decode(enc.input_ids) == "<|bos|>the cat sat on the mat.<|eos|>"


def test_boundary_is_tokenised_separately(tok):
    # "the" + "cat" joined would merge differently; separate tokenisation keeps the exact
    # generation-time boundary: the prompt ids are exactly what generation feeds the model.
    enc = encode_prompt_completion("the ca", "t", tok, max_length=64)
    assert enc.input_ids[:-2] == tok("the ca").input_ids
    assert enc.input_ids[-2:] == plain(tok, "t") + [tok.eos_token_id]


def test_eos_is_not_added_twice_when_completion_already_ends_with_it(tok):
    enc = encode_prompt_completion("the cat", " sat.<|eos|>", tok, max_length=64)
    assert enc.input_ids.count(tok.eos_token_id) == 1 and enc.input_ids[-1] == tok.eos_token_id
    assert enc == encode_prompt_completion("the cat", " sat.", tok, max_length=64)


def test_bos_is_not_added_twice_when_prompt_text_starts_with_it(tok):
    enc = encode_prompt_completion("<|bos|>the cat", " sat.", tok, max_length=64)
    assert enc.input_ids.count(tok.bos_token_id) == 1
    assert enc == encode_prompt_completion("the cat", " sat.", tok, max_length=64)


def test_tokenizer_without_automatic_bos_gets_no_bos_from_us(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.add_bos_token = False  # rebuilds the post-processor without BOS (GPT-2-like)
    enc = encode_prompt_completion("the cat", " sat.", no_bos, max_length=64)
    assert tok.bos_token_id not in enc.input_ids
    assert enc.input_ids == plain(tok, "the cat") + plain(tok, " sat.") + [tok.eos_token_id]


def test_unpaired_keeps_label(tok):
    enc, label = encode_unpaired("the cat", " sat.", False, tok, max_length=64)
    assert label is False and enc == encode_prompt_completion("the cat", " sat.", tok, max_length=64)


# --- chat ------------------------------------------------------------------------------------

def test_chat_loss_only_on_assistant_turns(tok):
    enc = encode_prompt_completion([], CHAT, tok, max_length=256)
    # Parity: segment-wise tokenisation equals tokenising the whole rendered chat at once.
    assert enc.input_ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    targets = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGN]
    assert targets == plain(tok, "the cat sat.<|eos|>a dog.<|eos|>")
    assert all(lab in (IGN, t) for t, lab in zip(enc.input_ids, enc.labels))
    # The two target spans are exactly the assistant contents, each followed by its EOS.
    spans, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGN:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans.append(tok.decode(cur))
    assert spans == ["the cat sat.<|eos|>", "a dog.<|eos|>"]
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids.count(tok.eos_token_id) == 2


def test_chat_prompt_ids_equal_training_prefix_and_generation_prompt(tok):
    single = [user("hi"), assistant("the cat.")]
    enc = encode_prompt_completion([], single, tok, max_length=64)
    gen = tok.apply_chat_template(single[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt_ids({"messages": single}, tok) == gen
    assert enc.input_ids[:len(gen)] == gen and enc.labels[:len(gen)] == [IGN] * len(gen)
    assert enc.labels[len(gen)] != IGN
    # Multi-turn: the prompt for the last answer is everything before it.
    enc = encode_prompt_completion([], CHAT, tok, max_length=256)
    p = prompt_ids({"messages": CHAT}, tok)
    assert p == tok.apply_chat_template(CHAT[:4], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert enc.input_ids[:len(p)] == p and enc.labels[len(p)] != IGN


def test_string_pairs_in_chat_become_user_and_assistant_turns(tok):
    enc = encode_prompt_completion([user("hi")], "the cat.", tok, max_length=64)
    assert enc == encode_prompt_completion([], [user("hi"), assistant("the cat.")], tok, max_length=64)


def test_chat_switch_renders_string_records_as_the_equivalent_message_records(tok):
    strings = [{"prompt": "hi", "completion": "the cat."}]
    turns = [{"prompt": [user("hi")], "completion": [assistant("the cat.")]}]
    rows, _ = build_dataset(strings, tok, max_length=64, chat=True)
    assert rows == build_dataset(turns, tok, max_length=64)[0]
    assert rows != build_dataset(strings, tok, max_length=64)[0]     # plain text without the switch
    pref = [{"prompt": "hi", "chosen": "yes.", "rejected": "no."}]
    pref_turns = [{"prompt": [user("hi")], "chosen": [assistant("yes.")], "rejected": [assistant("no.")]}]
    assert (build_dataset(pref, tok, max_length=64, chat=True)[0]
            == build_dataset(pref_turns, tok, max_length=64)[0])
    conversation = [{"messages": [user("hi"), assistant("yes")]}]    # already chat: unchanged
    assert (build_dataset(conversation, tok, max_length=64, chat=True)[0]
            == build_dataset(conversation, tok, max_length=64)[0])


def test_trailing_user_turn_is_context(tok):
    enc = encode_prompt_completion([], [user("hi"), assistant("yes"), user("bye")], tok, max_length=64)
    assert tok.decode(enc.input_ids) == "<|bos|><|user|>hi<|assistant|>yes<|eos|><|user|>bye"
    assert enc.labels[-3:] == [IGN] * 3  # "<|user|>", "b"/"by", ... all context
    assert [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGN] == plain(tok, "yes<|eos|>")


def test_template_that_is_not_prefix_consistent_is_rejected(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}{{ m['content'] }}"
                         "{% if loop.last %}<|eos|>{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="renders turn 1 differently"):
        encode_prompt_completion([], [user("a"), assistant("b"), user("c"), assistant("d")], odd, 64)


def test_template_without_eos_gets_one_appended(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    enc = encode_prompt_completion([], [user("hi"), assistant("yes")], bare, max_length=64)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.input_ids.count(tok.eos_token_id) == 1
    assert enc.labels[-1] == tok.eos_token_id


# --- preference ------------------------------------------------------------------------------

def test_preference_shares_prompt_tokens(tok):
    chosen, rejected = encode_preference("the cat", " sat.", " ran fast away.", tok, max_length=64)
    p = tok("the cat").input_ids
    assert chosen.input_ids[:len(p)] == rejected.input_ids[:len(p)] == p
    assert chosen == encode_prompt_completion("the cat", " sat.", tok, max_length=64)
    assert rejected == encode_prompt_completion("the cat", " ran fast away.", tok, max_length=64)


def test_preference_full_conversations(tok):
    record = {"chosen": [user("hi"), assistant("the cat.")], "rejected": [user("hi"), assistant("a dog.")]}
    rows, _ = build_dataset([record], tok, max_length=64)
    p = prompt_ids(record, tok)
    assert p == tok.apply_chat_template([user("hi")], tokenize=True, add_generation_prompt=True, return_dict=False)
    for side, text in (("chosen", "the cat."), ("rejected", "a dog.")):
        ids, labels = rows[0][f"{side}_input_ids"], rows[0][f"{side}_labels"]
        assert ids == p + plain(tok, text) + [tok.eos_token_id]
        assert labels == [IGN] * len(p) + plain(tok, text) + [tok.eos_token_id]


# --- overlong policy -------------------------------------------------------------------------

def test_truncate_cuts_completion_from_the_right(tok):
    p, c = tok("the cat").input_ids, plain(tok, " sat on the big red mat.")
    assert len(p) == 3 and len(c) + 1 > 5
    enc = encode_prompt_completion("the cat", " sat on the big red mat.", tok, max_length=8)
    assert enc == Encoded(p + c[:5], [IGN] * 3 + c[:5], truncated=True)
    assert encode_prompt_completion("the cat", " sat on the big red mat.", tok, 8, "drop") is None
    # Exactly at the limit: kept whole, not truncated.
    exact = len(p) + len(c) + 1
    assert encode_prompt_completion("the cat", " sat on the big red mat.", tok, exact, "drop").truncated is False


def test_prompt_alone_too_long_is_cut_from_the_left_keeping_bos(tok):
    prompt = "the cat sat on the mat. a dog runs fast. the big red cat is happy."
    p, c = tok(prompt).input_ids, plain(tok, " sad.") + [tok.eos_token_id]
    assert len(p) > 12 and len(c) <= 6
    enc = encode_prompt_completion(prompt, " sad.", tok, max_length=12)
    keep = 12 - len(c)  # room for the whole completion (more than 12 // 2)
    assert enc.input_ids == [tok.bos_token_id] + p[len(p) - keep + 1:] + c
    assert enc.labels == [IGN] * keep + c and enc.truncated
    # A long completion: the prompt keeps max_length // 2 tokens, the completion the rest.
    long = " sat on the mat and the dog sat on the cat and the cat was sad."
    enc = encode_prompt_completion(prompt, long, tok, max_length=12)
    assert enc.input_ids == [tok.bos_token_id] + p[len(p) - 5:] + plain(tok, long)[:6]
    assert enc.labels == [IGN] * 6 + plain(tok, long)[:6]


def test_preference_truncation_keeps_one_shared_prompt(tok):
    prompt = "the cat sat on the mat. a dog runs fast. the big red cat is happy."
    chosen, rejected = encode_preference(prompt, " sad.", " the blue dog sat on a mat.", tok, max_length=12)
    assert len(chosen.input_ids) <= 12 and len(rejected.input_ids) == 12
    n = sum(lab == IGN for lab in chosen.labels)
    assert n == sum(lab == IGN for lab in rejected.labels) == 6
    assert chosen.input_ids[:n] == rejected.input_ids[:n] and chosen.input_ids[0] == tok.bos_token_id


def test_build_dataset_counts_truncated_and_dropped(tok, caplog):
    records = [{"prompt": "the cat", "completion": " sat."},
               {"prompt": "the cat", "completion": " sat on the big red mat with a dog."},
               {"prompt": "a", "completion": " dog."}]
    with caplog.at_level(logging.INFO, logger="alignkit.data"):
        rows, stats = build_dataset(records, tok, max_length=8)
    assert stats == DataStats(total=3, kept=3, truncated=1, dropped=0)
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert "3 prompt_completion records, kept 3, truncated 1, dropped 0" in caplog.text
    rows, stats = build_dataset(records, tok, max_length=8, overlong="drop")
    assert stats == DataStats(total=3, kept=2, truncated=0, dropped=1)
    assert rows[1]["input_ids"] == encode_prompt_completion("a", " dog.", tok, 8).input_ids


def test_build_dataset_output_rows_per_format(tok):
    rows, _ = build_dataset([{"prompt": "a", "completion": " b", "label": True}], tok, max_length=16)
    assert set(rows[0]) == {"input_ids", "labels", "label"} and rows[0]["label"] is True
    rows, _ = build_dataset([{"prompt": [user("hi")]}, {"prompt": [user("the cat")]}], tok, max_length=16)
    assert rows[1] == {"input_ids": prompt_ids({"prompt": [user("the cat")]}, tok)}
    rows, stats = build_dataset([{"prompt": "the cat sat on the mat."}], tok, max_length=4)
    assert rows[0]["input_ids"] == [tok.bos_token_id] + tok("the cat sat on the mat.").input_ids[-3:]
    assert stats.truncated == 1


def test_build_dataset_from_parquet_names_rows(tok, tmp_path):
    path = tmp_path / "pref.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "chosen": " b", "rejected": " c"},
                                         {"prompt": "a", "chosen": " b", "rejected": " b"}]), path)
    with pytest.raises(DataError, match=f"^{path}:row 1: field 'chosen': chosen and rejected are identical$"):
        build_dataset(path, tok, max_length=16)


def test_encode_prompt_matches_prompt_ids(tok):
    assert encode_prompt("the cat", tok) == prompt_ids({"prompt": "the cat", "completion": " x"}, tok)
    assert encode_prompt("the cat", tok) == tok("the cat").input_ids


# --- every validation error names file, line and field ---------------------------------------

GOOD = {"prompt": "a", "completion": "b"}


@pytest.mark.parametrize("fmt, record, field, message", [
    ("prompt_completion", {"prompt": "a"}, "completion", "missing"),
    ("prompt_completion", {"prompt": 3, "completion": "b"}, "prompt",
     "expected a string or a list of messages, got int"),
    ("prompt_completion", {"prompt": "a", "completion": "  "}, "completion", "empty completion"),
    ("prompt_completion", {"prompt": "a", "completion": [user("b")]}, "completion[0].role",
     "a completion must start with an assistant turn, got 'user'"),
    ("preference", {"prompt": "a", "chosen": "", "rejected": "c"}, "chosen", "empty completion"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": ""}, "rejected", "empty completion"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": "b"}, "chosen", "chosen and rejected are identical"),
    ("preference", {"chosen": "b", "rejected": "c"}, "prompt", "missing"),
    ("preference", {"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("b")]},
     "chosen[0].role", "chosen and rejected must diverge at an assistant turn, got 'user'"),
    ("messages", {"messages": [user("a"), {"role": "robot", "content": "b"}]}, "messages[1].role",
     "unknown role 'robot' (expected one of system, user, assistant)"),
    ("messages", {"messages": [user("a"), {"role": "assistant", "content": ["b"]}]}, "messages[1].content",
     "expected a string, got list"),
    ("messages", {"messages": [user("a"), {"role": "assistant"}]}, "messages[1].content", "missing"),
    ("messages", {"messages": [user("a"), assistant("")]}, "messages[1].content", "empty completion"),
    ("messages", {"messages": "hello"}, "messages", "expected a list of messages, got str"),
    ("messages", {"messages": [assistant("a")]}, "messages[0].role",
     "the conversation must not start with an assistant turn: the first answer would have nothing "
     "to condition on"),
    ("unpaired", {"prompt": "a", "completion": "b", "label": 1}, "label",
     "expected a boolean (true/false), got int 1"),
    ("unpaired", {"prompt": "a", "completion": "b", "label": "true"}, "label",
     "expected a boolean (true/false), got str 'true'"),
    ("prompt", {"messages": [user("a"), assistant("b")]}, "messages",
     "a generation prompt must not end with an assistant turn"),
])
def test_validation_errors_name_file_line_and_field(tok, tmp_path, fmt, record, field, message):
    first = {"prompt_completion": GOOD, "unpaired": {**GOOD, "label": True}, "prompt": {"prompt": "a"},
             "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
             "messages": {"messages": [user("a"), assistant("b")]}}[fmt]
    path = tmp_path / "train.jsonl"
    # Line 2 is blank, so the bad record is on line 3.
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        build_dataset(path, tok, format=fmt, max_length=32)
    assert str(info.value) == f"{path}:3: field '{field}': {message}"
    # Auto-detection from the good first record reaches the same verdict.
    with pytest.raises(DataError, match=f"^{path}:3: field"):
        build_dataset(path, tok, max_length=32)


def test_bad_arguments_are_rejected(tok):
    with pytest.raises(ValueError, match="overlong"):
        build_dataset([GOOD], tok, max_length=8, overlong="cut")
    with pytest.raises(ValueError, match="unknown format"):
        build_dataset([GOOD], tok, format="sft", max_length=8)
    with pytest.raises(DataError, match="no records"):
        build_dataset([], tok, max_length=8)
