"""Batched sampling with a KV cache for any Hugging Face causal LM; returns tokens and their log-probs.

One prefill over the left-padded prompts, then one token per step through the model's KV cache.
Position ids are ``cumsum(attention_mask) - 1`` for the prompt and keep counting for every
generated token, so a row's tokens and log-probs do not depend on how much padding it carries
(models with learned absolute positions, e.g. GPT-2, otherwise see a shifted position per pad).

The log-prob recorded for each sampled token is taken under the *unfiltered*
``softmax(logits / temperature)``; top-k / top-p only restrict which token is drawn. PPO, RLOO
and GRPO form importance ratios ``exp(new_logps - old_logps)`` where ``new_logps`` come from a
training forward pass (:func:`rollout_logps`) that knows nothing of top-p; recording the filtered
log-prob would bias every ratio by the (row- and step-dependent) log-mass of the kept nucleus.

Where the time goes on small models is per-op overhead, not FLOPs, so the loop avoids what
``model.generate`` pays for: the KV cache is written into a buffer sized for the whole rollout
(``DynamicCache`` re-copies the full cache with ``torch.cat`` every step), sampling inverts the CDF
with one uniform per row (``torch.multinomial`` draws one exponential per vocabulary entry), there
is one host sync per step (not per row), and finished rows are dropped from the batch. The prefill
runs the model's forward; each later token of a model that :mod:`alignkit.engine.decoders` implements goes
through its decode step on the model's weights (the same arithmetic without the forward's per-call
machinery), any other model's through its forward.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from alignkit.engine.decoders import compile_options, decoder_for
from alignkit.math.logprobs import IGNORE_INDEX, token_logps
from alignkit.engine.forward import forward_parameters
from alignkit.tracking import Progress

# Sampling passes shorter than this show no progress (PPO's rollouts of small models, tests).
SAMPLING_QUIET_S = 10.0


class DrawSettings(Protocol):
    """What the decoder reads of :class:`alignkit.engine.sampling.SamplingConfig`."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    compile: bool

    @property
    def greedy(self) -> bool: ...


