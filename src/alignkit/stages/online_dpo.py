"""Online / iterative DPO: sample pairs from the current policy, label them, train, repeat.

Each round ``r`` (Xu et al. 2023, "Some things are more CRINGE than others"; Guo et al. 2024,
"Direct language model alignment from online AI feedback"):

1. sample two responses per prompt from the policy of round ``r - 1``;
2. label each pair: simulated annotators on a built-in task's gold reward (Bradley-Terry draw),
   the pairwise AI judge (``pairwise-judge:CONFIG``, both orders averaged; Lee et al. 2023,
   "RLAIF", Sec. 2.1), or any reward source (the higher-scored response is chosen, ties dropped);
   the labelled pairs are written to ``round_<r>/pairs.jsonl`` and, with ``online.store``,
   recorded in the preference store;
3. cache the reference log-probs of the new pairs (the reference stays the initial policy);
4. train with the configured DAP loss; save ``round_<r>/model`` and ``round_<r>/metrics.json``.

A finished round (its ``metrics.json`` exists) is never redone: a restarted run loads the last
finished round's model and goes on. A round interrupted after labelling reuses its
``pairs.jsonl`` (no second sampling, no second bill from a paid judge) and resumes training from
its own checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from alignkit.data.sources import parse_task

Labeler = Callable[[list[str], list[str], list[str]], list[dict]]
PAIRWISE_JUDGE = "pairwise-judge:"


def _prompts(spec: str, n_total: int) -> list[str]:
    task = parse_task(spec)
    if task is None:
        from alignkit.data.io import load_records

        return [r["prompt"] for r in load_records(spec)]
    from alignkit.tasks import get_task

    return get_task(task[0], chat=task[1]).prompts("train", n_total)


def round_prompts(prompts: list[str], r: int, n: int) -> list[str]:
    """The ``n`` prompts of round ``r``: consecutive slices, wrapping around a short list."""
    if not prompts:
        return []
    start = (r * n) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(min(n, len(prompts)))]


def label_with(labeler: str, task_name: str | None, temperature: float, seed: int,
               chat: bool = False) -> Labeler:
    """Return ``fn(prompts, a, b) -> preference records`` (``prompt``, ``chosen``, ``rejected``;
    undecided pairs left out)."""
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

        return make_judge_labeler(labeler[len(PAIRWISE_JUDGE):])
    from alignkit.engine.scoring import make_reward_source

    source = make_reward_source(labeler, chat=chat)

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
    from alignkit.feedback.store import PreferenceStore

    with PreferenceStore(store_path) as store:
        return store.import_preferences(pairs_path, source=store_source(labeler),
                                        annotator=f"online-dpo:{labeler}")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_and_label(policy, tokenizer, prompts: list[str], labeler: Labeler, sampling, chat: bool,
                     seed: int, model_name: str) -> tuple[list[dict], int]:
    """Two samples per prompt, labelled; returns the preference records and the number of pairs
    sampled. A pair with an empty or duplicated response carries no preference and is skipped."""
    from alignkit.stages.label import sample_pairs

    pairs = sample_pairs(policy, tokenizer, prompts, _SamplingView(sampling, chat), seed=seed)
    kept = [p for p in pairs if p["response_a"].strip() and p["response_b"].strip()
            and p["response_a"] != p["response_b"]]
    records = labeler([p["prompt"] for p in kept], [p["response_a"] for p in kept],
                      [p["response_b"] for p in kept])
    # The store records which policy wrote each response.
    return [{**r, "model": model_name} for r in records], len(pairs)


def run_online(cfg) -> dict:
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.stages.dpo import REFERENCE_FREE, fit, load_reference, make_eval, prepare_examples
    from alignkit.stages.label import write_jsonl
    from alignkit.tracking import Tracker
    from alignkit.engine.training import make_accelerator

    out = Path(cfg.out_dir)
    on = cfg.online
    tracker = Tracker(out, cfg, stage=f"online-{cfg.loss.name}")
    tokenizer = load_tokenizer(cfg.model)
    reference = load_reference(cfg, tokenizer)  # also the KL yardstick of the evals
    chat_suffix = ":chat" if cfg.eval.chat else ""
    prompt_spec = (cfg.data.train if cfg.data.train != "online"
                   else f"task:{cfg.eval.task}{chat_suffix}")
    prompts = _prompts(prompt_spec, on.rounds * on.prompts_per_round)
    labeler = label_with(on.labeler, cfg.eval.task, on.annotator_temperature, cfg.train.seed,
                         chat=cfg.eval.chat)
    eval_fn = make_eval(cfg, tokenizer, reference)
    policy_path, final = cfg.model, {}
    for r in range(on.rounds):
        round_dir = out / f"round_{r}"
        done = round_dir / "metrics.json"
        if done.exists():
            policy_path, final = str(round_dir / "model"), json.loads(done.read_text())
            print(f"[online] round {r}: done, skipping", flush=True)
            continue
        policy = load_causal_lm(policy_path, tokenizer=tokenizer).eval()
        pairs_path = round_dir / "pairs.jsonl"
        if pairs_path.exists():     # labelled before an interruption
            records = _read_jsonl(pairs_path)
        else:
            records, n_sampled = sample_and_label(
                policy, tokenizer, round_prompts(prompts, r, on.prompts_per_round), labeler,
                on.sampling, cfg.eval.chat, cfg.train.seed + 1000 * r, policy_path)
            if not records:
                raise ValueError(f"online round {r}: none of {n_sampled} sampled pairs was labelled "
                                 "(empty, identical or tied responses); sample longer responses "
                                 "or more prompts")
            round_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(pairs_path, records)
        if on.store:
            counts = record_in_store(on.store, pairs_path, on.labeler)
            print(f"[online] round {r}: store {on.store}: {counts}", flush=True)
        # In chat mode the responses train as assistant turns, tokenised as sampling rendered them.
        examples, stats = prepare_examples(
            records, tokenizer, cfg, None if cfg.loss.name in REFERENCE_FREE else reference,
            chat=cfg.eval.chat)
        accelerator = make_accelerator(cfg.train.mixed_precision)
        model = apply_lora(policy.train(), cfg.lora)
        round_tracker = Tracker(round_dir, enabled=accelerator.is_main_process, stage=f"online r{r}")
        result = fit(model, examples, cfg, tokenizer, round_dir, round_tracker, accelerator, None)
        trained = accelerator.unwrap_model(model)
        metrics = {"round": r, "pairs": stats.kept, "train_loss": result.last_metrics.get("loss"),
                   **{k: v for k, v in result.last_metrics.items() if k.startswith("rewards/")}}
        if eval_fn is not None:
            trained.eval()
            metrics.update(eval_fn(trained))
        save_model(trained, tokenizer, round_dir / "model")
        # Log before the round's metrics.json marks it done; a crash in between redoes the round
        # and the truncation keeps one row per round.
        tracker.truncate_after(r)
        tracker.log(r + 1, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        round_tracker.finish(metrics)
        policy_path, final = str(round_dir / "model"), metrics
    save_model(load_causal_lm(policy_path, tokenizer=tokenizer), tokenizer, out / "model")
    return tracker.finish({**final, "rounds": on.rounds, "model": str(out / "model"),
                           "loss": cfg.loss.name, "beta": cfg.loss.beta})


class _SamplingView:
    """The fields :func:`alignkit.stages.label.sample_pairs` reads from a config."""

    def __init__(self, sampling, chat: bool, batch_size: int = 64):
        self.sampling, self.chat, self.batch_size = sampling, chat, batch_size
