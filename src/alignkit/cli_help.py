"""``alignkit <stage> --help``: every config key of the stage with its type, default and the
comment it carries in the source, generated from the config dataclasses; and, for the flags a
TRL user types out of habit (``--model_name_or_path``, ``--learning_rate``, ...), the key that
does the job here.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing
from typing import Any

# TRL / transformers TrainingArguments flags -> our dotted key (the first one the stage has).
TRL_FLAGS: dict[str, tuple[str, ...]] = {
    "model_name_or_path": ("model", "policy"),
    "output_dir": ("out_dir",),
    "dataset_name": ("data.train", "rollout.prompts", "grow.prompts", "prompts"),
    "dataset_config": ("data.subset",),
    "dataset_train_split": ("data.split",),
    "dataset_test_split": ("data.eval_split",),
    "learning_rate": ("optim.lr", "improve.optim.lr"),
    "weight_decay": ("optim.weight_decay",),
    "warmup_steps": ("optim.warmup_steps",),
    "lr_scheduler_type": ("optim.schedule",),
    "max_grad_norm": ("optim.max_grad_norm",),
    "num_train_epochs": ("train.epochs",),
    "max_steps": ("train.max_steps", "iterations"),
    "per_device_train_batch_size": ("train.micro_batch_size", "ppo.micro_batch_size"),
    "gradient_accumulation_steps": ("train.batch_size", "ppo.minibatch_size"),
    "logging_steps": ("train.log_every",),
    "save_steps": ("train.save_every", "save_every"),
    "eval_steps": ("train.eval_every",),
    "seed": ("train.seed", "seed"),
    "bf16": ("train.mixed_precision", "mixed_precision"),
    "max_length": ("data.max_length",),
    "max_seq_length": ("data.max_length",),
    "beta": ("loss.beta", "kl.beta"),
    "loss_type": ("loss.name",),
    "use_peft": ("lora.enabled",),
    "lora_r": ("lora.r",),
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "lora_target_modules": ("lora.target_modules",),
    "num_generations": ("rollout.samples_per_prompt",),
    "max_completion_length": ("rollout.sampling.max_new_tokens", "sampling.max_new_tokens"),
    "temperature": ("rollout.sampling.temperature", "sampling.temperature"),
    "report_to": ("report_to",),
    "run_name": ("run_name",),
}

HOW = {"per_device_train_batch_size": " (rows per forward on one process)",
       "gradient_accumulation_steps": " (the global batch: micro_batch_size x accumulation x processes)",
       "bf16": "=bf16"}


def _comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in ``cls``'s source, and in its dataclass
    bases' (keys every stage inherits, such as ``report_to``); the class's own come first."""
    out: dict[str, str] = {}
    for klass in (k for k in cls.__mro__ if dataclasses.is_dataclass(k)):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        line_field: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
                line_field[tok.start[0]] = tok.string
            elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
                out.setdefault(line_field[tok.start[0]], tok.string.lstrip("# ").strip())
    return out


def _type_name(tp: Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    return re.sub(r"typing\.|<class '|'>", "", text).replace("NoneType", "None")


def config_keys(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, comment)`` of every leaf setting of dataclass ``cls``; a
    section's defaults are the stage's own (e.g. DPO's learning rate, not the optimiser's)."""
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    if defaults is None:
        try:
            defaults = cls()
        except Exception:   # a config with required keys: defaults field by field
            pass
    rows = []
    # Keyword-only keys (those every stage inherits: report_to, ...) after the stage's own.
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            try:
                default = f.default_factory()
            except Exception:
                default = None
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, f"{prefix}{f.name}.", default if dataclasses.is_dataclass(default)
                                else None)
            continue
        rows.append((prefix + f.name, _type_name(tp), default, comments.get(f.name, "")))
    return rows


def keys_help(cls: type) -> str:
    """The text ``--help`` prints after argparse's own: one line per key."""
    rows = config_keys(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (set in --config YAML or as key=value; sections are dotted):"]
    for key, tp, default, comment in rows:
        shown = repr(default) if isinstance(default, str) and (not default or "\n" in default) \
            else default
        shown = str(shown) if len(str(shown)) <= 60 else str(shown)[:57] + "..."
        lines.append(f"  {key:<{width}}  {tp} = {shown}" + (f"   # {comment}" if comment else ""))
    return "\n".join(lines)


def trl_hint(flag: str, cls: type, value: str | None = None) -> str | None:
    """What to write instead of TRL's ``--flag`` (``--flag=value``, or ``value`` the next
    argument) for a stage configured by ``cls``; None for a flag TRL does not have."""
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    keys = {k for k, *_ in config_keys(cls)}
    ours = next((k for k in TRL_FLAGS.get(name, ()) if k in keys), None)
    if ours is None:
        return None
    value = flag.split("=", 1)[1] if "=" in flag else (value or "VALUE")
    return f"{flag.split('=', 1)[0]} is TRL's; here it is {ours}" + HOW.get(name, f"={value}")