@dataclass
class Rollout:
    """A batch of prompts and sampled responses.

    ``prompt_ids``/``prompt_mask`` ``[B, P]`` are left-padded; ``response_ids``/``response_mask``
    ``[B, R]`` are right-padded with ``pad_token_id`` after the first EOS; the EOS itself is kept and
    counted in the mask (so ``pad_token_id == eos_token_id`` is safe). ``logps`` ``[B, R]`` fp32 is
    the log-prob of each sampled token under ``softmax(logits / temperature)`` (temperature 1 when
    greedy), 0 on padding. ``finished`` ``[B]`` says whether the row produced EOS.
    """

    prompt_ids: torch.LongTensor
    prompt_mask: torch.LongTensor
    response_ids: torch.LongTensor
    response_mask: torch.LongTensor
    logps: torch.Tensor
    finished: torch.BoolTensor

    def sequences(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """``(input_ids, attention_mask)`` ``[B, P + R]`` of prompt + response, for a training forward."""
        return (torch.cat([self.prompt_ids, self.response_ids], dim=1),
                torch.cat([self.prompt_mask, self.response_mask], dim=1))

    @functools.cached_property
    def packed(self) -> PackedRollout:
        """The rows' real tokens (prompt, then response) in one flat row: see :class:`PackedRollout`.
        Built once per rollout: the policy, reference and value forwards over it share it."""
        return self._pack(share=False)

    @functools.cached_property
    def packed_shared(self) -> PackedRollout:
        """As :attr:`packed`, with each prompt written once for all the rows that sampled from it
        (GRPO/RLOO's groups): see :class:`PackedRollout`."""
        return self._pack(share=True)

    def packing(self, pack: bool | str) -> PackedRollout:
        """:attr:`packed_shared` for ``pack == "shared"``, else :attr:`packed`."""
        return self.packed_shared if pack == "shared" else self.packed

    def _pack(self, share: bool) -> PackedRollout:
        ids, mask = self.sequences()
        width = self.prompt_ids.size(1)
        rows = torch.arange(ids.size(0), device=ids.device)
        # The row whose segment holds this row's prompt: its first row (the prompts share one
        # left-padded width, so equal prompts are equal rows).
        first, copies = _distinct_rows(self.prompt_ids, self.prompt_mask) if share else (None, None)
        leader = rows if first is None else first[copies]
        follower = leader != rows
        # Segments in order: each prompt's first row whole, then the other rows of that prompt,
        # response only (so a follower's segment comes right after one that starts with its prompt).
        order = torch.argsort(leader, stable=True)
        keep = mask.bool()
        keep[follower, :width] = False
        kept = keep[order]
        flat_index = torch.empty_like(mask)
        flat_index[order] = (kept.flatten().cumsum(0) - 1).view_as(kept)   # of each kept token
        # Token t >= 1 of a response is predicted at the flat position of token t - 1; token 0 at
        # the last prompt token, in the segment of the row's leader.
        predicted_at = flat_index[:, width:] - 1
        predicted_at[:, 0] = flat_index[leader, width] - 1
        prompt_lengths = self.prompt_mask.sum(-1)
        shared = torch.where(follower, prompt_lengths, 0)[order]
        lengths = kept.sum(-1)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        response = self.response_mask.bool()
        return PackedRollout(
            input_ids=ids[order][kept][None], position_ids=(mask.cumsum(-1) - 1)[order][kept][None],
            cu_seq_lens=cu, targets=predicted_at[response], labels=self.response_ids[response],
            response_mask=response,
            shared_prefix_lens=tuple(shared.tolist()) if bool(follower.any()) else None)

    def response_lengths(self) -> torch.LongTensor:
        """Number of response tokens per row, EOS included."""
        return self.response_mask.sum(-1)

    def decode(self, tokenizer) -> list[str]:
        """Response text per row, special tokens (EOS) dropped."""
        return [tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
                for ids, n in zip(self.response_ids, self.response_lengths().tolist())]


@dataclass
class PackedRollout:
    """A rollout's real tokens in one flat row, for a training forward with no padding.

    Each row's prompt tokens then its response tokens (up to and including EOS), one sequence
    after another: ``input_ids``/``position_ids`` ``[1, N]`` (positions restart at 0 for every
    sequence, as ``cumsum(mask) - 1`` gives them in the padded layout), ``cu_seq_lens`` the
    segments' boundaries (what flash attention's varlen path and ``alignkit_sdpa`` read).
    ``targets`` ``[K]``: the flat positions whose outputs predict the ``K`` response tokens
    ``labels``, in the row-major order of ``response_mask`` ``[B, R]``, which :meth:`unflatten`
    scatters back to.

    With the prompts shared (:attr:`Rollout.packed_shared`; prefix sharing, Wang & Hegde 2024,
    arXiv:2410.20305, as ``data.collate.collate_shared`` does for preference pairs), the rows that
    sampled from the same prompt are written one after another, the first whole and the others as
    their response only, positions continuing from the prompt's length and
    ``shared_prefix_lens`` (per segment: the prompt length, 0 for a first row) letting each
    attend to the prompt of the segment before it (``alignkit_sdpa`` only: the caller checks
    ``forward.supports_packing(model, "shared")``). A response's first token is predicted at the
    prompt's last token, which all the group's rows then share: the same values within float
    error, the prompt's forward and backward run once per group instead of once per row.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    cu_seq_lens: torch.Tensor
    targets: torch.LongTensor
    labels: torch.LongTensor
    response_mask: torch.BoolTensor
    shared_prefix_lens: tuple[int, ...] | None = None

    def inputs(self) -> dict:
        """Keyword arguments of the model's forward (see ``alignkit.engine.forward.packed_inputs``)."""
        from alignkit.engine.forward import packed_inputs

        batch = {"input_ids": self.input_ids, "position_ids": self.position_ids,
                 "cu_seq_lens": self.cu_seq_lens}
        if self.shared_prefix_lens is not None:
            batch["shared_prefix_lens"] = self.shared_prefix_lens
        return packed_inputs(batch)

    def unflatten(self, values: torch.Tensor) -> torch.Tensor:
        """``[K]`` per response token -> ``[B, R]``, 0 on padding (gradients flow to ``values``)."""
        return values.new_zeros(self.response_mask.shape).masked_scatter(self.response_mask, values)


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and then outside the top-p nucleus to ``-inf``. ``[..., V]``.

    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept).
    top-p (Holtzman et al. 2020, nucleus sampling) keeps the smallest set of most probable tokens
    whose mass under ``softmax(logits)`` reaches ``top_p``: a token is kept when the mass strictly
    before it, in descending order, is < ``top_p``; the most probable token is always kept.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply, multiplier 0x45D9F3B) of ``x`` int64
    in [0, 2**32): every product stays below 2**63, so no step relies on integer overflow, and
    it runs the same on any device and inside a compiled graph."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """The ``[n, 1]`` fp64 uniforms in [0, 1) of sampling step ``step`` for rows with per-row
    seeds ``seeds`` (``[n]`` int64 in [0, 2**63)): a counter-based draw, a hash of (seed, step)
    with 53 random bits, so a row's stream depends on nothing but its own seed. Which rows share
    its batch, the batch size, the worker or the device that samples it change nothing (what a
    generator shared by the batch cannot give: its draws depend on the row's place in the batch).
    """
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    key = _mix32(_mix32(lo ^ 0x2545F491) ^ hi)
    counter = _mix32(torch.tensor((step * 0x9E3779B9 + 0x7F4A7C15) & _M32, device=seeds.device))
    a = _mix32(key ^ counter)
    b = _mix32(a ^ 0x68E31DA4)
    return ((a << 21) + (b >> 11)).double().mul_(2.0 ** -53).unsqueeze(-1)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on a Python int."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """The seeds, in [0, 2**63), of rows ``start .. start + n - 1`` of a call seeded with
    ``seed``: row ``i``'s seed depends only on (``seed``, ``i``), so any split of the rows (into
    chunks, workers, engines) draws each row as the whole call would."""
    base = _splitmix64(seed & _M64)
    return [_splitmix64((base + i) & _M64) >> 1 for i in range(start, start + n)]


def seeds_from(generator: torch.Generator | None, n: int) -> list[int]:
    """``n`` row seeds from one draw of ``generator`` (fresh randomness when None): a stage that
    checkpoints its generator resumes with the same seeds."""
    return row_seeds(base_seed(generator), n)


def base_seed(generator: torch.Generator | None) -> int:
    """One draw of ``generator``: the seed of a call's rows (:func:`row_seeds`)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at quantile ``u`` ``[B, 1]`` of each row of ``probs`` ``[B, V]`` (rows need not
    be normalised): with ``u`` uniform on [0, 1), exact in distribution like
    ``torch.multinomial(probs, 1)``, but one uniform per row instead of one exponential per
    vocabulary entry (~20x faster on CPU at V = 1024), drawn by the caller from its generator.

    The CDF is accumulated in fp64 so that a token's probability is not lost in fp32 rounding of
    a running sum near 1; a zero-probability token is never drawn (its CDF step is exactly zero).
    The index is the count of CDF entries <= ``u * total`` (``searchsorted(..., right=True)``),
    written as a comparison and a sum so that a compiled decode step fuses it. ``u * total`` can
    round up to ``total`` itself (probability ~2**-53), where that count would pass the last token
    with mass: the index is capped at that token's, the count of entries < ``total`` (the quantile
    function's value at 1), in the same pass and with no host sync.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    return torch.minimum((cdf <= u * total).sum(-1), (cdf < total).sum(-1))


