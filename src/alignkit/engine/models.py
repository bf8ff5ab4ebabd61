"""Loading the roles: policy / reference (causal LM), reward and value (scalar head), LoRA.

Every model goes through ``from_pretrained(name_or_path)``: a local folder written by an earlier
stage, or any Hugging Face model a user has on disk or in their hub cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import ConfigError, require


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self):
        require(self.r > 0, "lora.r must be > 0")


def _from_pretrained(load, path: str | Path, **kwargs):
    """``load(path)`` (a ``from_pretrained``), with a clear :class:`ConfigError` naming the path
    where there is nothing to load: a missing local path, an empty folder, a folder without the
    files, or a hub name that is not in the local cache (alignkit never downloads)."""
    local = Path(path)
    if local.is_dir() and not any(local.iterdir()):
        raise ConfigError(f"cannot load a model from {path}: the folder is empty")
    if not local.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") > 1):
        raise ConfigError(f"cannot load a model from {path}: no such file or directory")
    try:
        return load(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "folder" if local.is_dir() else "local folder, nor a model in the Hugging Face cache"
        raise ConfigError(f"cannot load a model from {path} (not a loadable {where}): "
                          f"{first}") from None


def load_tokenizer(path: str | Path, chat_template: str | None = None, *, chat: bool = False,
                   key: str = "chat_template"):
    """The tokenizer of ``path``, with a pad token distinct from EOS.

    ``chat_template`` (the config key ``key``) replaces the tokenizer's chat template: a Jinja
    template, a ``.jinja`` file holding one, or a tokenizer folder whose template to take (TRL's
    ``chat_template_path``). It is saved with the tokenizer, so every later stage that loads the
    saved model renders chat the same way. ``chat``: the stage renders chat; a tokenizer left
    without a template is then a :class:`ConfigError` naming ``key``, before any model loads.
    """
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, path)
    if tok.pad_token_id is None:
        # A pad token equal to EOS would mask real EOS targets in training; add a distinct one.
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    if chat_template is not None:
        tok.chat_template = _read_chat_template(chat_template, key)
        try:  # a template that cannot render fails here, naming the key, not mid-run
            tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=True)
        except Exception as e:  # jinja2 syntax or runtime errors
            raise ConfigError(f"{key}: the chat template does not render a user turn: "
                              f"{type(e).__name__}: {e}") from None
    if chat and not tok.chat_template:
        raise ConfigError(f"the tokenizer of {path} has no chat template and this stage renders "
                          f"chat; give one with {key}=... (a Jinja template or a .jinja file)")
    return tok


def _read_chat_template(value: str, key: str) -> str:
    """A Jinja template (it has ``{{`` or ``{%``) as it is; else the path of a file holding one,
    or of a tokenizer folder whose template to take."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        from transformers import AutoTokenizer

        template = _from_pretrained(AutoTokenizer.from_pretrained, path).chat_template
        if not template:
            raise ConfigError(f"{key}: the tokenizer in {value} has no chat template")
        return template
    raise ConfigError(f"{key}: {value!r} is no Jinja template (no {{{{ or {{%) and no such file "
                      "or folder")


def _build(strategy, load, empty):
    """``load()`` through ``strategy.build`` (:mod:`alignkit.engine.strategies`: a sharded
    strategy builds the model sharded, from ``empty()`` where it must not hold it whole), or
    ``load()`` itself without a strategy."""
    return load() if strategy is None else strategy.build(load, empty)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None,
                   strategy=None):
    """The causal LM of ``path``; ``strategy``: the run's training strategy, for a model it will
    train (it decides how the model is built: whole, or sharded as it is created)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def load():
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype)
        _fit_vocab(model, tokenizer)
        return fuse_activations(model)

    def empty():
        config = _from_pretrained(AutoConfig.from_pretrained, path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        _fit_vocab(model, tokenizer, mean_resizing=False)   # the values come from load()'s
        return fuse_activations(model)

    return _build(strategy, load, empty)


def load_scalar_model(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None,
                      strategy=None):
    """A causal LM backbone with a 1-output score head (reward or value model).

    Loading a causal-LM folder initialises the head fresh; loading a reward-model folder restores
    it. The score is read at the last non-pad token, so ``pad_token_id`` must be set.
    ``strategy``: as for :func:`load_causal_lm`.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    def finish(model, mean_resizing=True):
        if tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        _fit_vocab(model, tokenizer, mean_resizing=mean_resizing)
        return fuse_activations(model)

    def load():
        return finish(_from_pretrained(AutoModelForSequenceClassification.from_pretrained, path,
                                       num_labels=1, dtype=dtype))

    def empty():
        config = _from_pretrained(AutoConfig.from_pretrained, path, num_labels=1)
        return finish(AutoModelForSequenceClassification.from_config(config, dtype=dtype).eval(),
                      mean_resizing=False)

    return _build(strategy, load, empty)


def fuse_activations(model):
    """Swap the tanh-approximated GELU written as seven elementwise ops (``gelu_new``: GPT-2 and
    its kin; ``gelu_fast``) for PyTorch's one-kernel ``gelu(approximate="tanh")``, the same
    function (Hendrycks & Gimpel 2016, eq. in §2) to float rounding. On GPT-2 shapes the
    unfused version's temporaries cost ~8% of a training step on CPU. In place; returns ``model``.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def _fit_vocab(model, tokenizer, mean_resizing: bool = True) -> None:
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)


def apply_lora(model, spec: LoraSpec, task_type: str = "CAUSAL_LM"):
    if not spec.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                        task_type=task_type)
    return get_peft_model(model, config)


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = True,
               adapter_dir: str | Path | None = None) -> Path:
    """Save in Hugging Face format (LoRA merged by default, so the folder loads with Auto*).

    ``adapter_dir``: a LoRA model also saves its unmerged adapter there (:func:`save_adapter`),
    before the merge; a model without LoRA saves none.
    """
    out_dir = Path(out_dir)
    if adapter_dir is not None and hasattr(model, "peft_config"):
        save_adapter(model, tokenizer, adapter_dir)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def save_adapter(model, tokenizer, out_dir: str | Path) -> Path:
    """The LoRA adapter of the PEFT ``model``, unmerged: ``adapter_config.json`` (its base in
    ``base_model_name_or_path``: the model it was trained on), ``adapter_model.safetensors`` (and a
    score head's weights, for a reward model) and the tokenizer. It loads with
    ``PeftModel.from_pretrained(base, out_dir)`` and serves as an adapter of its base (e.g. vLLM's
    ``--lora-modules``). A tokenizer that gained a pad token (:func:`load_tokenizer`) has one more
    token than the base: resize the base's embeddings to ``len(tokenizer)`` before loading.
    """
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
