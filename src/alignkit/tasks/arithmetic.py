"""Arithmetic with a verifier: "Q: 37 + 45 = ? A:" -> " 82".

Small integer problems (two-digit + and -, times by a single digit, and two-step expressions with
operator precedence). The pretraining corpus gives a wrong answer to a fixed fraction of its
questions -- plausible slips such as a dropped carry or ignored precedence -- so the base and SFT
models are imperfect and rejection sampling (ReST, Gulcehre et al. 2023) or GRPO (Shao et al.
2024) against the verifier has room to improve.

The gold reward is that verifier: 1.0 for the exact answer, 0.1 for a well-formed wrong number,
0.0 otherwise. Well-formed means the first thing after optional whitespace is an integer, and
the integer is followed by the end of the text or a newline.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

REWARD_CORRECT = 1.0
REWARD_FORMAT = 0.1
N_PROMPTS = {"train": 5000, "test": 500}
_TEST_FRACTION = 10  # one problem in ten is a test problem

_ANSWER = re.compile(r"\s*(-?\d+)[ \t\r]*(?:\n|\Z)")
_PLAIN_PROMPT = re.compile(r"Q:\s*(.+?)\s*=\s*\?\s*A:\s*\Z")
_CHAT_PROMPT = re.compile(r"What is\s+(.+?)\s*\?\s*\Z")
_EXPRESSION = re.compile(r"\d+(?:\s*[-+*]\s*\d+)*\Z")


class Problem(NamedTuple):
    expression: str  # "37 + 45"
    answer: int


def evaluate(expression: str, precedence: bool = True) -> int:
    """Value of ``expression`` (non-negative integers, ``+ - *``), without ``eval``.

    ``precedence=False`` evaluates strictly left to right: the slip a careless solver makes.
    """
    if not _EXPRESSION.match(expression.strip()):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    tokens = re.findall(r"\d+|[-+*]", expression)
    numbers, ops = [int(t) for t in tokens[::2]], tokens[1::2]
    if not precedence:
        value = numbers[0]
        for op, x in zip(ops, numbers[1:]):
            value = value + x if op == "+" else value - x if op == "-" else value * x
        return value
    # Fold products into terms, then add the signed terms.
    terms, signs = [numbers[0]], [1]
    for op, x in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def _sample_problem(rng: random.Random) -> Problem:
    kind = rng.choices(("add", "sub", "mul", "two-step"), (0.35, 0.25, 0.2, 0.2))[0]
    if kind == "add":
        expr = f"{rng.randint(0, 99)} + {rng.randint(0, 99)}"
    elif kind == "sub":
        a = rng.randint(0, 99)
        expr = f"{a} - {rng.randint(0, a)}"
    elif kind == "mul":
        expr = f"{rng.randint(0, 20)} * {rng.randint(2, 9)}"
    else:
        a, b, c = rng.randint(0, 50), rng.randint(1, 9), rng.randint(1, 9)
        expr = rng.choice((f"{a} + {b} * {c}", f"{b} * {c} + {a}",
                           f"{a} + {b} - {rng.randint(0, a + b)}"))
    return Problem(expr, evaluate(expr))


def _digitwise(a: int, b: int, op) -> int:
    """Column arithmetic that forgets the carry/borrow: 38 + 45 -> 73, 52 - 38 -> 26."""
    out, place = 0, 1
    while a or b:
        out += (op(a % 10, b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible mistake for ``problem``: never the answer, never negative."""
    x = problem.answer
    candidates = [x + 1, x - 1, x + 10, x - 10]
    if 10 <= x <= 99 and x % 10:
        candidates.append(int(str(x)[::-1]))  # transposed digits: 82 -> 28
    numbers = [int(t) for t in re.findall(r"\d+", problem.expression)]
    ops = re.findall(r"[-+*]", problem.expression)
    if ops == ["+"]:
        candidates.append(_digitwise(*numbers, lambda u, v: u + v))
    elif ops == ["-"]:
        candidates.append(_digitwise(*numbers, lambda u, v: abs(u - v)))
    elif ops == ["*"]:
        candidates += [numbers[0] * (numbers[1] + 1), numbers[0] * (numbers[1] - 1)]
    else:
        candidates.append(evaluate(problem.expression, precedence=False))
    candidates = [c for c in candidates if c != x and c >= 0]
    return rng.choice(candidates) if candidates else x + 1


