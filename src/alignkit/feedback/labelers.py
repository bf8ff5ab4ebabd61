"""Who labels a pair of responses in an online loop: simulated annotators, the pairwise AI judge,
or a reward source; and how those labels enter the preference store.

A labeler is ``fn(prompts, responses_a, responses_b) -> preference records`` (``prompt``,
``chosen``, ``rejected``; undecided pairs left out): iterative / online DPO's step 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

Labeler = Callable[[list[str], list[str], list[str]], list[dict]]
PAIRWISE_JUDGE = "pairwise-judge:"


def label_with(labeler: str, task_name: str | None, temperature: float, seed: int,
               chat: bool = False, workers=None) -> Labeler:
    """The labeler of spec ``labeler``: ``simulated`` (a Bradley-Terry draw on the gold reward
    of built-in task ``task_name``), ``pairwise-judge:CONFIG`` (the RLAIF pairwise judge, both
    orders; Lee et al. 2023, Sec. 2.1), or a reward source spec (the higher-scored response is
    chosen, ties dropped). ``workers``: where a judge or a reward model runs."""
    if labeler == "simulated":
        from alignkit.feedback.simulate import SimulatedAnnotator, label_pairs
        from alignkit.tasks import get_task

        if task_name is None:
            raise ValueError("online.labeler=simulated needs a built-in task (eval.task)")
        task = get_task(task_name, chat=chat)
        annotator = SimulatedAnnotator(temperature=temperature, seed=seed)
        return lambda p, a, b: label_pairs(task, p, a, b, annotator)
    if labeler.startswith(PAIRWISE_JUDGE):
        from alignkit.engine.judges import make_judge_labeler

        return make_judge_labeler(labeler[len(PAIRWISE_JUDGE):], workers=workers)
    from alignkit.engine.scoring import make_reward_source

    source = make_reward_source(labeler, chat=chat, workers=workers)

    def by_reward(prompts, a, b):
        sa, sb = source(prompts, a), source(prompts, b)
        return [{"prompt": p, "chosen": x if s > t else y, "rejected": y if s > t else x,
                 "source": source.name}
                for p, x, y, s, t in zip(prompts, a, b, sa, sb) if s != t]

    return by_reward


def store_source(labeler: str) -> str:
    """The preference store's ``source`` of a labeler's labels: ``simulated`` for labels drawn
    from a task's gold reward (the simulated annotator, or ``gold:`` itself, a noiseless one),
    ``ai`` for every learned or programmed labeler (judges, reward models, functions)."""
    return "simulated" if labeler == "simulated" or labeler.startswith("gold:") else "ai"


def record_in_store(store_path: str, pairs_path: Path, labeler: str) -> dict:
    """Import a round's labelled pairs into the store; importing them again adds nothing (one
    comparison per pair and annotator), so a redone or resumed round never double-counts."""
    from alignkit.data.store import PreferenceStore

    with PreferenceStore(store_path) as store:
        return store.import_preferences(pairs_path, source=store_source(labeler),
                                        annotator=f"online-dpo:{labeler}")
