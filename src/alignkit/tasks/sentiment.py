"""Controlled sentiment, made synthetic: continue a movie review so that it is positive.

The task of the DPO paper (Rafailov et al. 2023, Sec. 6.1: IMDb prefixes, reward = a sentiment
classifier) rebuilt without downloads. A stochastic grammar writes movie-review-like text with a
latent overall sentiment; the hidden gold reward reads the text back:

    gold = sentiment + fluency - repetition - length_penalty      (then a smooth floor at -1)

* ``sentiment`` in [-1, 1]: a lexicon score with intensifiers, negation and contrast handled in
  the manner of SO-CAL (Taboada et al. 2011, "Lexicon-based methods for sentiment analysis",
  Sec. 2.2-2.4), squashed by ``tanh`` so that piling up positive words has diminishing returns.
* ``fluency`` in [-1, 0.5]: the mean per-token log-probability of the continuation under a
  private Witten-Bell trigram model of the grammar (fit on a private sample, cached), mapped by a
  logistic curve: text the grammar could have written scores near +0.45, word salad near -1.
* ``repetition`` in [0, 1]: repeated word trigrams and repeated content words.
* ``length_penalty``: empty or overlong continuations.

A proxy reward model trained on finite noisy labels of fluent samples learns "positive words are
good" but has little evidence about disfluent text, so a policy that optimises it towards
"great great amazing wonderful" gets a high proxy score while the gold reward falls: reward
hacking, measurable (Gao, Schulman & Hilton 2022).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

# --------------------------------------------------------------------------------------------
# Lexicon. Polarities on [-1, 1]; these numbers are shared by the writer (which aims for a
# target polarity) and the gold reader, so the gold sentiment tracks the writer's latent.
# --------------------------------------------------------------------------------------------

_GENERIC_ADJECTIVES: dict[str, float] = {
    "amazing": 1.0, "brilliant": 0.95, "fantastic": 0.95, "excellent": 0.9, "wonderful": 0.9,
    "superb": 0.9, "great": 0.8, "beautiful": 0.75, "impressive": 0.7, "enjoyable": 0.6,
    "good": 0.6, "solid": 0.5, "nice": 0.45, "decent": 0.3, "fine": 0.2, "okay": 0.1,
    "average": -0.15, "mediocre": -0.4, "weak": -0.5, "messy": -0.5, "poor": -0.6, "dull": -0.6,
    "lazy": -0.6, "boring": -0.7, "bad": -0.7, "disappointing": -0.7, "painful": -0.75,
    "awful": -0.9, "terrible": -0.9, "dreadful": -0.9, "horrible": -0.95,
}


class _Subject(NamedTuple):
    text: str
    plural: bool


class _Topic(NamedTuple):
    subjects: tuple[_Subject, ...]
    adjectives: dict[str, float]


def _subjects(*items: str) -> tuple[_Subject, ...]:
    # A trailing "+" marks a plural subject ("the songs+" -> "the songs were").
    return tuple(_Subject(s.rstrip("+"), s.endswith("+")) for s in items)


_TOPICS: dict[str, _Topic] = {
    "acting": _Topic(
        _subjects("the acting", "the cast", "the performances+", "{actor}", "the lead actor",
                  "the supporting cast"),
        {"convincing": 0.6, "natural": 0.5, "believable": 0.5, "stiff": -0.5, "wooden": -0.7}),
    "plot": _Topic(
        _subjects("the plot", "the story", "the script", "the twists+", "the premise"),
        {"gripping": 0.8, "original": 0.6, "clever": 0.6, "thin": -0.4, "silly": -0.4,
         "predictable": -0.5, "confusing": -0.5}),
    "music": _Topic(
        _subjects("the music", "the soundtrack", "the score", "the songs+"),
        {"moving": 0.7, "memorable": 0.6, "haunting": 0.6, "loud": -0.3, "forgettable": -0.5}),
    "visuals": _Topic(
        _subjects("the visuals+", "the cinematography", "the camera work", "the effects+",
                  "the photography"),
        {"breathtaking": 0.95, "stunning": 0.9, "gorgeous": 0.85, "cheap": -0.6, "ugly": -0.7}),
    "pacing": _Topic(
        _subjects("the pacing", "the editing", "the first half", "the second half"),
        {"tight": 0.5, "smooth": 0.5, "slow": -0.4, "rushed": -0.5, "uneven": -0.5}),
    "dialogue": _Topic(
        _subjects("the dialogue", "the writing", "the jokes+", "the humor"),
        {"witty": 0.7, "funny": 0.6, "sharp": 0.6, "flat": -0.5, "awkward": -0.5,
         "cheesy": -0.5}),
    "ending": _Topic(
        _subjects("the ending", "the final scene", "the last act", "the climax"),
        {"perfect": 0.9, "satisfying": 0.7, "powerful": 0.7, "abrupt": -0.4, "rushed": -0.5}),
    "characters": _Topic(
        _subjects("the characters+", "the main character", "the villain", "the hero"),
        {"likable": 0.5, "complex": 0.5, "interesting": 0.5, "shallow": -0.5,
         "annoying": -0.6}),
}

_VERBS: dict[str, float] = {"adored": 0.95, "loved": 0.9, "enjoyed": 0.7, "liked": 0.5,
                            "disliked": -0.6, "hated": -0.9}
_NOUNS: dict[str, float] = {"masterpiece": 1.0, "gem": 0.9, "triumph": 0.9, "delight": 0.8,
                            "treat": 0.7, "letdown": -0.7, "mess": -0.7, "failure": -0.8,
                            "waste": -0.8, "disaster": -0.9}
_ADVERBS: dict[str, float] = {"brilliantly": 0.9, "perfectly": 0.8, "beautifully": 0.7,
                              "well": 0.5, "poorly": -0.6, "badly": -0.7}
_OTHER: dict[str, float] = {"best": 0.9, "worst": -0.9, "recommend": 0.6, "special": 0.5}

LEXICON: dict[str, float] = {
    **_GENERIC_ADJECTIVES,
    **{w: p for topic in _TOPICS.values() for w, p in topic.adjectives.items()},
    **_VERBS, **_NOUNS, **_ADVERBS, **_OTHER,
}

# Intensifiers scale the next sentiment word (SO-CAL Sec. 2.4, percentages as multipliers).
INTENSIFIERS: dict[str, float] = {
    "extremely": 1.5, "incredibly": 1.5, "very": 1.3, "truly": 1.3, "so": 1.3, "highly": 1.3,
    "really": 1.2, "quite": 1.1, "fairly": 0.8, "somewhat": 0.7, "slightly": 0.5,
}
_TWO_WORD_INTENSIFIERS: dict[tuple[str, str], float] = {("a", "bit"): 0.5, ("a", "little"): 0.5}
_NEGATORS = frozenset({"not", "never", "nothing", "hardly"})
# Negation as a damped switch: "not excellent" is weakly negative, "not bad" mildly positive,
# never as strong as "terrible" or "good" (SO-CAL Sec. 2.3 argues for a shift; a damped switch
# keeps the sign change with the same loss of intensity and stays within [-1, 1]).
NEGATION_FACTOR = -0.6
_NEGATION_WINDOW = 3
# Contrast: the clause before "but" and the clause governed by "although" count half (SO-CAL
# Sec. 2.5 discounts the part of a sentence that the writer concedes).
_CONTRAST_BEFORE = frozenset({"but", "yet"})
_CONTRAST_UNTIL_COMMA = frozenset({"although", "though"})
_CONCEDED_WEIGHT = 0.5
# tanh(total / scale): one "great" gives 0.38, a typical positive review about 0.9.
SENTIMENT_SCALE = 2.0

# --------------------------------------------------------------------------------------------
# The review writer.
# --------------------------------------------------------------------------------------------

_MOVIES = ("Night Harbor", "The Silent River", "Blue Summer", "Iron Valley", "Paper Moons",
           "The Last Orchard", "Glass Kingdom", "Winter Garden", "The Long Road", "Red Canyon",
           "Lost Signals", "The Quiet Hour", "Golden Dust", "Broken Compass", "Midnight Train",
           "The Salt House", "Silver Lake", "Empty Rooms", "Wild Hearts", "The Clockmaker",
           "Stone Bridge", "Dark Water", "The Lighthouse Keeper", "Summer Rain")
_ACTORS = ("Anna Reyes", "Tom Hale", "Maya Lind", "Oscar Brandt", "Lena Cruz", "David Moore",
           "Sara Kim", "Paul Vance", "Nina Ford", "Jack Bell", "Ben Carter", "Clara Stone",
           "Leo Park", "Emma Grant", "Sam Rivers", "Julia Hart")
_DIRECTORS = ("Ivan Petrov", "Helen Shaw", "Marco Bellini", "Kenji Mori", "Laura Quinn",
              "Peter Walsh")
_GENRES = ("drama", "comedy", "thriller", "horror film", "romance", "western", "crime story",
           "science fiction film", "war film", "family film", "mystery", "action film")
_ROLES = ("young doctor", "old soldier", "tired detective", "school teacher", "lonely farmer",
          "famous singer", "small town lawyer", "retired boxer", "young nurse", "ship captain",
          "night guard", "piano teacher")
_STORIES = ("who moves to a small town", "who loses everything", "who falls in love",
            "who tries to find a lost brother", "who returns home after the war",
            "who must solve a murder", "who wants to become a singer", "who hides a secret")
_COMPANIONS = ("my friends", "my family", "my sister", "my brother", "my wife", "my husband",
               "my parents", "a friend")
_WHEN = ("last night", "last week", "last weekend", "on Sunday", "on Friday", "yesterday")
_FILM = ("film", "movie")
_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")


class Review(NamedTuple):
    text: str
    sentiment: float  # the writer's latent overall sentiment in [-1, 1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Writer:
    """One review at a time; all randomness comes from ``rng``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def review(self) -> Review:
        rng = self.rng
        # Slightly negative-leaning latent sentiment leaves room for improvement.
        latent = max(-1.0, min(1.0, rng.gauss(-0.1, 0.55)))
        self.past = rng.random() < 0.6
        self.movie = rng.choice(_MOVIES)
        self.used: set[str] = set()
        n = rng.randint(2, 6)
        topics = rng.sample(list(_TOPICS), k=len(_TOPICS))
        sentences = [self.opening(latent)]
        closing = rng.random() < 0.5
        for i in range(n - 1 - closing):
            p = max(-1.0, min(1.0, latent + rng.gauss(0.0, 0.3)))
            if rng.random() < 0.15:
                sentences.append(self.neutral())
            elif rng.random() < (0.35 if abs(latent) < 0.4 else 0.12):
                sentences.append(self.contrast(topics[i], topics[-1 - i], p))
            else:
                sentences.append(self.topic_sentence(topics[i], p))
        if closing:
            sentences.append(self.closing(latent))
        return Review(" ".join(s[0].upper() + s[1:] for s in sentences), latent)

    # -- pieces -------------------------------------------------------------------------------
    def be(self, plural: bool) -> str:
        return ("were" if plural else "was") if self.past else ("are" if plural else "is")

    def subject(self, topic: str) -> _Subject:
        s = self.rng.choice(_TOPICS[topic].subjects)
        return s._replace(text=s.text.format(actor=self.rng.choice(_ACTORS)))

    def word_near(self, target: float, words: dict[str, float], width: float = 0.15,
                  min_strength: float = 0.0) -> str:
        """A word whose polarity is near ``target``; words already used are disfavoured, and
        only words with ``|polarity| >= min_strength`` qualify ("not okay" reads oddly)."""
        cands = [w for w, pol in words.items() if abs(pol) >= min_strength]
        weights = [math.exp(-0.5 * ((words[w] - target) / width) ** 2) + 1e-6 for w in cands]
        weights = [w * (0.1 if c in self.used else 1.0) for w, c in zip(weights, cands)]
        word = self.rng.choices(cands, weights)[0]
        self.used.add(word)
        return word

    def adjective(self, p: float, topic: str | None, allow_negation: bool = True) -> str:
        """An adjective phrase whose lexicon reading is about ``p``."""
        rng = self.rng
        words = dict(_GENERIC_ADJECTIVES)
        if topic is not None:
            words.update(_TOPICS[topic].adjectives)
        if allow_negation and abs(p) < 0.6 and rng.random() < 0.2:
            # "not bad", "never boring", "not very original": aim the negated word at p / factor.
            q = max(-1.0, min(1.0, p / NEGATION_FACTOR))
            neg = "never" if q < 0 and rng.random() < 0.4 else "not"
            return f"{neg} {self.word_near(q, words, min_strength=0.4)}"
        if rng.random() < 0.3:
            if abs(p) >= 0.5:
                word = rng.choice(("very", "really", "extremely", "truly", "so", "quite"))
                return f"{word} {self.word_near(p / INTENSIFIERS[word], words)}"
            if p < 0:
                word = rng.choice(("a bit", "slightly", "somewhat", "a little"))
                mult = INTENSIFIERS.get(word) or _TWO_WORD_INTENSIFIERS[tuple(word.split())]
                negative = {w: pol for w, pol in words.items() if pol <= -0.3}
                return f"{word} {self.word_near(max(-1.0, p / mult), negative)}"
        return self.word_near(p, words)

    def opening(self, latent: float) -> str:
        rng, movie, film = self.rng, self.movie, self.rng.choice(_FILM)
        kind = rng.randrange(11)
        if kind == 0:
            return f"I watched {movie} {rng.choice(_WHEN)}."
        if kind == 1:
            return f"I saw {movie} with {rng.choice(_COMPANIONS)} {rng.choice(_WHEN)}."
        if kind == 2:
            genre = rng.choice(_GENRES)
            tail = rng.choice((f"directed by {rng.choice(_DIRECTORS)}",
                               f"starring {rng.choice(_ACTORS)}"))
            return f"{movie} is {_article(genre)} {genre} {tail}."
        if kind == 3:
            return f"I went to see {movie} with {rng.choice(_COMPANIONS)}."
        if kind == 4:
            level = rng.choice(("high", "low", "no"))
            return f"I had {level} expectations for this {film}."
        if kind == 5:
            return f"I did not know what to expect from {movie}."
        if kind == 6:
            role = rng.choice(_ROLES)
            return f"This {film} tells the story of {_article(role)} {role} {rng.choice(_STORIES)}."
        if kind == 7:
            role = rng.choice(_ROLES)
            return f"{rng.choice(_ACTORS)} plays {_article(role)} {role} in {movie}."
        if kind == 8:
            topic = rng.choice(list(_TOPICS))
            s = self.subject(topic)
            return f"{s.text} in {movie} {self.be(s.plural)} {self.adjective(latent, topic)}."
        if kind == 9:
            verb = self.word_near(latent, _VERBS, width=0.3)
            return f"I {verb} {rng.choice(('this ' + film, movie, 'every minute of it'))}."
        which = "best" if latent > 0 else "worst"
        return f"{movie} is one of the {which} {film}s I have seen in years."

    def neutral(self) -> str:
        rng = self.rng
        return rng.choice((
            f"The {rng.choice(_FILM)} was directed by {rng.choice(_DIRECTORS)}.",
            f"It is based on a novel by {rng.choice(_DIRECTORS)}.",
            f"{rng.choice(_ACTORS)} plays the {rng.choice(_ROLES)}.",
            f"It runs for about {rng.choice(('two hours', 'ninety minutes', 'three hours'))}.",
            "The story takes place in a small town.",
            f"I watched it with {rng.choice(_COMPANIONS)}.",
        ))

    def topic_sentence(self, topic: str, p: float) -> str:
        rng = self.rng
        s = self.subject(topic)
        kind = rng.randrange(7)
        if kind == 0 and s.text[0].islower():
            # Negation reads naturally only after a form of "to be" ("was not bad").
            return f"I found {s.text} {self.adjective(p, topic, allow_negation=False)}."
        if kind == 1:
            first = self.adjective(p, topic, allow_negation=False)
            return f"{s.text} {self.be(s.plural)} {first} and {self.adjective(p, topic, False)}."
        if kind == 2 and s.text[0].islower():
            if p < -0.2 and rng.random() < 0.3:
                return f"I did not enjoy {s.text}."
            return f"I {self.word_near(p, _VERBS, width=0.3)} {s.text}."
        if kind == 3 and topic == "acting":
            adj = self.adjective(p, topic, allow_negation=False)
            return (f"{rng.choice(_ACTORS)} gives {_article(adj)} {adj} performance as the "
                    f"{rng.choice(_ROLES)}.")
        if kind == 4:
            verb = "felt" if self.past else "feels"
            return f"{s.text} {verb} {self.adjective(p, topic, allow_negation=False)}."
        if kind == 5 and abs(p) > 0.3:
            adverb = self.word_near(p, _ADVERBS, width=0.3)
            what = rng.choice(("made", "shot", "acted", "written"))
            return f"the {rng.choice(_FILM)} {self.be(False)} {adverb} {what}."
        return f"{s.text} {self.be(s.plural)} {self.adjective(p, topic)}."

    def contrast(self, topic_a: str, topic_b: str, p: float) -> str:
        # A conceded clause of the opposite sign, then the clause that carries ``p``.
        q = -math.copysign(min(1.0, abs(self.rng.gauss(0.5, 0.2))), p)
        a, b = self.subject(topic_a), self.subject(topic_b)
        first = f"{a.text} {self.be(a.plural)} {self.adjective(q, topic_a, False)}"
        second = f"{b.text} {self.be(b.plural)} {self.adjective(p, topic_b)}"
        if self.rng.random() < 0.6:
            return f"{first}, but {second}."
        return f"although {first}, {second}."

    def closing(self, latent: float) -> str:
        rng, film = self.rng, self.rng.choice(_FILM)
        kind = rng.randrange(5)
        if kind == 0:
            adj = self.adjective(latent, None, allow_negation=False)
            return f"overall, it {self.be(False)} {_article(adj)} {adj} {film}."
        if kind == 1 and abs(latent) > 0.2:
            if latent > 0:
                how = "highly recommend" if latent > 0.6 else "recommend"
                return f"I would {how} it to {rng.choice(('anyone', 'my friends', 'everyone'))}."
            return f"I would not recommend this {film}."
        if kind == 2:
            noun = self.word_near(latent, _NOUNS, width=0.25)
            extra = " of time" if noun == "waste" else ""
            return f"it {self.be(False)} {_article(noun)} {'real ' if rng.random() < .3 else ''}" \
                   f"{noun}{extra}."
        if kind == 3:
            score = _COUNTS[min(7, max(0, round((latent + 1) * 4 + rng.gauss(0, 0.7)) - 1))]
            return f"I give it {score} out of ten."
        return f"I {'will' if latent > 0 else 'will never'} watch it again."


