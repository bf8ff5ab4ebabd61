"""A causal LM's forward pass over padded or packed batches, and the log-probs read from it.

The arithmetic on logits lives in :mod:`alignkit.math.logprobs`; here are the calls into a model:
which inputs a padded or packed batch passes, where the LM head runs (``logits_to_keep``), and
how a PEFT wrapper passes its arguments through.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

from alignkit.math.logprobs import IGNORE_INDEX, next_token_logps, token_logps


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs ``[B, T-1]`` of ``labels[:, 1:]`` under a causal LM's forward pass.

    Left- or right-padded batches both work: position ids are derived from the attention mask
    when not given, so a token's log-prob does not depend on how much padding precedes it.
    """
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False)
    return next_token_logps(out.logits, labels)[0]


_last_boundaries: tuple = (None, -1, [])  # (weak reference, version, lengths): see below


def sequence_lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    """The sequence lengths of a flat row, as a list. ``packed_inputs`` and every attention layer
    of the forward (``alignkit.engine.attention``) read the same boundaries tensor, so the list read for
    it is kept: one device-to-host read per forward, not one per layer (each a synchronisation on
    a GPU). The tensor's identity and version (bumped by any in-place write) decide whether the
    kept list still holds."""
    global _last_boundaries
    ref, version, lengths = _last_boundaries
    if ref is None or ref() is not cu_seq_lens or version != cu_seq_lens._version:
        lengths = cu_seq_lens.diff().tolist()
        _last_boundaries = (weakref.ref(cu_seq_lens), cu_seq_lens._version, lengths)
    return lengths


def packed_inputs(batch: dict) -> dict:
    """Model inputs of a packed batch (``collate_packed``): ids and per-sequence position ids, no
    attention mask; a flat row also passes its sequence boundaries under the names flash
    attention's varlen path reads (``alignkit.engine.attention`` reads them on CPU)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "use_cache": False}
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        longest = max(sequence_lengths(cu))
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=longest, max_length_k=longest)
    if "shared_prefix_lens" in batch:  # collate_shared: only alignkit_sdpa reads it
        inputs["shared_prefix_lens"] = batch["shared_prefix_lens"]
    return inputs


def causal_logits(model, batch: dict, **kw) -> torch.Tensor:
    """Logits ``[R, T, V]`` of a right-padded batch (``attention_mask``) or a packed one
    (``position_ids`` restarting at every sequence, no mask: see ``collate_packed``); ``kw`` go
    to the forward (e.g. ``logits_to_keep``)."""
    if "sequence_index" in batch:
        return model(**packed_inputs(batch), **kw).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False, **kw).logits


def labelled_logps(model, batch: dict,
                   last_rows_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probs at the positions of a batch that have a target (``labels[:, t + 1]``
    not ``IGNORE_INDEX`` in some row), those targets, and the positions: ``([R, K], [R, K],
    [K])``, log-prob 0 and target ``IGNORE_INDEX`` where a row has none; the positions index the
    ``T - 1`` next-token axis (``labels[:, 1:]``). Where the forward takes ``logits_to_keep`` as
    indices (transformers' causal LMs), the LM head runs at those K positions only: a prompt's
    tokens (SFT), or all but the verdict of a judge's prompt, get no logits; ``last_rows_only``
    runs the last layer's MLP there only too (``forward.rows_only``; check the model with
    ``sft.supports_last_rows_only`` first). Otherwise K = T - 1 (:func:`next_token_logps`)."""
    labels = batch["labels"]
    if "logits_to_keep" not in forward_parameters(model):
        logps, targets = next_token_logps(causal_logits(model, batch), labels)
        return logps, targets, torch.arange(targets.size(1), device=targets.device)
    keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    targets = labels[:, 1:][:, keep]
    context = contextlib.nullcontext()
    if last_rows_only:
        starts = torch.arange(labels.size(0), device=keep.device)[:, None] * labels.size(1)
        context = rows_only(last_mlp(model), (starts + keep).reshape(-1))  # every row's K
    with context:
        logits = causal_logits(model, batch, logits_to_keep=keep)
    return token_logps(logits, targets), targets, keep


def forward_parameters(model) -> frozenset[str]:
    """The names ``model.forward`` declares (empty if its signature cannot be read). A PEFT
    wrapper whose adapters replace layers passes its keyword arguments through to the wrapped
    model (:func:`adapter_base`), so the wrapped model's names count too (``logits_to_keep``
    above all); prompt-learning wrappers build their own inputs and count as they declare."""
    def declared(fn) -> frozenset[str]:
        try:
            return frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return frozenset()

    names = declared(model.forward)
    base = adapter_base(model)
    return names | declared(base.forward) if base is not None and base is not model else names


def adapter_base(model):
    """The transformers model under a PEFT wrapper whose adapters replace layers (LoRA and kin:
    the adapter layers stay in place inside it, and the wrapper passes its keyword arguments
    through); ``model`` itself when it is no PEFT wrapper; ``None`` under prompt-learning
    adapters (prefix/prompt tuning build their own inputs and cache)."""
    configs = getattr(model, "peft_config", None)
    if not configs or not hasattr(model, "get_base_model"):
        return model
    if any(getattr(c, "is_prompt_learning", True) for c in configs.values()):
        return None
    return model.get_base_model()


def target_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's targets and their count, ``([N], [N])``, for a batch
    that lists its targets (``collate_shared``: ``target_positions``, ``target_ids``,
    ``target_owner``). The LM head runs at the target positions only where the model's forward
    takes ``logits_to_keep`` as indices (transformers' causal LMs)."""
    where = batch["target_positions"]
    if "logits_to_keep" in forward_parameters(model):
        logits = model(**packed_inputs(batch), logits_to_keep=where).logits.squeeze(0)
    else:
        logits = model(**packed_inputs(batch)).logits[0, where]
    per_token = token_logps(logits, batch["target_ids"])
    owner, n = batch["target_owner"], int(batch["num_sequences"])
    return (per_token.new_zeros(n).index_add(0, owner, per_token),
            per_token.new_zeros(n).index_add(0, owner, torch.ones_like(per_token)))


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
    from alignkit.engine.forward import packed_inputs

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
