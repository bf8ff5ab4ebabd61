"""One-token decode steps for known architectures, written against the model's own weights.

A decode step of a small model is per-op overhead more than arithmetic: the Hugging Face forward
builds masks, cache bookkeeping and ~20 module calls per layer for one token per row, and PyTorch's
fused attention kernel is tuned for long queries (on CPU, ~0.3 ms per layer for one query row). A
step here is the same arithmetic as the model's forward, as plain tensor ops on its parameters (no
copies: a step always sees the current weights), attention as two batched matmuls over the KV
cache that the model's own prefill wrote.

:func:`decoder_for` returns a step for the Hugging Face classes it knows (Llama, Mistral and Qwen2,
GPT-2; a sliding window only where it holds the whole rollout, so that it drops nothing), under a
PEFT wrapper whose adapters replace layers (LoRA and its kin) or bare; a projection, embedding or
norm that is not the plain class (an adapter-wrapped or quantised layer) is called as a module, so
its own forward applies. Anything else returns ``None`` and decodes through the model's forward:
other architectures, prompt-learning adapters, hooks (accelerate's device maps), dropout in
training mode, shorter sliding windows, options the step does not implement. Parity with the
model's forward is tested per architecture (``tests/engine/test_decoders.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from alignkit.engine.forward import adapter_base

Step = Callable[..., torch.Tensor]  # (tokens, position_ids, attention_mask, *extra) -> logits


def decoder_for(model, cache, compile: bool = False, then: Callable | None = None) -> Step | None:
    """A decode step ``step(tokens [b], position_ids [b, 1], attention_mask [b, L + 1]) -> logits
    [b, V]`` that appends one token per row to ``cache`` (a preallocated cache holding ``L`` tokens,
    see ``generation._preallocated_cache``), or ``None`` when ``model`` is not one it implements.

    ``then(logits, *extra)``: applied to the logits inside the step, which then takes and passes on
    the extra arguments, ``step(tokens, position_ids, attention_mask, *extra) -> then(logits,
    *extra)`` (generation's draw, so that a compiled step fuses it with the LM head's output).

    ``compile``: the step's body through ``torch.compile`` with dynamic shapes (one graph for every
    batch size and cache length; dynamo re-traces per model object; :func:`compile_options`). On
    the 2-core CPU of bench/README.md: 0.33 s against 0.42 s eager for 32 x 64 tokens of the demo
    model, after a first call of ~50 s."""
    model = adapter_base(model)
    build = _BUILDERS.get(type(model).__name__) if model is not None else None
    if build is None or not _plain(model) or not _cache_is_preallocated(cache):
        return None
    cfg = model.config
    if model.training and any(getattr(cfg, k, 0) for k in _DROPOUT_KEYS):
        return None  # the step applies no dropout
    body = build(model, cache)
    if body is None:
        return None
    if then is not None:
        body = _then(body, then)
    if compile:
        device = next(model.parameters()).device
        body = torch.compile(body, dynamic=True, options=compile_options(device))
    return _advancing(body, cache.layers)


def compile_options(device) -> dict:
    """inductor's options for a decode step on ``device``. On the CPU the compiled graph's wrapper
    is generated as C++ (``cpp_wrapper``) instead of Python: its per-call size checks, views and
    allocations cost ~9% of a demo-model decode step (32 x 64 tokens: 0.306 s against 0.334 s,
    the same samples), for a slower first compilation (~45 s against ~25 s on 2 cores)."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" else {}


def _then(body: Step, then: Callable) -> Step:
    def step(tokens, position_ids, attention_mask, *extra):
        return then(body(tokens, position_ids, attention_mask), *extra)

    return step