def _rng(tag: str, seed: int) -> random.Random:
    # A separate stream per purpose so that corpus(seed=0) and the private sample never coincide.
    digest = hashlib.blake2b(f"sentiment/{tag}/{seed}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def reviews(n: int, seed: int = 0, *, tag: str = "corpus") -> list[Review]:
    """``n`` reviews with their latent sentiment; deterministic in ``(tag, seed)``."""
    writer = _Writer(_rng(tag, seed))
    return [writer.review() for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Splits: a prompt's split is a fixed function of its text, so splits are disjoint by design.
# --------------------------------------------------------------------------------------------

N_PROMPTS = {"train": 2000, "test": 200}
_TEST_FRACTION = 10  # one prefix in ten is a test prefix
CHAT_INSTRUCTION = "Continue this review: "


def split_of(prefix: str) -> str:
    digest = hashlib.blake2b(prefix.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_FRACTION == 0 else "train"


def _cut(text: str, rng: random.Random) -> tuple[str, str]:
    """(prefix of 3-6 words without trailing space, rest starting with a space)."""
    words = text.split(" ")
    k = min(rng.randint(3, 6), len(words) - 1)
    return " ".join(words[:k]), " " + " ".join(words[k:])


@lru_cache(maxsize=None)
def _prompt_pool() -> dict[str, tuple[str, ...]]:
    rng, writer = _rng("prompt-cuts", 0), _Writer(_rng("prompts", 0))
    pool: dict[str, list[str]] = {"train": [], "test": []}
    seen: set[str] = set()
    for _ in range(200_000):
        prefix, _rest = _cut(writer.review().text, rng)
        if prefix in seen:
            continue
        seen.add(prefix)
        split = split_of(prefix)
        if len(pool[split]) < N_PROMPTS[split]:
            pool[split].append(prefix)
        if all(len(pool[s]) == N_PROMPTS[s] for s in pool):
            return {s: tuple(v) for s, v in pool.items()}
    raise RuntimeError("the review grammar has too few distinct prefixes")  # pragma: no cover


def _check_split(split: str) -> None:
    if split not in N_PROMPTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------------------------
# The gold reader.
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+|\d+|[.,!?;:]|[^\sa-z\d.,!?;:]+")
_PUNCT = frozenset(".,!?;:")
_CLAUSE_END = frozenset(".!?;")
_STOPWORDS = frozenset(
    "the a an and but or of to in on it is was are were this that i my me with for as by at "
    "from be who her his its one have has had not so very really would will".split())


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lexicon_score(tokens: list[str]) -> float:
    """Summed polarity with intensifiers, negation and contrast (SO-CAL, Taboada et al. 2011).

    A word's value is its polarity, times the intensifier right before it, times
    ``NEGATION_FACTOR`` if a negator precedes it within ``_NEGATION_WINDOW`` tokens of the same
    clause (a negator is used up by the first sentiment word it reaches: "not bad and great" is
    mildly positive, then positive), times ``_CONCEDED_WEIGHT`` in a conceded clause.
    """
    total = 0.0
    sentence: list[float] = []   # values in the current sentence, discounted by a later "but"
    negator_at = None            # index of a pending negator
    conceded_until = -1          # tokens up to this index are in an "although ..." clause
    for i, tok in enumerate(tokens):
        if tok in _PUNCT or tok in _CONTRAST_BEFORE:
            negator_at = None
            if tok in _CLAUSE_END:
                total += sum(sentence)
                sentence = []
            elif tok in _CONTRAST_BEFORE:
                sentence = [v * _CONCEDED_WEIGHT for v in sentence]
            continue
        if tok in _NEGATORS:
            negator_at = i
            continue
        if tok in _CONTRAST_UNTIL_COMMA:
            conceded_until = next((j for j in range(i + 1, len(tokens)) if tokens[j] in _PUNCT),
                                  len(tokens))
            continue
        value = LEXICON.get(tok)
        if value is None:
            continue
        if i >= 1 and tokens[i - 1] in INTENSIFIERS:
            value *= INTENSIFIERS[tokens[i - 1]]
        elif i >= 2 and (tokens[i - 2], tokens[i - 1]) in _TWO_WORD_INTENSIFIERS:
            value *= _TWO_WORD_INTENSIFIERS[(tokens[i - 2], tokens[i - 1])]
        if negator_at is not None and i - negator_at <= _NEGATION_WINDOW:
            value *= NEGATION_FACTOR
        negator_at = None
        if i <= conceded_until:
            value *= _CONCEDED_WEIGHT
        sentence.append(value)
    return total + sum(sentence)


class _TrigramLM:
    """Interpolated Witten-Bell trigram model (Witten & Bell 1991; Chen & Goodman 1999, Eq. 16):

        P(w | h) = (c(h, w) + T(h) * P(w | h')) / (c(h) + T(h))

    with ``T(h)`` the number of distinct words seen after ``h`` and ``h'`` the shorter history;
    the base is an add-one unigram over the vocabulary plus one unknown word.
    """

    BOS, EOS, UNK = "<s>", "</s>", "<unk>"

    def __init__(self, documents: list[list[str]]):
        self.uni: dict[str, int] = {}
        self.ngram: dict[tuple[str, ...], int] = {}     # counts of bigrams and trigrams
        self.hist: dict[tuple[str, ...], int] = {}      # c(h) as a history
        self.types: dict[tuple[str, ...], int] = {}     # T(h)
        for doc in documents:
            seq = [self.BOS, self.BOS, *doc, self.EOS]
            for i in range(2, len(seq)):
                w = seq[i]
                self.uni[w] = self.uni.get(w, 0) + 1
                for h in (seq[i - 1:i], seq[i - 2:i]):
                    key = (*h, w)
                    if key not in self.ngram:
                        self.types[tuple(h)] = self.types.get(tuple(h), 0) + 1
                    self.ngram[key] = self.ngram.get(key, 0) + 1
                    self.hist[tuple(h)] = self.hist.get(tuple(h), 0) + 1
        self.n_tokens = sum(self.uni.values())
        self.vocab = len(self.uni) + 1

    def logprob(self, w: str, h2: str, h1: str) -> float:
        p = (self.uni.get(w, 0) + 1) / (self.n_tokens + self.vocab)
        for h in ((h1,), (h2, h1)):
            c_h = self.hist.get(h)
            if c_h is None:
                break
            t_h = self.types[h]
            p = (self.ngram.get((*h, w), 0) + t_h * p) / (c_h + t_h)
        return math.log(p)

    def mean_logprob(self, context: list[str], continuation: list[str]) -> float:
        seq = [self.BOS, self.BOS, *context, *continuation, self.EOS]
        start = 2 + len(context)
        total = sum(self.logprob(seq[i], seq[i - 2], seq[i - 1]) for i in range(start, len(seq)))
        return total / (len(seq) - start)


@lru_cache(maxsize=1)
def _fluency_lm() -> _TrigramLM:
    # A private sample of the grammar; no public method returns text from this stream.
    return _TrigramLM([tokenize(r.text) for r in reviews(6000, tag="private-lm")])


# Logistic map of the mean log-prob to [-1, 0.5]; the midpoint sits between grammar text
# (median -1.5 nats/token, 1st percentile -2.4) and shuffled grammar text (median -8.7).
_FLUENCY_MID, _FLUENCY_WIDTH = -4.0, 0.6
_MAX_WORDS = 120
# Sharpness of the smooth floor: raw 0 maps to 0.005, raw -1 to -0.83, raw -3 to -1.0.
_FLOOR_SHARPNESS = 4.0


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def repetition(words: list[str]) -> float:
    """Fraction of repeated word trigrams or repeated content words, whichever is larger,
    above what the grammar itself produces; in [0, 1]."""
    if not words:
        return 0.0
    trigrams = list(zip(words, words[1:], words[2:]))
    rep3 = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    content = [w for w in words if w not in _STOPWORDS]
    rep1 = 1.0 - len(set(content)) / len(content) if content else 0.0
    return min(1.0, max(0.0, (max(rep3, rep1) - 0.15) / 0.45))


def score(prompt: str, response: str) -> dict[str, float]:
    """All gold components for one (prompt, continuation); see the module docstring."""
    prompt_tokens, response_tokens = tokenize(prompt), tokenize(response)
    words = [t for t in response_tokens if t not in _PUNCT]
    sentiment = math.tanh(lexicon_score(prompt_tokens + response_tokens) / SENTIMENT_SCALE)
    logprob = _fluency_lm().mean_logprob(prompt_tokens, response_tokens)
    fluency = 1.5 / (1.0 + math.exp(-(logprob - _FLUENCY_MID) / _FLUENCY_WIDTH)) - 1.0
    rep = repetition(words)
    if not words:
        length_penalty = 1.0
    else:
        length_penalty = min(1.0, max(0, len(words) - _MAX_WORDS) / 50)
    raw = sentiment + fluency - rep - length_penalty
    # Smooth floor at -1: garbage of every kind lands near -1, fluent text is unchanged.
    total = -1.0 + _softplus(_FLOOR_SHARPNESS * (raw + 1.0)) / _FLOOR_SHARPNESS
    return {"gold": total, "raw": raw, "sentiment": sentiment, "fluency": fluency,
            "logprob": logprob, "repetition": rep, "length_penalty": length_penalty,
            "n_words": float(len(words))}


# --------------------------------------------------------------------------------------------
# The task.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentimentTask:
    """Continue a movie-review prefix; the gold reward prizes positive, fluent, varied text."""

    chat: bool = False
    name: str = "sentiment"

    def corpus(self, n: int, seed: int = 0) -> list[str]:
        return [r.text for r in reviews(n, seed, tag="corpus")]

    def sft_records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        _check_split(split)
        writer, rng = _Writer(_rng(f"sft/{split}", seed)), _rng(f"sft-cuts/{split}", seed)
        records: list[dict] = []
        while len(records) < n:
            prefix, rest = _cut(writer.review().text, rng)
            if split_of(prefix) != split:
                continue
            if self.chat:
                records.append({"messages": [
                    {"role": "user", "content": CHAT_INSTRUCTION + prefix},
                    {"role": "assistant", "content": rest.strip()}]})
            else:
                records.append({"prompt": prefix, "completion": rest})
        return records

    def prompts(self, split: str, n: int | None = None) -> list[str]:
        _check_split(split)
        pool = list(_prompt_pool()[split][:n])
        return [CHAT_INSTRUCTION + p for p in pool] if self.chat else pool

    def _full(self, prompt: str, response: str) -> tuple[str, str]:
        if self.chat:
            prompt = prompt.removeprefix(CHAT_INSTRUCTION)
            response = " " + response.lstrip()
        return prompt, response

    def gold_reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [score(*self._full(p, r))["gold"] for p, r in zip(prompts, responses)]

    def gold_details(self, prompt: str, response: str) -> dict[str, float]:
        return score(*self._full(prompt, response))
