"""``alignkit rm``: a reward model trained with the Bradley-Terry loss on preference pairs.

Setup: a causal LM backbone with a scalar head (``AutoModelForSequenceClassification``,
``num_labels=1``), optional LoRA. Loop: chosen and rejected sequences of a batch go through one
forward pass (2B rows; packed: each pair's prompt once, and the last layer's MLP only at the
scored tokens), loss ``-log sigmoid(r_w - r_l - margin)`` per pair. Eval: accuracy on
held-out pairs and, on built-in tasks, agreement with the noise-free gold ordering. Save:
``<out_dir>/model``, loadable with ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.data.sources import DataConfig, eval_source, train_source
from alignkit.engine.models import LoraSpec
from alignkit.engine.rm_loss import evaluate_pairs, make_loss, score_head, supports_last_rows_only
from alignkit.engine.training import (LoopConfig, OptimConfig, final_model, make_accelerator, train,
                                      use_packing)
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
    model: str = ""
    out_dir: str = "runs/rm"
    data: DataConfig = field(default_factory=DataConfig)
    margin: float = 0.0           # constant margin m in -log sigmoid(r_w - r_l - m)
    gold_task: str | None = None  # built-in task whose gold reward scores eval pairs (eval only)
    lora: LoraSpec = field(default_factory=LoraSpec)
    save_adapter: bool = False    # with LoRA: also save the unmerged adapter + head to <out_dir>/adapter
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=10))
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        require(bool(self.model), "model is required (a path or hub name of a causal LM)")
        require(self.lora.enabled or not self.save_adapter, "save_adapter needs lora.enabled=true")


def gold_margins(task_name: str, records: list[dict]) -> list[float]:
    """gold(chosen) - gold(rejected) for text records (eval only: the gold stays out of training)."""
    from alignkit.tasks import get_task

    task = get_task(task_name)
    prompts = [r["prompt"] for r in records]
    chosen = task.gold_reward(prompts, [r["chosen"] for r in records])
    rejected = task.gold_reward(prompts, [r["rejected"] for r in records])
    return [c - r for c, r in zip(chosen, rejected)]


def main(cfg: Config) -> dict:
    from alignkit.data.collate import collate_preference
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import apply_lora, load_scalar_model, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.strategy, cfg.train.offload)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="rm")
    d = cfg.data
    tokenizer = load_tokenizer(cfg.model, d.chat_template, chat=d.chat, key="data.chat_template")
    examples, stats = build_dataset(train_source(d), tokenizer,
                                    format="preference", max_length=d.max_length,
                                    overlong=d.overlong, chat=d.chat)
    eval_fn = None
    if d.eval:
        eval_records = eval_source(d)
        eval_examples, _ = build_dataset(eval_records, tokenizer, format="preference",
                                         max_length=d.max_length, overlong="truncate", chat=d.chat)
        margins = gold_margins(cfg.gold_task, [dict(r) for r in eval_records]) \
            if cfg.gold_task else None
        eval_fn = lambda m: evaluate_pairs(m, eval_examples, tokenizer.pad_token_id, margins)  # noqa: E731
    model = apply_lora(load_scalar_model(cfg.model, tokenizer=tokenizer, strategy=accelerator),
                       cfg.lora, task_type="SEQ_CLS")
    accelerator.print(f"alignkit rm: {stats}")
    pad = tokenizer.pad_token_id
    pack = (use_packing(model, cfg.train, accelerator, pairs=True)
            if score_head(model) is not None else None)
    last_rows_only = pack is not None and supports_last_rows_only(model, pack)
    result = train(model, examples,
                   lengths=[max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
                            for e in examples],
                   collate=lambda b: collate_preference(b, pad, pack), weight_of=lambda e: 1.0,
                   loss_fn=make_loss(cfg.margin, last_rows_only), loop=cfg.train,
                   optim=cfg.optim, out_dir=out, tracker=tracker, accelerator=accelerator,
                   eval_fn=eval_fn)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        # PPO's shared placement serves the adapter from its base.
        save_model(trained, tokenizer, out / "model",
                   adapter_dir=out / "adapter" if cfg.save_adapter else None)
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"),
             "train_accuracy": result.last_metrics.get("accuracy"), "steps": result.step,
             "pairs": stats.kept, "model": str(out / "model"), **result.distribution}
    final.update(result.eval_metrics)
    return tracker.finish(final)
