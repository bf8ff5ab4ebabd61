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

import torch

from alignkit.config import require
from alignkit.data.sources import DataConfig, sft_source
from alignkit.engine.forward import packed_inputs
from alignkit.math.losses import bradley_terry_loss
from alignkit.engine.models import LoraSpec
from alignkit.engine.forward import last_mlp, rows_only
from alignkit.engine.training import (LoopConfig, LossOutput, OptimConfig, make_accelerator,
                               use_packing, train)


@dataclass(frozen=True)
class Config:
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


def pair_rewards(model, batch, last_rows_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen (first half) and rejected (second half) sequences of one forward
    pass over a padded or a packed batch (``last_rows_only``: see ``packed_scores``)."""
    if "sequence_index" in batch:
        scores = packed_scores(model, batch, last_rows_only)
    else:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, 0].float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def score_head(model) -> torch.nn.Module | None:
    """The scalar head of a sequence-classification model (``score`` in transformers' decoder
    classes; through PEFT, its outermost wrapper), or None."""
    return next((m for name, m in model.named_modules() if name.split(".")[-1] == "score"), None)


def packed_scores(model, batch, last_rows_only: bool = False) -> torch.Tensor:
    """Score ``[N]`` of every sequence of a packed batch: the head's output at each sequence's
    last token, read by a hook (the model's own pooling picks one token per row).
    ``last_rows_only``: the last layer's MLP runs at those tokens only (``rows_only``; check a
    model with ``supports_last_rows_only`` first)."""
    head = score_head(model)
    owner = batch["sequence_index"].reshape(-1)
    keep = owner >= 0
    where = torch.arange(owner.numel(), device=owner.device)
    last = torch.full((int(batch["num_sequences"]),), -1, dtype=torch.long, device=owner.device)
    last = last.scatter_reduce(0, owner[keep], where[keep], reduce="amax")
    per_token = []
    hook = head.register_forward_hook(lambda mod, args, out: per_token.append(out))
    try:
        with rows_only(last_mlp(model) if last_rows_only else None, last):
            model(**packed_inputs(batch))
    finally:
        hook.remove()
    return per_token[0].reshape(owner.numel(), -1)[last, 0].float()


def supports_last_rows_only(model, pack: str) -> bool:
    """Whether ``packed_scores`` gives the same scores with ``last_rows_only`` on ``model``
    (``forward.rows_only_agrees``), checked on two random pairs in layout ``pack``."""
    from alignkit.data.collate import collate_preference, to_device
    from alignkit.engine.forward import probe_sequences, rows_only_agrees

    ids = probe_sequences(model, (6, 9, 5, 7))
    pairs = [{"chosen_input_ids": a, "chosen_labels": a, "rejected_input_ids": b,
              "rejected_labels": b} for a, b in (ids[:2], ids[2:])]
    batch = to_device(collate_preference(pairs, 0, pack), next(model.parameters()).device)
    return rows_only_agrees(model, lambda only: packed_scores(model, batch, only))


def make_loss(margin: float, last_rows_only: bool = False):
    def loss_fn(model, batch) -> LossOutput:
        chosen, rejected = pair_rewards(model, batch, last_rows_only)
        values = bradley_terry_loss(chosen, rejected, margin)
        correct = (chosen > rejected).float()
        return LossOutput(values=values, weights=torch.ones_like(values),
                          metrics={"accuracy": (correct.sum(), len(correct)),
                                   "margin": ((chosen - rejected).sum(), len(correct))})
    return loss_fn


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, gold_margin: list[float] | None,
                   batch_size: int = 32) -> dict:
    """Pair accuracy vs the labels, and vs the gold ordering when ``gold_margin`` is given."""
    from alignkit.data.collate import collate_preference, to_device

    device = next(model.parameters()).device
    diffs = []
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate_preference(examples[s:s + batch_size], pad_id), device)
        chosen, rejected = pair_rewards(model, batch)
        diffs.append(chosen - rejected)
    diff = torch.cat(diffs)
    out = {"pair_accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    if gold_margin is not None:
        gold = torch.tensor(gold_margin, device=diff.device)
        decided = gold != 0
        agree = ((diff > 0) == (gold > 0)) & decided
        out["gold_pair_accuracy"] = float(agree.sum() / decided.sum().clamp_min(1))
        out["label_gold_agreement"] = float(((gold > 0) & decided).sum() / decided.sum().clamp_min(1))
    return out


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
    from alignkit.data.io import load_records
    from alignkit.engine.models import apply_lora, load_scalar_model, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="rm")
    tokenizer = load_tokenizer(cfg.model)
    d = cfg.data
    examples, stats = build_dataset(sft_source(d.train, "train", d.task_samples), tokenizer,
                                    format="preference", max_length=d.max_length,
                                    overlong=d.overlong, chat=d.chat)
    eval_fn = None
    if d.eval:
        eval_records = load_records(d.eval)
        eval_examples, _ = build_dataset(eval_records, tokenizer, format="preference",
                                         max_length=d.max_length, overlong="truncate", chat=d.chat)
        margins = gold_margins(cfg.gold_task, [dict(r) for r in eval_records]) \
            if cfg.gold_task else None
        eval_fn = lambda m: evaluate_pairs(m, eval_examples, tokenizer.pad_token_id, margins)  # noqa: E731
    model = apply_lora(load_scalar_model(cfg.model, tokenizer=tokenizer), cfg.lora,
                       task_type="SEQ_CLS")
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
    if accelerator.is_main_process:
        if cfg.save_adapter:  # before merging: PPO's shared placement serves it from its base
            accelerator.unwrap_model(model).save_pretrained(str(out / "adapter"))
            tokenizer.save_pretrained(str(out / "adapter"))
        save_model(accelerator.unwrap_model(model), tokenizer, out / "model")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"),
             "train_accuracy": result.last_metrics.get("accuracy"), "steps": result.step,
             "pairs": stats.kept, "model": str(out / "model")}
    final.update(result.eval_metrics)
    return tracker.finish(final)