# Config fields of dropout applied functionally (not only through nn.Dropout modules).
_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def _records_outputs_only(hook) -> bool:
    """transformers' output-capturing hook: installed for good on a model's layers by its first
    forward with ``output_hidden_states`` or ``output_attentions`` (e.g. the packing probe), it
    records only while such a forward runs, which decoding never asks for."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def _plain(model) -> bool:
    """No hooks (the step would bypass them) and no active dropout (the step applies none)."""
    for module in model.modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if hasattr(module, "_hf_hook") or not all(map(_records_outputs_only, hooks)):
            return False
        if model.training and isinstance(module, torch.nn.Dropout) and module.p > 0:
            return False
    return True


def _cache_is_preallocated(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, "key_buffer") for layer in layers)


def _append(layer, key: torch.Tensor, value: torch.Tensor, end: int):
    """Write one token's ``[b, h, d]`` key/value at column ``end`` of the layer's buffers; return
    the ``[b, h, end + 1, d]`` views of everything cached (no copy). The layer's length is
    advanced by :func:`_advancing`, outside the step body, so that a compiled body reads the cache
    length from the mask's width (a dynamic dimension) instead of specialising on a Python int."""
    layer.key_buffer.narrow(2, end, 1).copy_(key.unsqueeze(2))
    layer.value_buffer.narrow(2, end, 1).copy_(value.unsqueeze(2))
    return layer.key_buffer[:, :, :end + 1], layer.value_buffer[:, :, :end + 1]


