"""``alignkit sft``: supervised fine-tuning on demonstrations (prompt/completion or chat).

Setup: tokenizer + causal LM via ``from_pretrained``, optional LoRA, data with loss on completion
tokens only. Loop: :func:`alignkit.engine.training.train` with the token-level NLL. Save: a Hugging
Face folder ``<out_dir>/model`` (LoRA merged) that every later stage loads by path; with LoRA
also the adapter, ``<out_dir>/adapter``, for ``PeftModel.from_pretrained(base, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.data.sources import DataConfig, eval_source, train_source
from alignkit.engine.lm_loss import eval_loss, loss_for, n_targets
from alignkit.engine.models import LoraSpec
from alignkit.engine.training import (LoopConfig, OptimConfig, final_model, make_accelerator, train,
                                      use_packing)
from alignkit.tracking import TrackingConfig


# What SFT learns from: demonstrations. Preference, KTO-labelled (unpaired: it would imitate the
# undesirable completions too) and prompt-only data are refused with the file and line named.
DEMONSTRATIONS = ("prompt_completion", "messages")


@dataclass(frozen=True)
class Config(TrackingConfig):
    model: str = ""
    out_dir: str = "runs/sft"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        require(bool(self.model), "model is required (a path or hub name of a causal LM)")


def main(cfg: Config) -> dict:
    from alignkit.data.collate import collate_rows
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.strategy, cfg.train.offload)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="sft")
    d = cfg.data
    tokenizer = load_tokenizer(cfg.model, d.chat_template, chat=d.chat, key="data.chat_template")
    train_src = train_source(d, seed=cfg.train.seed)
    examples, stats = build_dataset(train_src, tokenizer, format=d.format, accepts=DEMONSTRATIONS,
                                    max_length=d.max_length, overlong=d.overlong, chat=d.chat)
    eval_examples = []
    if d.eval:
        eval_src = eval_source(d, seed=cfg.train.seed)
        eval_examples, _ = build_dataset(eval_src, tokenizer, format=d.format, accepts=DEMONSTRATIONS,
                                         max_length=d.max_length, overlong=d.overlong, chat=d.chat)
    model = apply_lora(load_causal_lm(cfg.model, tokenizer=tokenizer, strategy=accelerator),
                       cfg.lora)
    pad, pack = tokenizer.pad_token_id, use_packing(model, cfg.train, accelerator)
    accelerator.print(f"alignkit sft: {stats}")
    result = train(model, examples, lengths=[len(e["input_ids"]) for e in examples],
                   collate=lambda b: collate_rows(b, pad, pack), weight_of=n_targets,
                   loss_fn=loss_for(model, pack), loop=cfg.train, optim=cfg.optim, out_dir=out,
                   tracker=tracker, accelerator=accelerator,
                   eval_fn=(lambda m: eval_loss(m, eval_examples, pad)) if eval_examples else None)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_model(trained, tokenizer, out / "model",
                   adapter_dir=out / "adapter")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"), "steps": result.step,
             "examples": stats.kept, "truncated": stats.truncated, "dropped": stats.dropped,
             "model": str(out / "model"), **result.distribution}
    final.update({f"eval_{k}": v for k, v in result.eval_metrics.items()})
    return tracker.finish(final)