def split_of(expression: str) -> str:
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_FRACTION == 0 else "train"


def _rng(tag: str, seed: int) -> random.Random:
    digest = hashlib.blake2b(f"arithmetic/{tag}/{seed}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _problems(split: str, rng: random.Random):
    """Endless problems of one split: test problems never reach training data."""
    while True:
        problem = _sample_problem(rng)
        if split_of(problem.expression) == split:
            yield problem


@lru_cache(maxsize=None)
def _prompt_pool(split: str) -> tuple[Problem, ...]:
    pool: dict[str, Problem] = {}
    for problem in _problems(split, _rng(f"prompts/{split}", 0)):
        pool.setdefault(problem.expression, problem)
        if len(pool) == N_PROMPTS[split]:
            return tuple(pool.values())
    raise AssertionError("unreachable")  # pragma: no cover


def _check_split(split: str) -> None:
    if split not in N_PROMPTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def verify(response: str, answer: int) -> dict[str, float]:
    """{"correct", "format"} in {0, 1} and the resulting "gold" reward."""
    match = _ANSWER.match(response)
    well_formed = match is not None
    correct = well_formed and int(match.group(1)) == answer
    gold = REWARD_CORRECT if correct else REWARD_FORMAT if well_formed else 0.0
    return {"gold": gold, "correct": float(correct), "format": float(well_formed)}


def parse_prompt(prompt: str) -> Problem:
    """The problem in a plain ("Q: 3 + 4 = ? A:") or chat ("What is 3 + 4?") prompt."""
    match = _PLAIN_PROMPT.search(prompt) or _CHAT_PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return Problem(match.group(1), evaluate(match.group(1)))


@dataclass(frozen=True)
class ArithmeticTask:
    """Answer small arithmetic questions; the gold reward is an exact-answer verifier."""

    chat: bool = False
    wrong_fraction: float = 0.3  # share of corpus answers that are plausible mistakes
    name: str = "arithmetic"

    def __post_init__(self):
        if not 0.0 <= self.wrong_fraction <= 1.0:
            raise ValueError(f"wrong_fraction must be in [0, 1], got {self.wrong_fraction}")

    def question(self, expression: str) -> str:
        return f"What is {expression}?" if self.chat else f"Q: {expression} = ? A:"

    def corpus(self, n: int, seed: int = 0) -> list[str]:
        """Single-line documents from the train split; in chat mode half use the chat phrasing
        so the base model has seen it before chat SFT."""
        rng = _rng("corpus", seed)
        docs = []
        for problem, _ in zip(_problems("train", rng), range(n)):
            answer = (wrong_answer(problem, rng) if rng.random() < self.wrong_fraction
                      else problem.answer)
            if self.chat and rng.random() < 0.5:
                docs.append(f"What is {problem.expression}? {answer}")
            else:
                docs.append(f"Q: {problem.expression} = ? A: {answer}")
        return docs

    def sft_records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        _check_split(split)
        records = []
        for problem, _ in zip(_problems(split, _rng(f"sft/{split}", seed)), range(n)):
            question = self.question(problem.expression)
            if self.chat:
                records.append({"messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": str(problem.answer)}]})
            else:
                records.append({"prompt": question, "completion": f" {problem.answer}"})
        return records

    def prompts(self, split: str, n: int | None = None) -> list[str]:
        _check_split(split)
        return [self.question(p.expression) for p in _prompt_pool(split)[:n]]

    def gold_reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.gold_details(p, r)["gold"] for p, r in zip(prompts, responses)]

    def gold_details(self, prompt: str, response: str) -> dict[str, float]:
        return verify(response, parse_prompt(prompt).answer)