def _advancing(body: Step, cache_layers) -> Step:
    """``body`` with the capacity check and the layers' lengths kept as the cache's own update does."""
    def step(tokens, position_ids, attention_mask, *extra):
        end = attention_mask.size(1) - 1
        if any(layer.length != end for layer in cache_layers):
            raise ValueError(f"attention_mask covers {end + 1} tokens; the cache holds "
                             f"{cache_layers[0].length} + the new one")
        if end >= cache_layers[0].key_buffer.size(2):
            raise RuntimeError(f"KV cache full ({end} tokens); allocate more capacity")
        out = body(tokens, position_ids, attention_mask, *extra)
        for layer in cache_layers:
            layer.length = end + 1
            layer._views()
        return out

    return step


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """Attention of one query per row: ``query`` ``[b, hq, d]``, ``keys``/``values``
    ``[b, hkv, T, d]`` (``hq`` a multiple of ``hkv``: grouped-query heads share a key/value head,
    Ainslie et al. 2023), ``bias`` ``[b * hkv, hq / hkv, T]`` (0 or -inf, see :func:`_mask_bias`).
    Scores in the model's dtype and softmax in fp32, as the models' eager attention. Returns
    ``[b, hq * d]``."""
    b, hq, d = query.shape
    hkv, length = keys.size(1), keys.size(2)
    q = query.reshape(b * hkv, hq // hkv, d)
    # The cache views merge (b, hkv) without a copy: the buffer's batch stride is hkv head strides.
    scores = torch.baddbmm(bias, q, keys.reshape(b * hkv, length, d).transpose(1, 2), alpha=scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(probs, values.reshape(b * hkv, length, d)).view(b, hq * d)


def _mask_bias(attention_mask: torch.Tensor, heads: int, group: int, dtype) -> torch.Tensor:
    """``[b, T]`` 1/0 mask -> ``[b * heads, group, T]`` additive bias in ``dtype`` (0 where
    attended, -inf on padding), built once per step and shared by every layer."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias.masked_fill_(attention_mask == 0, float("-inf"))
    b, length = attention_mask.shape
    return bias[:, None, None, :].expand(b, heads, group, length).reshape(b * heads, group, length)


def _linear(x: torch.Tensor, layer) -> torch.Tensor:
    if type(layer) is torch.nn.Linear:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)  # adapter-wrapped or quantised: its own forward


def _embed(tokens: torch.Tensor, layer) -> torch.Tensor:
    return layer.weight[tokens] if type(layer) is torch.nn.Embedding else layer(tokens)


# ----------------------------------------------------------------------------- Llama family


def _llama(model, cache) -> Step:
    """Llama, Mistral and Qwen2 (the Llama block with optional q/k/v bias): pre-norm RMSNorm,
    rotary positions (the model's own rotary module, so every RoPE scaling it supports applies),
    grouped-query attention, gated MLP."""
    body = model.model
    cfg = model.config
    attn0 = body.layers[0].self_attn
    head_dim, scaling = attn0.head_dim, attn0.scaling
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = body.layers
    cache_layers = cache.layers

    def rms_norm(x, norm):
        if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
            return norm(x)
        # As the model's RMSNorm: normalised in fp32, cast back, then scaled.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def rotate(x, cos, sin_signed):
        # RoPE (Su et al. 2021, RoFormer eq. 34) in the rotate-half layout: x * cos +
        # cat(-x2, x1) * sin, written as x * cos + roll(x, half) * cat(-sin1, sin2).
        return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), sin_signed)

    def step(tokens, position_ids, attention_mask):
        x = _embed(tokens, body.embed_tokens)                      # [b, d]
        b, end = x.size(0), attention_mask.size(1) - 1
        cos, sin = body.rotary_emb(x, position_ids)                 # [b, 1, head_dim]
        half = head_dim // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        bias = _mask_bias(attention_mask, n_kv, n_q // n_kv, x.dtype)
        for layer, kv in zip(layers, cache_layers):
            a = layer.self_attn
            h = rms_norm(x, layer.input_layernorm)
            q = _linear(h, a.q_proj).view(b, n_q, head_dim)
            k = _linear(h, a.k_proj).view(b, n_kv, head_dim)
            v = _linear(h, a.v_proj).view(b, n_kv, head_dim)
            keys, values = _append(kv, rotate(k, cos, sin_signed), v, end)
            x = x + _linear(_attend(rotate(q, cos, sin_signed), keys, values, bias, scaling), a.o_proj)
            h = rms_norm(x, layer.post_attention_layernorm)
            m = layer.mlp
            x = x + _linear(m.act_fn(_linear(h, m.gate_proj)) * _linear(h, m.up_proj), m.down_proj)
        return _linear(rms_norm(x, body.norm), model.lm_head)

    return step


# ----------------------------------------------------------------------------- GPT-2


def _gpt2(model, cache) -> Step | None:
    """GPT-2: learned absolute positions, pre-norm LayerNorm, fused q/k/v (``Conv1D``: ``x @ W + b``),
    multi-head attention, the config's activation in the MLP."""
    body = model.transformer
    cfg = model.config
    if cfg.reorder_and_upcast_attn or getattr(cfg, "add_cross_attention", False):
        return None
    n_head = cfg.n_head
    head_dim = cfg.n_embd // n_head
    blocks = body.h
    cache_layers = cache.layers

    def conv1d(x, layer):  # transformers' Conv1D: x @ W + b, W stored [in, out]
        if type(layer).__name__ != "Conv1D":
            return layer(x)
        return torch.addmm(layer.bias, x, layer.weight)

    def layer_norm(x, norm):
        if type(norm) is not torch.nn.LayerNorm:
            return norm(x)
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def step(tokens, position_ids, attention_mask):
        x = _embed(tokens, body.wte) + _embed(position_ids[:, 0], body.wpe)   # [b, d]
        b, end = x.size(0), attention_mask.size(1) - 1
        bias = _mask_bias(attention_mask, n_head, 1, x.dtype)
        for block, kv in zip(blocks, cache_layers):
            a = block.attn
            q, k, v = conv1d(layer_norm(x, block.ln_1), a.c_attn).view(b, 3, n_head, head_dim).unbind(1)
            keys, values = _append(kv, k, v, end)
            x = x + conv1d(_attend(q, keys, values, bias, a.scaling), a.c_proj)
            h = layer_norm(x, block.ln_2)
            x = x + conv1d(block.mlp.act(conv1d(h, block.mlp.c_fc)), block.mlp.c_proj)
        return _linear(layer_norm(x, body.ln_f), model.lm_head)

    return step


_BUILDERS = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _llama,
    "GPT2LMHeadModel": _gpt2,
}
