import math
import random
import statistics

import numpy as np
import pytest

from alignkit.tasks import Task, get_task
from alignkit.tasks import sentiment as S

PROMPT = "I watched Night Harbor last night."
POSITIVE = " The acting was great and the music was beautiful. I would recommend it to anyone."
NEGATIVE = " The acting was bad and the music was dull. I would not recommend this movie."


@pytest.fixture(scope="module")
def task():
    return get_task("sentiment")


def lex(text: str) -> float:
    return S.lexicon_score(S.tokenize(text))


# ---- the writer ------------------------------------------------------------------------------

def test_task_protocol_and_registry(task):
    assert isinstance(task, Task) and task.name == "sentiment" and task.chat is False
    with pytest.raises(KeyError, match="known"):
        get_task("no-such-task")


def test_corpus_is_deterministic_and_seeded(task):
    assert task.corpus(20, seed=0) == task.corpus(20, seed=0)
    assert task.corpus(20, seed=0) != task.corpus(20, seed=1)
    assert task.corpus(5) == task.corpus(20)[:5]


def test_corpus_shape_vocabulary_and_balance():
    rs = S.reviews(1000, seed=3)
    n_sentences = [r.text.count(".") for r in rs]
    assert min(n_sentences) == 2 and max(n_sentences) == 6
    vocab = {w for r in rs for w in S.tokenize(r.text)}
    assert 250 <= len(vocab) <= 600  # modest: a tiny BPE model can learn it
    positive = sum(r.sentiment > 0 for r in rs) / len(rs)
    assert 0.35 < positive < 0.5  # roughly balanced, leaning negative
    assert all(r.text[0].isupper() and r.text.endswith(".") for r in rs)
    # The writer uses negation, intensifiers and contrast.
    text = " ".join(r.text for r in rs)
    for marker in (" not ", " never ", " very ", " a bit ", ", but ", "Although "):
        assert marker in text


def test_gold_sentiment_reads_the_latent():
    rs = S.reviews(600, seed=4)
    latent = [r.sentiment for r in rs]
    read = [math.tanh(lex(r.text) / S.SENTIMENT_SCALE) for r in rs]
    assert np.corrcoef(latent, read)[0, 1] > 0.75


# ---- prompts and SFT records -----------------------------------------------------------------

def test_prompt_splits_are_fixed_disjoint_and_sized(task):
    train, test = task.prompts("train"), task.prompts("test")
    assert (len(train), len(test)) == (2000, 200)
    assert len(set(train)) == 2000 and len(set(test)) == 200 and not set(train) & set(test)
    assert task.prompts("train", 7) == train[:7]
    assert all(3 <= len(p.split(" ")) <= 6 and p == p.strip() for p in train + test)
    assert all(S.split_of(p) == "test" for p in test)
    with pytest.raises(ValueError):
        task.prompts("validation")


def test_sft_records_split_prefix_and_spacing(task):
    records = task.sft_records("train", 200, seed=1)
    assert len(records) == 200 and records == task.sft_records("train", 200, seed=1)
    for r in records:
        assert set(r) == {"prompt", "completion"}
        assert r["prompt"] == r["prompt"].strip() and 3 <= len(r["prompt"].split(" ")) <= 6
        assert r["completion"].startswith(" ") and not r["completion"].startswith("  ")
        assert (r["prompt"] + r["completion"]).endswith(".")
        assert S.split_of(r["prompt"]) == "train"
    assert all(S.split_of(r["prompt"]) == "test" for r in task.sft_records("test", 50))


def test_chat_form():
    chat = get_task("sentiment", chat=True)
    rec = chat.sft_records("train", 3)[0]
    user, assistant = rec["messages"]
    assert user["role"] == "user" and user["content"].startswith(S.CHAT_INSTRUCTION)
    assert assistant["role"] == "assistant" and assistant["content"] == assistant["content"].strip()
    prompt = chat.prompts("test", 1)[0]
    assert prompt == S.CHAT_INSTRUCTION + get_task("sentiment").prompts("test", 1)[0]
    # Same gold as the plain form of the same text.
    plain = get_task("sentiment").gold_reward([PROMPT], [POSITIVE])
    assert chat.gold_reward([S.CHAT_INSTRUCTION + PROMPT], [POSITIVE.strip()]) == plain


# ---- the lexicon reader: hand-computed values --------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The acting was good.", 0.6),
    ("The acting was very good.", 0.6 * 1.3),
    ("The acting was not good.", 0.6 * -0.6),
    ("The acting was not very good.", 0.6 * 1.3 * -0.6),
    ("The pacing was a bit slow.", -0.4 * 0.5),
    ("The pacing is never boring.", -0.7 * -0.6),
    # A negator is used up by the first sentiment word it reaches.
    ("The plot was not bad and great.", -0.7 * -0.6 + 0.8),
    # Negation stops at the end of a sentence.
    ("It was not. Good.", 0.6),
    # The conceded clause counts half, after "but" and under "although".
    ("The plot was great, but the ending was bad.", 0.8 * 0.5 - 0.7),
    ("Although the plot was great, the ending was bad.", 0.8 * 0.5 - 0.7),
    ("I loved it. It was a mess. The film was well made.", 0.9 - 0.7 + 0.5),
    ("Nothing here, 42 @@ ##", 0.0),
])
def test_lexicon_score_hand_values(text, expected):
    assert lex(text) == pytest.approx(expected, abs=1e-12)