def _draw(logits: torch.Tensor, cfg: DrawSettings,
          u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from ``[B, V]`` logits at the uniforms ``u`` ``[B, 1]`` (unused when
    greedy); return ``(tokens [B], logps [B] fp32)``. A pure function, so that a compiled decode
    step runs it inside its graph (the generator stays outside: ``_generate_chunk`` draws ``u``)."""
    z = logits.float()
    if cfg.greedy:
        tokens = z.argmax(-1)  # first maximum on ties, as model.generate
    else:
        if cfg.temperature != 1.0:
            z = z / cfg.temperature
        if 0 < cfg.top_k < z.size(-1) or cfg.top_p < 1.0:
            tokens = invert_cdf(torch.softmax(filter_logits(z, cfg.top_k, cfg.top_p), dim=-1), u)
        else:
            # Unfiltered: one exp over the vocabulary serves the draw (invert_cdf takes
            # unnormalised rows) and the log-normaliser, log sum exp(z - max) + max.
            top = z.amax(-1, keepdim=True)
            weights = torch.exp(z - top)
            tokens = invert_cdf(weights, u)
            log_norm = top.squeeze(-1) + weights.sum(-1).log()
            return tokens, z.gather(-1, tokens[:, None]).squeeze(-1) - log_norm
    # Unfiltered distribution on purpose: see the module docstring.
    logps = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return tokens, logps


# ----------------------------------------------------------------------------- KV cache


@functools.cache
def _preallocated_layer_class():
    """``DynamicLayer`` that writes into a buffer sized for the whole rollout.

    ``DynamicLayer.update`` does ``torch.cat([cache, new])`` each step, re-copying the whole cache
    (O(T) per step, ~40% of a decode step on a small model). Built once (transformers is imported
    lazily), so that a compiled decode step sees one class and does not recompile per call.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int = 0):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self.key_buffer = key_states.new_empty(b, h, self.capacity, d)
            self.value_buffer = value_states.new_empty(b, value_states.size(1), self.capacity,
                                                       value_states.size(-1))
            self.is_initialized = True

        def _views(self):
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]
            return self.keys, self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.size(-2)
            if end > self.key_buffer.size(2):  # not reached from generate(); grow as DynamicLayer would
                def grow(buf):
                    return torch.cat([buf, buf.new_empty(*buf.shape[:2], end - buf.size(2), buf.size(-1))], 2)
                self.key_buffer, self.value_buffer = grow(self.key_buffer), grow(self.value_buffer)
            self.key_buffer[:, :, self.length:end] = key_states
            self.value_buffer[:, :, self.length:end] = value_states
            self.length = end
            return self._views()

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self.key_buffer = self.key_buffer[indices]
                self.value_buffer = self.value_buffer[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop() takes a negative number of tokens to remove")
            self.length = max(self.length + tokens_to_remove, 0)
            if self.is_initialized:
                self._views()

    return DynamicLayer, PreallocatedLayer


def _preallocated_cache(model, capacity: int):
    """The model's ``DynamicCache`` with every plain full-attention layer preallocated to ``capacity``
    tokens, and every sliding-window layer whose window holds all ``capacity`` tokens (it never
    drops one, so it attends as a full layer: e.g. Mistral's 4,096-token window); other special
    layers, and shorter windows, stay as the model's config asks."""
    from transformers import DynamicCache

    dynamic_layer, preallocated_layer = _preallocated_layer_class()
    cache = DynamicCache(config=model.config)

    def full_here(layer) -> bool:
        return type(layer) is dynamic_layer or (
            type(layer).__name__ == "DynamicSlidingWindowLayer"
            and getattr(layer, "sliding_window", 0) >= capacity)

    cache.layers = [preallocated_layer(capacity) if full_here(layer) else layer for layer in cache.layers]
    if not cache.layers:  # layers are created lazily: replicate ours instead
        cache.layer_class_to_replicate = functools.partial(preallocated_layer, capacity)
    return cache


def _decode_and_draw(model, cfg: DrawSettings, u: torch.Tensor | None, **kwargs):
    """One decode step: the model's forward on the last tokens, then ``_draw`` at ``u``."""
    return _draw(model(**kwargs).logits[:, -1], cfg, u)


@functools.cache
def _compiled_decode_and_draw(device_type: str):
    # The draw inside the graph: softmax, CDF and log-probs fuse with the LM head's output instead
    # of running as ~15 eager ops per step. dynamic=True: one graph serves every batch size (rows
    # are dropped as they finish) and every cache length; dynamo re-traces per model object
    # (guards on its identity) and per sampling config.
    return torch.compile(_decode_and_draw, dynamic=True, options=compile_options(device_type))


# The first reason torch.compile failed in this process (no working C++ compiler, a compiler bug
# for this model), once it has: later rollouts decode eagerly instead of failing the same way.
_compile_failure: list[str] = []


def _decode_step(model, cache, cfg: DrawSettings, compile_decode: bool, fast_decode: bool):
    """``step(tokens [b], position_ids [b, 1], attention_mask [b, L + 1], u) -> (tokens, logps)``:
    the decoder's step where :mod:`alignkit.engine.decoders` has one (and ``fast_decode``), else the
    model's forward on the last tokens; through ``torch.compile`` if ``compile_decode``."""
    compile_decode = compile_decode and not _compile_failure
    fast = (decoder_for(model, cache, compile=compile_decode, then=lambda logits, u: _draw(logits, cfg, u))
            if fast_decode else None)
    if fast is not None:
        return fast
    decode = _compiled_decode_and_draw(_model_device(model).type) if compile_decode else _decode_and_draw
    cache_name, _ = _forward_names(model)

    def step(tokens, position_ids, attention_mask, u):
        return decode(model, cfg, u, input_ids=tokens[:, None], attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=True, **{cache_name: cache})

    return step


def _eager_after(error: Exception, cache, length: int):
    """Record that compiling a decode step failed (``error``) and warn once; crop what a graph that
    ran before the failing one appended to ``cache`` back to ``length`` tokens per layer."""
    cause = getattr(error, "inner_exception", None) or error  # what the compiler raised
    reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    if not _compile_failure:
        warnings.warn(f"sampling.compile: torch.compile failed ({reason}); decoding without it "
                      "for the rest of this process (the same samples, more slowly)", RuntimeWarning,
                      stacklevel=3)
    _compile_failure.append(reason)
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def _forward_names(model) -> tuple[str, bool]:
    """The KV-cache keyword of this model's forward (``past_key_values`` was renamed ``cache`` in
    transformers 5.x) and whether it takes ``logits_to_keep`` (skips the LM head where unread)."""
    params = forward_parameters(model)
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


# ----------------------------------------------------------------------------- generation


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _left_pad(prompt_ids, prompt_mask, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return left-padded ``(ids, mask)`` ``[B, P]`` on ``device``, P = the longest prompt.

    Lists are padded by length (never by token identity, so a prompt may contain the pad id).
    A tensor without a mask is taken as unpadded; a tensor whose mask is not left-padded (e.g.
    right-padded) is re-packed.
    """
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.to(device=device, dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(ids.shape)}")
        mask = (torch.ones_like(ids) if prompt_mask is None
                else prompt_mask.to(device=device, dtype=torch.long))
        if mask.shape != ids.shape:
            raise ValueError(f"prompt_mask shape {tuple(mask.shape)} != prompt_ids shape {tuple(ids.shape)}")
        if ids.size(0) == 0:
            raise ValueError("no prompts given")
        if (mask.sum(-1) == 0).any():
            raise ValueError("every prompt needs at least one token (e.g. BOS); got an empty row")
        if bool((mask[:, 1:] >= mask[:, :-1]).all()):
            return ids, mask
        rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    else:
        if prompt_mask is not None:
            raise ValueError("prompt_mask is only accepted with a tensor of prompt_ids")
        rows = [[int(t) for t in r] for r in prompt_ids]
        if not rows:
            raise ValueError("no prompts given")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token (e.g. BOS); got an empty prompt")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _distinct_rows(ids: torch.Tensor, mask: torch.Tensor):
    """``(first, copies)`` where rows repeat (GRPO/RLOO sample each prompt ``k`` times): the first
    row of each distinct prompt, and for every row the index of its prompt in ``first``; ``(None,
    None)`` when every row is distinct."""
    distinct, copies = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    if distinct.size(0) == ids.size(0):
        return None, None
    rows = torch.arange(ids.size(0), device=ids.device)
    first = torch.full((distinct.size(0),), ids.size(0), device=ids.device).scatter_reduce(
        0, copies, rows, "amin")
    return first, copies


def _generate_chunk(model, ids, mask, cfg: DrawSettings, eos_token_id: int, pad_token_id: int,
                    seeds: torch.Tensor, compile_decode: bool, fast_decode: bool) -> tuple[torch.Tensor, ...]:
    """Sample up to ``cfg.max_new_tokens`` for one left-padded chunk.

    Returns ``(tokens, mask, logps, finished)`` shaped ``[b, r]``, ``[b, r]``, ``[b, r]``, ``[b]``.
    Rows that finished are dropped from the active batch (and its KV cache) once they are half of
    it, so a long tail of a few unfinished rows does not pay for the whole batch.
    """
    lead = int((mask.sum(0) == 0).sum())  # columns that are padding in every row of this chunk
    ids, mask = ids[:, lead:], mask[:, lead:]
    batch, prompt_len = ids.shape
    steps = cfg.max_new_tokens
    device = ids.device
    cache_name, has_logits_to_keep = _forward_names(model)
    cache = _preallocated_cache(model, prompt_len + steps)

    tokens_out = torch.full((batch, steps), pad_token_id, dtype=torch.long, device=device)
    logps_out = torch.zeros((batch, steps), dtype=torch.float32, device=device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    next_pos = position_ids[:, -1:] + 1                      # [b, 1] position of the first new token
    # Attention mask for the whole rollout, allocated once; each step passes a prefix view.
    attn = torch.cat([mask, mask.new_ones(batch, steps)], dim=1)

    keep_last = {"logits_to_keep": 1} if has_logits_to_keep else {}
    first, copies = _distinct_rows(ids, mask)
    if first is None:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **{cache_name: cache}, **keep_last)
        last_logits = out.logits[:, -1]
    else:  # one prefill per distinct prompt, its cache and logits copied to each of its rows
        out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=position_ids[first],
                    use_cache=True, **{cache_name: cache}, **keep_last)
        cache.batch_select_indices(copies)
        last_logits = out.logits[copies, -1]
    # The uniforms are drawn here, one [b, 1] draw per step from the rows' own seeds, whether the
    # draw then runs eagerly or in a compiled graph: the same seeds give the same stream either way.
    seeds = seeds.to(device)

    def draw(rows, t):
        return None if cfg.greedy else row_uniforms(seeds[rows], t)

    tok, lp = _draw(last_logits, cfg, draw(slice(None), 0))
    step = _decode_step(model, cache, cfg, compile_decode, fast_decode)

    rows = torch.arange(batch, device=device)                # original row of each active row
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    n_steps = 0
    for t in range(steps):
        # Finished rows not yet compacted away keep running; what they draw is recorded as pad.
        tokens_out[rows, t] = tok.masked_fill(~alive, pad_token_id)
        logps_out[rows, t] = lp.masked_fill(~alive, 0.0)
        alive = alive & (tok != eos_token_id)
        n_steps = t + 1
        if t == steps - 1:
            break
        n_alive = int(alive.sum())                           # the one host sync per step
        if n_alive == 0:
            break
        if 2 * n_alive <= rows.numel():
            keep = alive.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tok, attn, next_pos, alive = rows[keep], tok[keep], attn[keep], next_pos[keep], alive[keep]
        inputs = (tok, next_pos + t, attn[:, :prompt_len + t + 1], draw(rows, t + 1))
        try:
            tok, lp = step(*inputs)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # compiling failed: go on eagerly
            if not compile_decode:
                raise
            _eager_after(error, cache, prompt_len + t)
            step = _decode_step(model, cache, cfg, False, fast_decode)
            tok, lp = step(*inputs)

    tokens_out = tokens_out[:, :n_steps]
    is_eos = (tokens_out == eos_token_id).long()
    # 1 up to and including the first EOS: by position, not token identity, so pad == EOS is safe.
    response_mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()
    return tokens_out, response_mask, logps_out[:, :n_steps], is_eos.any(-1)


def generate(model, prompt_ids: list[list[int]] | torch.LongTensor, cfg: DrawSettings, *,
             eos_token_id: int, pad_token_id: int, seeds: list[int] | None = None,
             generator: torch.Generator | None = None, prompt_mask: torch.Tensor | None = None, batch_size: int | None = None,
             compile_decode: bool = False, fast_decode: bool = True) -> Rollout:
    """Sample one response per prompt with a KV cache; see :class:`Rollout` for what comes back.

    ``prompt_ids``: a list of token-id lists (any lengths) or a ``[B, P]`` tensor with an optional
    ``prompt_mask`` (left-padded; a right-padded mask is re-packed). ``seeds``: one per prompt
    (:func:`row_seeds`); row ``i`` draws from its own counter-based stream (:func:`row_uniforms`),
    so its sample depends on its prompt, its seed and the model only. Without ``seeds`` they come
    from one draw of ``generator`` (:func:`seeds_from`; fresh randomness when it is None too). ``batch_size`` bounds memory by generating
    that many prompts at a time. Runs without autograd; the model's train/eval mode is left as it
    is (call ``model.eval()`` first to switch dropout off).

    ``fast_decode=False`` decodes every token through the model's forward even where
    :func:`alignkit.engine.decoders.decoder_for` has a step for it (the reference the step is tested against).

    ``compile_decode=True`` (or ``cfg.compile``) runs the one-token decode step (the decoder's step,
    else the model's forward and the draw) through ``torch.compile`` (the prefill stays eager). Off
    by default: the first call per model pays the compilation (~15-50 s for a small model on a
    2-core CPU), and a changed model structure re-traces (a LoRA policy recompiles once when its
    adapters are first toggled); it pays off in long RL loops that sample thousands of batches
    from one policy. Where compiling fails (no working C++ compiler, a compiler bug) it warns once
    and the process decodes without it from then on: the same samples, more slowly.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("generate() supports decoder-only causal LMs")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = _model_device(model)
    ids, mask = _left_pad(prompt_ids, prompt_mask, pad_token_id, device)
    if seeds is None:  # greedy draws nothing: it consumes no randomness
        seeds = [0] * ids.size(0) if cfg.greedy else seeds_from(generator, ids.size(0))
    if len(seeds) != ids.size(0):
        raise ValueError(f"{len(seeds)} seeds for {ids.size(0)} prompts: give one seed per prompt")
    row_seed = torch.as_tensor(seeds, dtype=torch.long)
    step = batch_size or ids.size(0)
    # inference_mode skips autograd bookkeeping on every op (~10% of a small-model step); its
    # tensors cannot enter a later autograd graph, so the outputs are rebuilt outside it (cat/pad).
    # A progress bar (plain lines off a terminal) where sampling runs long, on the main process.
    with torch.inference_mode(), Progress(ids.size(0), "sampling", "rows",
                                          delay=SAMPLING_QUIET_S) as progress:
        chunks = []
        for i in range(0, ids.size(0), step):
            chunks.append(_generate_chunk(model, ids[i:i + step], mask[i:i + step], cfg,
                                          eos_token_id, pad_token_id, row_seed[i:i + step],
                                          compile_decode or cfg.compile, fast_decode))
            progress.update(min(step, ids.size(0) - i))
    width = max(c[0].size(1) for c in chunks)

    def cat(j, value):
        return torch.cat([torch.nn.functional.pad(c[j], (0, width - c[j].size(1)), value=value)
                          for c in chunks])

    return Rollout(prompt_ids=ids, prompt_mask=mask, response_ids=cat(0, pad_token_id),
                   response_mask=cat(1, 0), logps=cat(2, 0.0),
                   finished=torch.cat([c[3] for c in chunks]))


def rollout_logps(model, rollout: Rollout, temperature: float = 1.0,
                  pack: bool | str = False) -> torch.Tensor:
    """``[B, R]`` fp32 log-probs of the response tokens under one training forward, 0 on padding.

    Same ``logits / temperature`` scaling as :func:`generate` (``temperature == 0``, greedy, means
    1) and the same position ids (``cumsum(mask) - 1``), so under the policy that sampled the
    rollout this equals ``rollout.logps`` up to float error. Gradients flow (no ``no_grad`` here):
    this is the ``new_logps`` of a PPO ratio.

    ``pack=True`` runs the forward on the real tokens only (:attr:`Rollout.packed`), for a model
    whose attention keeps to each sequence of a flat row (``alignkit.engine.attention.flat_packing`` and
    ``alignkit.engine.forward.supports_packing(model, "flat")``; the caller checks): the same values
    within float error, without the padding's compute. ``pack="shared"`` also writes each prompt
    once for the rows sampled from it (:attr:`Rollout.packed_shared`; the caller checks
    ``supports_packing(model, "shared")``).
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _, has_logits_to_keep = _forward_names(model)
    if pack:
        packed = rollout.packing(pack)
        keep = {"logits_to_keep": packed.targets} if has_logits_to_keep else {}
        logits = model(**packed.inputs(), **keep).logits[0]
        if not has_logits_to_keep:
            logits = logits[packed.targets]
        if temperature not in (0, 1):
            logits = logits.float() / temperature
        return packed.unflatten(token_logps(logits, packed.labels))
    input_ids, attention_mask = rollout.sequences()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    resp_len = rollout.response_ids.size(1)
    # Only logits that predict response tokens are needed: positions P-1 .. P+R-2.
    keep = {"logits_to_keep": resp_len + 1} if has_logits_to_keep else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, **keep)
    logits = out.logits
    if logits.size(1) != resp_len + 1:  # no logits_to_keep (else no slice: its backward
        logits = logits[:, -(resp_len + 1):]  # would copy the gradient into a tensor of zeros)
    if temperature not in (0, 1):
        logits = logits.float() / temperature
    labels = rollout.response_ids.masked_fill(rollout.response_mask == 0, IGNORE_INDEX)
    # Position P-1+j predicts response token j; the last position predicts nothing.
    ignore_last = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return token_logps(logits, torch.cat([labels, ignore_last], dim=1))[:, :-1]
