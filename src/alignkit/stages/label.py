"""``alignkit label``: sample response pairs from a policy and have them labelled.

For each prompt the policy samples two responses; an annotator says which it prefers. The
built-in annotator is simulated: a Bradley-Terry draw on the task's hidden gold reward with a
configurable rationality (Gao, Schulman & Hilton 2022's synthetic-labels setup). Output: JSONL
preference files ``train.jsonl`` / ``eval.jsonl`` (prompt, chosen, rejected) that the reward
model and DPO stages read, plus the unlabelled ``pairs_*.jsonl`` for other labelers.

``judge=CONFIG`` (a judge config file, e.g. ``configs/judge.yaml``) labels the same pairs with an
AI judge as well (:mod:`alignkit.stages.judge`, written to ``<out_dir>/ai/``): the stage's
``train``/``eval`` outputs are then the AI labels, and the simulated labels stay beside them as
the yardstick of the judge's agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class AnnotatorConfig:
    temperature: float = 0.2   # Bradley-Terry rationality on the gold scale; lower = less noise
    tie_margin: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Config(TrackingConfig):
    policy: str = ""
    task: str = "sentiment"
    # Sample through the chat template. The records stay plain strings (the store and the judges
    # read them); train a reward model or DPO on them with data.chat=true.
    chat: bool = False
    chat_template: str | None = None  # for chat=true: a Jinja template or a .jinja file
    out_dir: str = "runs/labels"
    train_prompts: int = 2000
    eval_prompts: int = 200
    pairs_per_prompt: int = 1     # independent pairs drawn for each prompt
    judge: str = ""               # a judge config file: label with that AI judge too
    batch_size: int = 64
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # sampling and judge: local | ray

    def __post_init__(self):
        require(bool(self.policy), "policy is required (path of a causal LM)")
        require(self.train_prompts > 0, "train_prompts must be > 0")
        require(self.pairs_per_prompt >= 1, "pairs_per_prompt must be >= 1")


def main(cfg: Config) -> dict:
    from alignkit.data.io import write_jsonl
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.sampling import informative_pairs, sample_pairs
    from alignkit.feedback.simulate import SimulatedAnnotator, label_pairs
    from alignkit.tasks import get_task
    from alignkit.tracking import Tracker

    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, stage="label")
    task = get_task(cfg.task, chat=cfg.chat)
    tokenizer = load_tokenizer(cfg.policy, cfg.chat_template, chat=cfg.chat)
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer).eval()
    annotator = SimulatedAnnotator(temperature=cfg.annotator.temperature,
                                   tie_margin=cfg.annotator.tie_margin, seed=cfg.annotator.seed)
    summary = {}
    for split, n, seed in (("train", cfg.train_prompts, cfg.seed), ("eval", cfg.eval_prompts, cfg.seed + 1)):
        prompts = [p for p in task.prompts("train" if split == "train" else "test", n)
                   for _ in range(cfg.pairs_per_prompt)]
        sampled = sample_pairs(policy, tokenizer, prompts, cfg.sampling, chat=cfg.chat, seed=seed,
                               batch_size=cfg.batch_size, workers=cfg.workers)
        # A pair with an empty or duplicated response carries no preference; data files refuse it.
        pairs = informative_pairs(sampled)
        summary[f"{split}_skipped_pairs"] = len(sampled) - len(pairs)
        write_jsonl(out / f"pairs_{split}.jsonl", pairs)
        records = label_pairs(task, [p["prompt"] for p in pairs], [p["response_a"] for p in pairs],
                              [p["response_b"] for p in pairs], annotator)
        write_jsonl(out / f"{split}.jsonl", records)
        summary[f"{split}_pairs"] = len(records)
        print(f"[label] {split}: {len(sampled)} pairs sampled, {len(sampled) - len(pairs)} skipped "
              f"(empty or identical), {len(records)} labelled", flush=True)
    summary["train"] = str(out / "train.jsonl")
    summary["eval"] = str(out / "eval.jsonl")
    if cfg.judge:
        summary.update(_judge_labels(cfg, out))
    return tracker.finish(summary)


def _judge_labels(cfg: Config, out: Path) -> dict:
    """The AI judge's labels of the pairs just written (``out/ai``), with its agreement metrics."""
    from alignkit.engine.ai_labels import label_pair_files
    from alignkit.engine.judges import load_judge_config
    from alignkit.tracking import Tracker

    judge_cfg = load_judge_config(cfg.judge)
    tracker = Tracker(out / "ai", judge_cfg, stage="label-ai")
    ai = label_pair_files(judge_cfg, out, out / "ai", splits=["train", "eval"],
                          store=out / "ai" / "store.db", reference_source="simulated",
                          workers=cfg.workers)
    tracker.log(0, {k: v for k, v in ai.items() if isinstance(v, (int, float))})
    return {**tracker.finish(ai), "simulated_train": str(out / "train.jsonl")}   # train/eval: AI
