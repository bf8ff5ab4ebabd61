"""Loading the roles: policy / reference (causal LM), reward and value (scalar head), LoRA.

Every model goes through ``from_pretrained(name_or_path)``: a local folder written by an earlier
stage, or any Hugging Face model a user has on disk or in their hub cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import require


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self):
        require(self.r > 0, "lora.r must be > 0")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        # A pad token equal to EOS would mask real EOS targets in training; add a distinct one.
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    _fit_vocab(model, tokenizer)
    return fuse_activations(model)


def load_scalar_model(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A causal LM backbone with a 1-output score head (reward or value model).

    Loading a causal-LM folder initialises the head fresh; loading a reward-model folder restores
    it. The score is read at the last non-pad token, so ``pad_token_id`` must be set.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _fit_vocab(model, tokenizer)
    return fuse_activations(model)


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


def probe_sequences(model, lengths) -> list[list[int]]:
    """Random token sequences of ``lengths`` (fixed seed) for a check run on ``model`` once."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (n,), generator=gen).tolist() for n in lengths]


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode inside, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def agree(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a check's two computations on a model in ``dtype`` match to its float rounding
    (relative to the magnitude of ``expected``: 1e-4 in fp32, 3e-2 in half precision)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return bool((got.float() - expected.float()).abs().max()
                <= tol * (1.0 + expected.float().abs().max()))


def last_mlp(model) -> torch.nn.Module | None:
    """The MLP (``mlp``) of the model's last decoder layer: the last entry of its longest
    ``ModuleList``, as transformers' decoders hold their layers; None if there is none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return getattr(max(lists, key=len)[-1], "mlp", None) if lists else None


@contextlib.contextmanager
def rows_only(module: torch.nn.Module | None, rows: torch.Tensor):
    """Run ``module``, applied position by position to a ``[R, T, d]`` input, at positions
    ``rows`` of its flattened ``R * T`` tokens only; elsewhere its output is 0. For a module whose
    output is read only at ``rows``: the last layer's MLP of a reward model, read only at each
    sequence's last token (the score), or of a causal LM whose loss reads the positions with a
    target only (``logprobs.labelled_logps``); this saves ~2/3 of the last layer's forward and
    backward at every other token. ``None`` runs everything."""
    if module is None:
        yield
        return
    shapes = []

    def before(mod, args):
        if not args or not torch.is_tensor(args[0]) or args[0].dim() != 3:
            shapes.append(None)
            return None
        x = args[0]
        shapes.append(x.shape)
        return (x.flatten(0, 1).index_select(0, rows).unsqueeze(0),) + args[1:]

    def after(mod, args, out):
        shape = shapes.pop()
        if shape is None:
            return None
        if not torch.is_tensor(out):  # e.g. a mixture of experts returning router logits too
            raise TypeError(f"rows_only needs a module that returns one tensor, got {type(out)}")
        full = out.new_zeros(shape[0] * shape[1], out.shape[-1])
        return full.index_copy(0, rows, out[0]).view(shape[0], shape[1], -1)

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def rows_only_agrees(model, run) -> bool:
    """Whether ``run(True)`` (a computation with the last layer's MLP under :func:`rows_only`)
    equals ``run(False)`` (the whole MLP) on ``model``, in eval mode: a dense MLP works token by
    token and passes; a mixture of experts that drops tokens over capacity, or gradient
    checkpointing (which re-runs the layer in the backward, outside the hooks), does not."""
    if last_mlp(model) is None or any(getattr(m, "gradient_checkpointing", False) is True
                                      for m in model.modules()):
        return False
    try:
        with evaluating(model):
            full, part = run(False), run(True)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    return agree(full, part, next(model.parameters()).dtype)


@torch.no_grad()
def supports_packing(model, layout: str = "rows") -> bool:
    """Whether ``model`` confines attention to each sequence of a packed batch in ``layout``
    (for ``"shared"``: and lets a pair's second member see the prefix it shares with the first).

    Packed rows follow transformers' padding-free convention: position ids restart at 0 for
    every sequence and no attention mask is given (a flat row also passes the sequence
    boundaries: ``logprobs.packed_inputs``). Models whose attention builds its mask with
    ``transformers.masking_utils`` (Llama, GPT-2, Mistral, Qwen, ... with eager, SDPA or flash
    attention) honour it; others would silently attend across sequences. So it is checked: two
    short sequences, packed vs one at a time, must give the same last hidden states.
    """
    from alignkit.data.collate import collate_packed, collate_shared, to_device
    from alignkit.logprobs import packed_inputs

    param = next(model.parameters())
    seqs = probe_sequences(model, (5, 7))
    if layout == "shared":  # a pair sharing its first 3 tokens: the second is written from its 4th
        vocab = model.get_input_embeddings().num_embeddings
        seqs[1][:3], seqs[1][3] = seqs[0][:3], (seqs[0][3] + 1) % vocab
        rows = [{"input_ids": s, "labels": s} for s in seqs]
        batch = collate_shared([(rows[0], rows[1])])
    else:
        batch = collate_packed([{"input_ids": s, "labels": s} for s in seqs], layout, width=12)
    batch = to_device(batch, param.device)
    try:
        with evaluating(model):
            packed = model(**packed_inputs(batch), output_hidden_states=True).hidden_states[-1]
            alone = [model(input_ids=torch.tensor([s], device=param.device), use_cache=False,
                           output_hidden_states=True).hidden_states[-1][0] for s in seqs]
    except (TypeError, ValueError, RuntimeError, ImportError, AttributeError):  # e.g. flash off GPU
        return False
    packed = torch.cat([packed[batch["sequence_index"] == i] for i in range(len(seqs))])
    if layout == "shared":
        alone[1] = alone[1][3:]
    return agree(torch.cat(alone), packed, param.dtype)


def _fit_vocab(model, tokenizer) -> None:
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def apply_lora(model, spec: LoraSpec, task_type: str = "CAUSAL_LM"):
    if not spec.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                        task_type=task_type)
    return get_peft_model(model, config)


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Save in Hugging Face format (LoRA merged by default, so the folder loads with Auto*)."""
    out_dir = Path(out_dir)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
