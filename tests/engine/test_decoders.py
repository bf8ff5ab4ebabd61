"""Tests for alignkit.engine.decoders: each architecture's decode step against the model's own forward
(logits step by step over a left-padded batch, then whole samples through ``generate``), and the
models it must refuse."""

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from alignkit.engine.decoders import decoder_for
from alignkit.engine.generation import _preallocated_cache, generate
from alignkit.engine.sampling import SamplingConfig

V, PAD, BOS, EOS = 48, 0, 1, 2
IDS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def _llama():  # grouped-query heads, biases on every projection, scaled RoPE
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False, **IDS))


def _mistral():
    return MistralForCausalLM(MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2, sliding_window=None,
        **IDS))


def _qwen2():  # biases on q/k/v only
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, **IDS))


def _gpt2():  # tied head, attention scaled by the inverse layer index as well
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
        scale_attn_by_inverse_layer_idx=True, activation_function="gelu_new", **IDS))


MODELS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2}
# The parity tests also run on the GPU where there is one (fp32: TF32 is off by default).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(name, device="cpu"):
    torch.manual_seed(0)
    return MODELS[name]().eval().to(device)


def _left_padded(lengths=(5, 1, 7, 3), device="cpu"):
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(EOS + 1, V, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)


def _assert_step_matches_forward(model, steps=6):
    """Prefill a left-padded batch, then decode ``steps`` random tokens through the decoder's step
    and through the model's forward: the same logits and the same cached keys/values each step."""
    device = next(model.parameters()).device
    ids, mask = _left_padded(device=device)
    b, width = ids.shape
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    fast_cache, ref_cache = _preallocated_cache(model, width + steps), _preallocated_cache(model, width + steps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for cache in (fast_cache, ref_cache):
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache)
        step = decoder_for(model, fast_cache)
        assert step is not None
        attn, pos = mask, position_ids[:, -1:]
        for _ in range(steps):
            tokens = torch.randint(EOS + 1, V, (b,), generator=g).to(device)
            attn, pos = torch.cat([attn, attn.new_ones(b, 1)], 1), pos + 1
            ref = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=pos,
                        past_key_values=ref_cache).logits[:, -1]
            fast = step(tokens, pos, attn)
            assert fast.shape == (b, V)
            torch.testing.assert_close(fast, ref, rtol=0, atol=2e-5)
            for a, r in zip(fast_cache.layers, ref_cache.layers):
                assert a.length == r.length
                torch.testing.assert_close(a.keys, r.keys, rtol=0, atol=2e-5)
                torch.testing.assert_close(a.values, r.values, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_decode_step_logits_equal_the_models_forward_over_a_left_padded_batch(name, device):
    _assert_step_matches_forward(_model(name, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,targets", [("llama", ["q_proj", "v_proj", "down_proj", "lm_head"]),
                                          ("gpt2", ["c_attn", "c_fc"])])
def test_decode_step_applies_lora_adapters_and_their_disabled_state(name, targets, device):
    """LoRA layers (random B, so the adapter changes every output) are called as modules: the
    step equals the PEFT model's forward with the adapter on, and with it off (a shared-roles
    reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(_model(name), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                   init_lora_weights=False,
                                                   fan_in_fan_out=name == "gpt2")).eval().to(device)
    _assert_step_matches_forward(lora)
    with lora.disable_adapter():
        _assert_step_matches_forward(lora)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_generate_draws_the_same_tokens_and_logps_with_and_without_the_decode_step(name, device):
    model = _model(name, device)
    with torch.no_grad():  # make EOS likely so rows finish at different steps and are dropped
        model.lm_head.weight[EOS] += 0.6 * model.lm_head.weight.abs().mean()
    prompts = [[BOS] + [3 + (i * 7 + j) % (V - 3) for j in range(n)] for i, n in enumerate((4, 0, 9, 2, 6, 3))]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.9)
    outs = [generate(model, prompts, cfg, eos_token_id=EOS, pad_token_id=PAD,
                     generator=torch.Generator(device).manual_seed(6), fast_decode=fast) for fast in (True, False)]
    fast, ref = outs
    assert torch.equal(fast.response_ids, ref.response_ids)
    assert torch.equal(fast.response_mask, ref.response_mask)
    torch.testing.assert_close(fast.logps, ref.logps, rtol=0, atol=1e-5)
    lengths = ref.response_lengths()
    assert lengths.min() < lengths.max() == 20  # some rows stopped early, some ran to the end


def test_decoder_refuses_models_it_would_get_wrong():
    ids, mask = _left_padded()

    def step_for(model):
        cache = _preallocated_cache(model, ids.size(1) + 2)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        return decoder_for(model, cache)

    model = _model("gpt2")
    assert step_for(model) is not None
    assert step_for(model.train()) is None            # dropout active (GPT-2's default 0.1)
    model.eval()
    handle = model.transformer.h[0].register_forward_hook(lambda *a: None)
    assert step_for(model) is None                    # hooks would be bypassed
    handle.remove()
    # transformers' own output-capturing hooks, left on the layers by a forward that asked for
    # hidden states (SFT's packing probe does), record nothing while decoding: not a refusal.
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules())
    assert step_for(model) is not None
    _assert_step_matches_forward(model)

    from peft import PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=2))
    assert step_for(prompt_tuned) is None            # virtual tokens change the inputs

    # A cache the step cannot extend in place (the model's own DynamicCache).
    from transformers import DynamicCache
    model = _model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert decoder_for(model, cache) is None


def test_a_sliding_window_shorter_than_the_rollout_decodes_through_the_forward_and_a_longer_one_not():
    """A window shorter than prompt + new tokens drops keys: no step (the forward's sliding cache).
    A window that holds them all attends as a full layer: the cache is preallocated and the step
    equals the forward on the model's own (sliding-window) cache."""
    from transformers import DynamicCache

    ids, mask = _left_padded()
    b, width = ids.shape
    steps = 3
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    for window, stepped in ((4, False), (width + steps, True)):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.2, sliding_window=window, **IDS)).eval()
        cache, own = _preallocated_cache(model, width + steps), DynamicCache(config=model.config)
        with torch.no_grad():
            for c in (cache, own):
                model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=c)
            step = decoder_for(model, cache)
            assert (step is not None) == stepped
            if not stepped:
                continue
            attn, pos = mask, position_ids[:, -1:]
            for t in range(steps):
                tokens = torch.full((b,), EOS + 1 + t)
                attn, pos = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype)], 1), pos + 1
                ref = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=pos,
                            past_key_values=own).logits[:, -1]
                torch.testing.assert_close(step(tokens, pos, attn), ref, rtol=0, atol=2e-5)


def test_step_refuses_a_mask_that_does_not_match_the_cache_and_a_full_cache():
    model = _model("llama")
    ids, mask = _left_padded()
    b, width = ids.shape
    cache = _preallocated_cache(model, width + 1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        step = decoder_for(model, cache)
        tokens, pos = torch.full((b,), EOS + 1), torch.full((b, 1), width)
        with pytest.raises(ValueError, match="cache holds"):
            step(tokens, pos, torch.ones(b, width + 2, dtype=torch.long))  # one column too many
        step(tokens, pos, torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1))
        assert all(layer.length == width + 1 for layer in cache.layers)
        with pytest.raises(RuntimeError, match="KV cache full"):
            step(tokens, pos + 1, torch.cat([mask, torch.ones(b, 2, dtype=mask.dtype)], 1))
