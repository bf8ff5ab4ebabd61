import math
import random
import re

import pytest

from alignkit.tasks import Task, get_task
from alignkit.tasks import arithmetic as A


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic")


@pytest.fixture(scope="module")
def chat():
    return get_task("arithmetic", chat=True)


def expression_of(text: str) -> str:
    return A.parse_prompt(text).expression


@pytest.mark.parametrize("expr, value, left_to_right", [
    ("37 + 45", 82, 82),
    ("3 + 4 * 2", 11, 14),
    ("4 * 2 + 3", 11, 11),
    ("10 - 3 - 2", 5, 5),
    ("2 * 3 * 4 + 1", 25, 25),
    ("1 + 2 * 3 - 4", 3, 5),
    ("7", 7, 7),
])
def test_evaluate_hand_values(expr, value, left_to_right):
    assert A.evaluate(expr) == value
    assert A.evaluate(expr, precedence=False) == left_to_right


def test_evaluate_matches_python_on_generated_problems():
    # Parity with an independent evaluator (Python's own grammar) on strings we generated.
    rng = random.Random(0)
    for _ in range(2000):
        problem = A._sample_problem(rng)
        assert problem.answer == eval(problem.expression, {"__builtins__": {}}) >= 0
    for bad in ("3 +", "2 ** 3", "1 / 2", "__import__('os')", ""):
        with pytest.raises(ValueError):
            A.evaluate(bad)


@pytest.mark.parametrize("response, correct, well_formed", [
    (" 82", 1, 1), ("82", 1, 1), (" 82 ", 1, 1), ("\n 82", 1, 1), (" 82\nQ: 1 + 1 = ? A: 2", 1, 1),
    (" 82\r\n", 1, 1), (" 81", 0, 1), (" -82", 0, 1), (" 082", 1, 1), (" 820", 0, 1),
    (" 82 apples", 0, 0), (" 82.", 0, 0), (" 8 2", 0, 0), ("", 0, 0), (" ", 0, 0),
    (" eighty-two", 0, 0), ("Q: 82", 0, 0), (" x 82", 0, 0),
])
def test_verifier(task, response, correct, well_formed):
    details = task.gold_details("Q: 37 + 45 = ? A:", response)
    assert (details["correct"], details["format"]) == (correct, well_formed)
    assert details["gold"] == (1.0 if correct else 0.1 if well_formed else 0.0)


def test_gold_reward_batch_and_errors(task):
    prompts = ["Q: 3 + 4 * 2 = ? A:", "Q: 9 - 9 = ? A:", "Q: 7 * 8 = ? A:"]
    assert task.gold_reward(prompts, [" 11", " 0", " 54"]) == [1.0, 1.0, 0.1]
    with pytest.raises(ValueError):
        task.gold_reward(prompts, [" 11"])
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        task.gold_reward(["What's up?"], [" 1"])


def test_task_protocol(task, chat):
    assert isinstance(task, Task) and isinstance(chat, Task)
    assert task.name == chat.name == "arithmetic" and chat.chat and not task.chat
    with pytest.raises(ValueError):
        A.ArithmeticTask(wrong_fraction=1.5)


def test_prompt_splits(task):
    train, test = task.prompts("train"), task.prompts("test")
    assert (len(train), len(test)) == (5000, 500)
    assert len(set(train)) == 5000 and len(set(test)) == 500 and not set(train) & set(test)
    assert task.prompts("test", 10) == test[:10]
    assert all(re.fullmatch(r"Q: [\d +*-]+ = \? A:", p) for p in train + test)
    assert all(A.split_of(expression_of(p)) == "test" for p in test)
    kinds = {tuple(re.findall(r"[-+*]", expression_of(p))) for p in train}
    assert {("+",), ("-",), ("*",)} <= kinds and any(len(k) == 2 for k in kinds)
    with pytest.raises(ValueError):
        task.prompts("dev")


def test_sft_records_are_correct_and_from_their_split(task):
    records = task.sft_records("train", 300, seed=1)
    assert records == task.sft_records("train", 300, seed=1) != task.sft_records("train", 300)
    for r in records:
        assert set(r) == {"prompt", "completion"} and not r["prompt"].endswith(" ")
        assert r["completion"] == f" {A.evaluate(expression_of(r['prompt']))}"
        assert A.split_of(expression_of(r["prompt"])) == "train"
    assert task.gold_reward([r["prompt"] for r in records],
                            [r["completion"] for r in records]) == [1.0] * 300
    assert all(A.split_of(expression_of(r["prompt"])) == "test"
               for r in task.sft_records("test", 100))


def test_corpus_has_the_stated_share_of_plausible_mistakes(task):
    docs = task.corpus(4000, seed=0)
    assert docs == task.corpus(4000, seed=0) and docs != task.corpus(4000, seed=1)
    test_expressions = {expression_of(p) for p in task.prompts("test")}
    n_wrong = 0
    for doc in docs:
        question, answer = doc.rsplit(" ", 1)
        expr = expression_of(question)
        assert A.split_of(expr) == "train" and expr not in test_expressions
        n_wrong += A.evaluate(expr) != int(answer)
    p = 0.3
    assert abs(n_wrong / len(docs) - p) < 4 * math.sqrt(p * (1 - p) / len(docs))
    assert all("\n" not in d for d in docs)


def test_wrong_answers_are_plausible_slips():
    rng = random.Random(0)
    # Forgotten carry and borrow, by hand.
    assert A._digitwise(38, 45, lambda u, v: u + v) == 73
    assert A._digitwise(52, 38, lambda u, v: abs(u - v)) == 26
    near = 0
    for _ in range(2000):
        problem = A._sample_problem(rng)
        wrong = A.wrong_answer(problem, rng)
        assert wrong != problem.answer and wrong >= 0
        assert len(str(wrong)) <= len(str(problem.answer)) + 1  # slips, not noise
        near += abs(wrong - problem.answer) <= 10
    assert near > 0.6 * 2000  # mostly near misses
    # Ignoring precedence is one of the slips for two-step problems.
    two_step = A.Problem("3 + 4 * 2", 11)
    assert 14 in {A.wrong_answer(two_step, random.Random(s)) for s in range(200)}


def test_chat_form(task, chat):
    rec = chat.sft_records("train", 5)[0]
    user, assistant = rec["messages"]
    assert user["role"] == "user" and re.fullmatch(r"What is [\d +*-]+\?", user["content"])
    assert assistant == {"role": "assistant",
                         "content": str(A.evaluate(expression_of(user["content"])))}
    prompts = chat.prompts("train", 50)
    assert [expression_of(p) for p in prompts] == [expression_of(p) for p in task.prompts(
        "train", 50)]
    assert chat.gold_reward(["What is 37 + 45?"] * 3, ["82", " 82\n", "It is 82"]) == [
        1.0, 1.0, 0.0]
    docs = chat.corpus(400)
    n_chat = sum(d.startswith("What is") for d in docs)
    assert 120 < n_chat < 280 and all(d.startswith(("What is", "Q: ")) for d in docs)