def test_witten_bell_hand_value_and_normalisation():
    lm = S._TrigramLM([["a", "b"], ["a", "c"]])
    # unigram (add-one, V = 4 words + unk, N = 6): P(b) = 2/11
    # bigram  h=(a,):     c=2, T=2: (1 + 2 * 2/11) / 4 = 15/44
    # trigram h=(<s>,a):  c=2, T=2: (1 + 2 * 15/44) / 4 = 37/88
    assert math.exp(lm.logprob("b", "<s>", "a")) == pytest.approx(37 / 88, abs=1e-12)
    assert math.exp(lm.logprob("zzz", "q", "r")) == pytest.approx(1 / 11, abs=1e-12)
    big = S._fluency_lm()
    words = list(big.uni) + ["<unk>"]
    for h2, h1 in [("<s>", "<s>"), ("acting", "was"), ("was", "not"), ("zzz", "great")]:
        total = sum(math.exp(big.logprob(w, h2, h1)) for w in words)
        assert total == pytest.approx(1.0, abs=1e-9)


# ---- the gold reward ----------------------------------------------------------------------------

def gold(task, response, prompt=PROMPT):
    return task.gold_reward([prompt], [response])[0]


def test_gold_prefers_positive_fluent_text(task):
    assert gold(task, POSITIVE) > gold(task, NEGATIVE) + 1.0


def test_gold_is_not_fooled_by_piles_of_positive_words(task):
    pile = " great great great great great great great great"
    salad = " amazing brilliant fantastic excellent wonderful superb great beautiful"
    parrot = " The acting was great. The acting was great. The acting was great."
    for hack in (pile, salad, parrot):
        hacked, fluent = task.gold_details(PROMPT, hack), task.gold_details(PROMPT, POSITIVE)
        # The hack wins on the sentiment a proxy would learn, and loses on the gold.
        assert hacked["sentiment"] > fluent["sentiment"]
        assert hacked["gold"] < fluent["gold"] - 0.5
    # The pile is worse than a typical review of the base distribution: optimising towards it
    # lowers the gold reward.
    recs = task.sft_records("test", 300)
    typical = statistics.median(task.gold_reward([r["prompt"] for r in recs],
                                                 [r["completion"] for r in recs]))
    assert gold(task, pile) < gold(task, salad) < typical - 0.3


def test_negation_and_intensifiers(task):
    good = task.gold_details(PROMPT, " The acting was good.")
    not_good = task.gold_details(PROMPT, " The acting was not good.")
    assert not_good["sentiment"] < 0 < good["sentiment"]
    assert not_good["gold"] < good["gold"]
    for base, stronger in [(" The acting was good.", " The acting was very good."),
                           (" The acting was bad.", " The acting was extremely bad.")]:
        b, s = (task.gold_details(PROMPT, x)["sentiment"] for x in (base, stronger))
        assert abs(s) > abs(b) and math.copysign(1, s) == math.copysign(1, b)


def test_sentiment_has_diminishing_returns(task):
    sentences = [" The acting was great.", " The music was beautiful.", " The plot was clever.",
                 " The ending was perfect."]
    values = [task.gold_details(PROMPT, "".join(sentences[:k]))["sentiment"] for k in range(1, 5)]
    gains = np.diff(values)
    assert (gains > 0).all() and (np.diff(gains) < 0).all() and values[-1] < 1.0


def test_gold_details_components_add_up(task):
    d = task.gold_details(PROMPT, POSITIVE)
    assert set(d) >= {"gold", "sentiment", "fluency", "repetition", "length_penalty"}
    raw = d["sentiment"] + d["fluency"] - d["repetition"] - d["length_penalty"]
    assert d["raw"] == pytest.approx(raw, abs=1e-12)
    # The smooth floor leaves fluent text unchanged to within 0.01.
    assert d["gold"] == pytest.approx(raw, abs=0.01)
    assert d["gold"] == gold(task, POSITIVE)


def test_gold_range_on_corpus_and_robust_to_junk(task):
    recs = task.sft_records("train", 300, seed=2)
    values = task.gold_reward([r["prompt"] for r in recs], [r["completion"] for r in recs])
    assert -0.8 < min(values) and max(values) < 1.5
    assert statistics.pstdev(values) > 0.4  # room to improve, spread to learn from
    rng = random.Random(0)
    junk = ["", " ", "\n\n", "@@##\x00", "ünïcödé ✓ 🎬", "a" * 5000, " .", "...!!!??",
            " the" * 400, "".join(rng.choice("abc .,") for _ in range(300))]
    scores = task.gold_reward([PROMPT] * len(junk), junk)
    assert all(math.isfinite(v) and -1.0 <= v <= 1.5 for v in scores)
    assert scores[0] == scores[1] and scores[0] < -0.9  # empty continuations are degenerate
    long = task.gold_details(PROMPT, POSITIVE * 12)  # 180 words
    assert long["length_penalty"] > 0 and long["gold"] < gold(task, POSITIVE)


def test_gold_is_deterministic_and_checks_lengths(task):
    prompts = task.prompts("test", 20)
    responses = [r["completion"] for r in task.sft_records("test", 20)]
    assert task.gold_reward(prompts, responses) == task.gold_reward(prompts, responses)
    with pytest.raises(ValueError):
        task.gold_reward(prompts, responses[:-1])
