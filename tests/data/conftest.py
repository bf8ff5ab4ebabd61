"""The data tests' tokenizer: trained on a small random corpus of one fixed vocabulary."""

import random

import pytest

from alignkit.engine.tokenizer import train_tokenizer

WORDS = "the cat dog sat on mat a big small red blue runs fast slow happy sad".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(300)]
    return train_tokenizer(texts, vocab_size=400)
