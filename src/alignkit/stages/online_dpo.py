"""Online / iterative DPO: sample pairs from the current policy, label them, train, repeat.

Each round ``r`` (Xu et al. 2023, "Some things are more CRINGE than others"; Guo et al. 2024,
"Direct language model alignment from online AI feedback"):

1. sample two responses per prompt from the policy of round ``r - 1``;
2. label each pair: simulated annotators on a built-in task's gold reward (Bradley-Terry draw),
   or any reward source (the higher-scored response is chosen);
3. cache the reference log-probs of the new pairs (the reference stays the initial policy);
4. train with the configured DAP loss; save ``round_<r>/model`` and ``round_<r>/metrics.json``.

A finished round is never redone: a restarted run loads the last finished round's model and
goes on; a round interrupted mid-training resumes from its own checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.data.sources import parse_task


def _prompts(spec: str, n_total: int) -> list[str]:
    task = parse_task(spec)
    if task is None:
        from alignkit.data.io import load_records

        return [r["prompt"] for r in load_records(spec)]
    from alignkit.tasks import get_task

    return get_task(task[0], chat=task[1]).prompts("train", n_total)


def label_with(labeler: str, task_name: str | None, temperature: float, seed: int):
    """Return ``fn(prompts, a, b) -> preference records``."""
    if labeler == "simulated":
        from alignkit.feedback.simulate import SimulatedAnnotator, label_pairs
        from alignkit.tasks import get_task

        if task_name is None:
            raise ValueError("online.labeler=simulated needs a built-in task (eval.task)")
        task = get_task(task_name)
        annotator = SimulatedAnnotator(temperature=temperature, seed=seed)
        return lambda p, a, b: label_pairs(task, p, a, b, annotator)
    from alignkit.rewards import make_reward_source

    source = make_reward_source(labeler)

    def by_reward(prompts, a, b):
        sa, sb = source(prompts, a), source(prompts, b)
        return [{"prompt": p, "chosen": x if s >= t else y, "rejected": y if s >= t else x,
                 "source": source.name}
                for p, x, y, s, t in zip(prompts, a, b, sa, sb) if s != t]

    return by_reward


def run_online(cfg) -> dict:
    from alignkit.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.stages.dpo import REFERENCE_FREE, fit, load_reference, make_eval, prepare_examples
    from alignkit.stages.label import sample_pairs, write_jsonl
    from alignkit.tracking import Tracker
    from alignkit.training import make_accelerator

    out = Path(cfg.out_dir)
    on = cfg.online
    tracker = Tracker(out, cfg, stage=f"online-{cfg.loss.name}")
    tokenizer = load_tokenizer(cfg.model)
    reference = load_reference(cfg, tokenizer)  # also the KL yardstick of the evals
    prompt_spec = cfg.data.train if cfg.data.train != "online" else f"task:{cfg.eval.task}"
    prompts = _prompts(prompt_spec, on.rounds * on.prompts_per_round)
    labeler = label_with(on.labeler, cfg.eval.task, on.annotator_temperature, cfg.train.seed)
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
        start = (r * on.prompts_per_round) % max(len(prompts), 1)
        batch_prompts = (prompts[start:] + prompts[:start])[:on.prompts_per_round]
        pairs = sample_pairs(policy, tokenizer, batch_prompts, _SamplingView(on.sampling, cfg.eval.chat),
                             seed=cfg.train.seed + 1000 * r)
        pairs = [p for p in pairs if p["response_a"].strip() and p["response_b"].strip()
                 and p["response_a"] != p["response_b"]]
        records = labeler([p["prompt"] for p in pairs], [p["response_a"] for p in pairs],
                          [p["response_b"] for p in pairs])
        round_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(round_dir / "pairs.jsonl", records)
        examples, stats = prepare_examples(records, tokenizer, cfg,
                                           None if cfg.loss.name in REFERENCE_FREE else reference)
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
        round_tracker.finish(metrics)
        tracker.log(r + 1, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        policy_path, final = str(round_dir / "model"), metrics
    save_model(load_causal_lm(policy_path, tokenizer=tokenizer), tokenizer, out / "model")
    return tracker.finish({**final, "rounds": on.rounds, "model": str(out / "model"),
                           "loss": cfg.loss.name, "beta": cfg.loss.beta})


class _SamplingView:
    """The two fields :func:`alignkit.stages.label.sample_pairs` reads from a config."""

    def __init__(self, sampling, chat: bool, batch_size: int = 64):
        self.sampling, self.chat, self.batch_size = sampling, chat, batch_size
