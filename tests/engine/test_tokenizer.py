import random

import pytest
from transformers import AutoTokenizer

from alignkit.engine.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, train_tokenizer

WORDS = "the cat dog sat on mat a big small red blue runs fast slow happy sad".split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=400)


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "the cat sat."},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "a dog."},
]


def test_special_tokens_have_distinct_fixed_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.pad_token_id != tok.eos_token_id


def test_vocab_size_is_respected_and_merges_are_learned(tok):
    # 262 = 256 bytes + 6 specials; a 16-word corpus runs out of merges before 400.
    assert 262 < len(tok) <= 400
    assert len(train_tokenizer(corpus(), vocab_size=280)) == 280
    # "the" is the most frequent word: BPE must have merged it into one token.
    assert tok.convert_ids_to_tokens(tok("the", add_special_tokens=False).input_ids) == ["the"]
    assert tok.convert_ids_to_tokens(tok(" cat", add_special_tokens=False).input_ids) == ["Ġcat"]


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="at least 262"):
        train_tokenizer(corpus(10), vocab_size=261)


def test_bos_prepended_once_and_eos_never_added(tok):
    ids = tok("the cat sat.").input_ids
    plain = tok("the cat sat.", add_special_tokens=False).input_ids
    assert ids == [tok.bos_token_id] + plain
    assert tok.eos_token_id not in ids
    assert tok("").input_ids == [tok.bos_token_id]


@pytest.mark.parametrize("text", [
    "the cat sat.",
    "  leading and trailing spaces  ",
    "space before punctuation . , ! ?",  # clean_up_tokenization_spaces would eat these spaces
    "tabs\tand\nnew\r\nlines\n\n",
    "héllo wörld — ünïcödé 日本語 😀🐈",
    "bytes never in the corpus: \x00\x7f ~ {}",
])
def test_decoding_round_trips_text_exactly(tok, text):
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_chat_template_renders_turns_and_generation_prompt(tok):
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|bos|><|system|>be brief<|user|>hi there<|assistant|>the cat sat.<|eos|>"
        "<|user|>and?<|assistant|>a dog.<|eos|>")
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|system|>be brief<|user|>hi there<|assistant|>")


def test_tokenised_chat_has_one_bos_and_one_eos_per_assistant_turn(tok):
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id
    assert ids.count(tok.pad_token_id) == 0


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload_gives_the_same_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["the cat sat.", "héllo 😀 . x", ""]:
        assert again(text).input_ids == tok(text).input_ids
        assert again.decode(again(text).input_ids, skip_special_tokens=True) == text
    assert again.all_special_tokens == tok.all_special_tokens
    assert again.all_special_ids == tok.all_special_ids
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 0)
    assert again.chat_template == tok.chat_template
    assert (again.apply_chat_template(CHAT, tokenize=True, return_dict=False)
            == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False))


def test_digits_are_one_token_each_even_when_frequent():
    # "12" and "345" occur in every document, so a plain BPE would merge them; digits stay split.
    tok = train_tokenizer([f"Q: 12 + 345 = ? A: {i}" for i in range(300)], vocab_size=400)
    text = " 12 + 345 = 357"
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("12345357")
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
