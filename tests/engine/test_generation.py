"""Tests for alignkit.engine.generation: parity with a training forward, padding invariance, HF greedy
parity, sampling filters by hand, and EOS / padding bookkeeping."""

import math
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignkit.engine.generation import (Rollout, filter_logits, generate, invert_cdf,
                                       rollout_logps)
from alignkit.engine.sampling import SamplingConfig

V, PAD, BOS, EOS = 64, 0, 1, 5
PROMPT_LENGTHS = (3, 7, 1, 5, 9, 2, 6, 4)


def _with_eos_bias(model, bias: float):
    """Give the LM head a bias that makes EOS likely, so some rows finish early and some do not."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = bias
    model.lm_head = head
    return model


def _llama(eos_bias: float = 0.0):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return _with_eos_bias(LlamaForCausalLM(cfg), eos_bias).eval()


def _gpt2(eos_bias: float = 0.0):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return _with_eos_bias(GPT2LMHeadModel(cfg), eos_bias).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}
# Per-model EOS bias giving a mix of rows that stop early and rows that run to max_new_tokens
# (checked inside the tests that need the mix, so a change of init cannot silently void them).
EOS_BIAS = {"llama": 1.5, "gpt2": 3.0}


def _model(name, eos=True):
    return MODELS[name](eos_bias=EOS_BIAS[name] if eos else 0.0)


def _prompts(lengths=PROMPT_LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(EOS + 1, V, (n - 1,), generator=g).tolist() for n in lengths]


def _gen(model, prompts, seed=1, **cfg):
    cfg = {"max_new_tokens": 12, **cfg}
    return generate(model, prompts, SamplingConfig(**cfg), eos_token_id=EOS, pad_token_id=PAD,
                    generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logps_equal_training_forward(name, temperature, top_k, top_p):
    model = _model(name)
    r = _gen(model, _prompts(), temperature=temperature, top_k=top_k, top_p=top_p)
    lengths = r.response_lengths()
    # The case this test is about: left padding, rows finishing early, and rows running to the end.
    assert len(set(r.prompt_mask.sum(-1).tolist())) > 1
    assert r.finished.any() and not r.finished.all()
    assert lengths.min() < r.response_ids.size(1) == 12
    train_logps = rollout_logps(model, r, temperature=temperature)
    assert train_logps.shape == r.logps.shape and train_logps.dtype == torch.float32
    torch.testing.assert_close(train_logps, r.logps, rtol=0, atol=1e-5)
    # Real tokens have genuinely non-trivial log-probs; padding is exactly 0.
    assert (r.logps[r.response_mask.bool()] < -1e-3).all()
    assert (r.logps[~r.response_mask.bool()] == 0).all()


def test_logps_are_unfiltered_tempered_distribution():
    """top-p/top-k only choose the token; the recorded log-prob is under softmax(logits / T)."""
    model = _llama()
    prompts = _prompts()
    r = _gen(model, prompts, temperature=0.5, top_k=3, top_p=0.5, max_new_tokens=6)
    ids, mask = r.sequences()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    P = r.prompt_ids.size(1)
    full = torch.log_softmax(logits[:, P - 1:-1] / 0.5, -1).gather(-1, r.response_ids[..., None])[..., 0]
    torch.testing.assert_close(r.logps, full * r.response_mask, rtol=0, atol=1e-5)
    # With top_k=3 and top_p=0.5 the drawn tokens are among the 3 most likely under T=0.5.
    top3 = logits[:, P - 1:-1].topk(3, dim=-1).indices
    assert (top3 == r.response_ids[..., None]).any(-1)[r.response_mask.bool()].all()


def test_rollout_logps_carries_gradients_and_outputs_are_ordinary_tensors():
    model = _llama(eos_bias=2.0)
    r = _gen(model, _prompts())
    assert not any(t.is_inference() for t in (r.response_ids, r.response_mask, r.logps, r.finished))
    new_logps = rollout_logps(model, r)
    assert new_logps.requires_grad
    ratio = torch.exp(new_logps - r.logps)  # a PPO ratio: exactly 1 on the sampling policy
    torch.testing.assert_close(ratio[r.response_mask.bool()],
                               torch.ones(int(r.response_mask.sum())), rtol=0, atol=2e-5)
    ratio.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- 2. padding


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance_greedy(name):
    model = _model(name, eos=False)
    prompts = _prompts((2, 9, 14, 5))
    alone = _gen(model, [prompts[0]], temperature=0.0)
    batched = _gen(model, prompts, temperature=0.0)
    assert batched.prompt_mask[0].sum() == 2 and batched.prompt_mask.size(1) == 14  # 12 pads on row 0
    n = alone.response_ids.size(1)
    assert torch.equal(batched.response_ids[0, :n], alone.response_ids[0])
    torch.testing.assert_close(batched.logps[0, :n], alone.logps[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance_sampled_logps(name):
    """Same sampled tokens fed through the batch with extra padding give the same log-probs."""
    model = _model(name)
    r = _gen(model, _prompts())
    extra = 5
    padded = Rollout(prompt_ids=torch.nn.functional.pad(r.prompt_ids, (extra, 0), value=PAD),
                     prompt_mask=torch.nn.functional.pad(r.prompt_mask, (extra, 0), value=0),
                     response_ids=r.response_ids, response_mask=r.response_mask, logps=r.logps,
                     finished=r.finished)
    with torch.no_grad():
        torch.testing.assert_close(rollout_logps(model, padded), r.logps, rtol=0, atol=1e-5)


def test_tensor_prompts_right_padded_mask_is_repacked():
    model = _gpt2()
    prompts = _prompts((3, 6, 2))
    ids = torch.full((3, 6), PAD)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
        mask[i, :len(p)] = 1
    r_tensor = generate(model, ids, SamplingConfig(max_new_tokens=8, temperature=0.0),
                        eos_token_id=EOS, pad_token_id=PAD, prompt_mask=mask)
    r_list = _gen(model, prompts, temperature=0.0, max_new_tokens=8)
    assert torch.equal(r_tensor.prompt_ids, r_list.prompt_ids)
    assert torch.equal(r_tensor.prompt_mask, r_list.prompt_mask)
    assert r_list.prompt_mask[:, -1].all() and not r_list.prompt_mask[:, 0].all()  # left-padded
    assert torch.equal(r_tensor.response_ids, r_list.response_ids)


@pytest.mark.parametrize("name", MODELS)
def test_batch_size_chunks_equal_one_batch(name):
    model = _model(name)
    whole = _gen(model, _prompts(), temperature=0.0)
    chunked = generate(model, _prompts(), SamplingConfig(max_new_tokens=12, temperature=0.0),
                       eos_token_id=EOS, pad_token_id=PAD, batch_size=3)
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids)
    assert torch.equal(chunked.response_ids, whole.response_ids)
    assert torch.equal(chunked.response_mask, whole.response_mask)
    assert torch.equal(chunked.finished, whole.finished)
    torch.testing.assert_close(chunked.logps, whole.logps, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 3. HF greedy


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_hf_generate(name):
    model = _model(name)
    prompts = _prompts()
    r = _gen(model, prompts, temperature=0.0, max_new_tokens=10)
    assert r.finished.any() and not r.finished.all()
    with torch.no_grad():
        hf = model.generate(input_ids=r.prompt_ids, attention_mask=r.prompt_mask, do_sample=False,
                            max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(r.response_ids, hf[:, r.prompt_ids.size(1):])


# ----------------------------------------------------------------------------- 4. sampling


def test_same_seed_same_sample_other_seed_differs():
    model = _llama(eos_bias=1.0)
    a, b, c = (_gen(model, _prompts(), seed=s) for s in (7, 7, 8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", MODELS)
def test_a_cpu_generator_draws_the_same_sample_on_the_gpu(name):
    """The stages seed (and checkpoint) a CPU generator whatever the model's device: a model on
    the GPU draws the same tokens as on the CPU (fp32 logits equal to float error)."""
    cpu = _model(name)
    on_cpu, on_gpu = (_gen(model, _prompts()) for model in (cpu, _model(name).cuda()))
    assert on_gpu.response_ids.is_cuda
    assert torch.equal(on_gpu.response_ids.cpu(), on_cpu.response_ids)
    torch.testing.assert_close(on_gpu.logps.cpu(), on_cpu.logps, rtol=0, atol=1e-4)


def test_packed_rollout_by_hand():
    """Two rows: prompt [1, 7] (one pad before it) + response [9, 5(EOS)], and prompt [1, 8, 6] +
    response [4] then padding. The flat row holds the real tokens only, positions restart per
    row, and each response token is predicted by the flat position just before it."""
    r = Rollout(prompt_ids=torch.tensor([[0, 1, 7], [1, 8, 6]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                response_ids=torch.tensor([[9, 5], [4, 0]]), response_mask=torch.tensor([[1, 1], [1, 0]]),
                logps=torch.zeros(2, 2), finished=torch.tensor([True, False]))
    p = r.packed
    assert r.packed is p                      # built once, shared by the forwards over it
    assert p.input_ids.tolist() == [[1, 7, 9, 5, 1, 8, 6, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert p.cu_seq_lens.tolist() == [0, 4, 8]
    assert p.targets.tolist() == [1, 2, 6] and p.labels.tolist() == [9, 5, 4]
    assert torch.equal(p.unflatten(torch.tensor([0.1, 0.2, 0.3])), torch.tensor([[0.1, 0.2], [0.3, 0.0]]))


@pytest.mark.parametrize("name", MODELS)
def test_a_repeated_prompt_is_prefilled_once(name, monkeypatch):
    """GRPO/RLOO sample each prompt k times: the prefill runs once per distinct prompt (3 here,
    of 6 rows, repeats apart) and its cache is copied to the prompt's rows; the samples are those
    of a prefill over every row."""
    from alignkit.engine import generation

    model = _model(name)
    base = _prompts((3, 7, 5))
    prompts = [base[0], base[1], base[0], base[2], base[1], base[0]]
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].size(0)),
                                           with_kwargs=True)
    once = _gen(model, prompts, max_new_tokens=10)
    hook.remove()
    assert rows_seen[0] == 3
    monkeypatch.setattr(generation, "_distinct_rows", lambda ids, mask: (None, None))
    every = _gen(model, prompts, max_new_tokens=10)
    assert torch.equal(once.response_ids, every.response_ids)
    torch.testing.assert_close(once.logps, every.logps, rtol=0, atol=1e-5)
    assert not torch.equal(once.response_ids[0], once.response_ids[2])   # rows draw on their own


def test_shared_prompts_packed_by_hand():
    """Rows 0 and 2 sampled from the same prompt [1, 7]: row 2's segment follows row 0's and holds
    its response only, positions continuing from 2, attending to the 2 prompt tokens before it;
    its first token is predicted at row 0's last prompt token. Row 1 (prompt [1, 8, 6]) whole."""
    r = Rollout(prompt_ids=torch.tensor([[0, 1, 7], [1, 8, 6], [0, 1, 7]]),
                prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]]),
                response_ids=torch.tensor([[9, 5], [4, 0], [3, 2]]),
                response_mask=torch.tensor([[1, 1], [1, 0], [1, 1]]),
                logps=torch.zeros(3, 2), finished=torch.tensor([True, False, False]))
    p = r.packed_shared
    assert r.packing("shared") is p and r.packing(True) is r.packed
    assert p.input_ids.tolist() == [[1, 7, 9, 5, 3, 2, 1, 8, 6, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 2, 3]]
    assert p.cu_seq_lens.tolist() == [0, 4, 6, 10] and p.shared_prefix_lens == (0, 2, 0)
    assert p.targets.tolist() == [1, 2, 8, 1, 4] and p.labels.tolist() == [9, 5, 4, 3, 2]
    assert p.inputs()["shared_prefix_lens"] == (0, 2, 0)
    # No prompt repeats: the flat layout, nothing shared.
    alone = Rollout(**{k: getattr(r, k)[:2] for k in ("prompt_ids", "prompt_mask", "response_ids",
                                                       "response_mask", "logps", "finished")})
    assert alone.packed_shared.shared_prefix_lens is None
    assert torch.equal(alone.packed_shared.input_ids, alone.packed.input_ids)
    assert torch.equal(alone.packed_shared.targets, alone.packed.targets)


@pytest.mark.parametrize("pack", [True, "shared"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_rollout_logps_equal_the_padded_forward(name, pack):
    """Flat, and with the prompts shared: rows 1, 4 and 6 repeat rows 0 and 2's prompts, apart
    from them (as in a shuffled minibatch of GRPO groups)."""
    from alignkit.engine.attention import flat_packing

    model = _model(name)
    prompts = _prompts()
    prompts[4], prompts[1], prompts[6] = prompts[0], prompts[0], prompts[2]
    rollout = _gen(model, prompts)
    assert rollout.response_mask.sum() < rollout.response_mask.numel()   # padding to skip
    assert flat_packing(model)
    if pack == "shared":
        assert rollout.packed_shared.shared_prefix_lens.count(0) == 5   # 3 rows written response-only
    padded, packed = (rollout_logps(model, rollout, 0.7, p) for p in (False, pack))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    grads = [torch.autograd.grad((lp * torch.arange(lp.numel()).view_as(lp)).sum(), model.parameters())
             for lp in (padded, packed)]
    scale = max(float(a.abs().max()) for a in grads[0])   # fp32 sums in another order: ~1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) < 4e-6 * scale


def test_top_k_1_is_greedy():
    model = _llama(eos_bias=1.0)
    greedy = _gen(model, _prompts(), temperature=0.0)
    top1 = _gen(model, _prompts(), temperature=1.0, top_k=1)
    assert torch.equal(greedy.response_ids, top1.response_ids)
    # Both record log-probs under softmax(logits / 1): identical tokens, identical values.
    torch.testing.assert_close(greedy.logps, top1.logps, rtol=0, atol=1e-6)


def test_filter_logits_by_hand():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw)).nonzero().flatten().tolist()

    assert kept() == [0, 1, 2, 3]
    assert kept(top_p=0.4) == [1]               # 0.5 alone reaches 0.4
    assert kept(top_p=0.7) == [1, 3]            # mass before 0.3 is 0.5 < 0.7
    assert kept(top_p=0.9) == [1, 2, 3]         # mass before 0.15 is 0.8 < 0.9
    assert kept(top_p=0.99) == [0, 1, 2, 3]     # mass before 0.05 is 0.95 < 0.99
    assert kept(top_p=1e-9) == [1]              # the most likely token always survives
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=4) == [0, 1, 2, 3] == kept(top_k=10)
    # top-k first, then top-p on the renormalised survivors [0.5, 0.3, 0.15] / 0.95: the mass
    # before 0.15 becomes 0.842 >= 0.82, so it is dropped; without top-k it was 0.8 < 0.82.
    assert kept(top_p=0.82) == [1, 2, 3]
    assert kept(top_k=3, top_p=0.82) == [1, 3]
    # Kept logits are untouched; ties at the top-k boundary are all kept; batched rows independent.
    out = filter_logits(logits, top_p=0.7)
    assert torch.equal(out[[1, 3]], logits[[1, 3]]) and (out[[0, 2]] == -math.inf).all()
    assert torch.isfinite(filter_logits(torch.tensor([3.0, 1.0, 1.0, 0.0]), top_k=2)).tolist() == [
        True, True, True, False]
    batch = filter_logits(torch.stack([logits, logits.flip(0)]), top_p=0.7)
    assert torch.isfinite(batch).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_invert_cdf_frequencies():
    target = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 200_000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = invert_cdf((target * 7.0).expand(n, 4), u)  # unnormalised rows are fine
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[1] == 0  # zero-probability token never drawn
    # binomial std <= sqrt(0.25 / n) = 0.0011; 0.005 is > 4 sigma
    torch.testing.assert_close(freq, target.double(), rtol=0, atol=5e-3)
    # Quantiles at the CDF's steps 0.1, 0.7 (= 0.1 + 0.0 + 0.6), exactly as searchsorted(right=True).
    steps = torch.tensor([[0.0], [0.0999], [0.1001], [0.6999], [0.7001], [0.9999]], dtype=torch.float64)
    assert invert_cdf(target.expand(6, 4), steps).tolist() == [0, 0, 2, 2, 3, 3]


def test_invert_cdf_never_returns_a_zero_mass_token_at_the_top_of_the_cdf():
    # u = 1 puts u * total at the CDF's end: the count lands past the last token, which has no
    # mass in the first and third rows; those take the last token with mass (not the most
    # probable one: 0 in the third row), the second row keeps its draw.
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.5, 0.2, 0.2, 0.1], [0.6, 0.3, 0.1, 0.0]])
    top = torch.ones(3, 1, dtype=torch.float64)
    assert invert_cdf(probs, top).tolist() == [1, 3, 2]
    assert invert_cdf(probs, top * 0.9999).tolist() == [1, 3, 2]


def test_sampling_config_validation():
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig().greedy
    for bad, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2.0}, "max_new_tokens"),
                     ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
                     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                     ({"top_k": -1}, "top_k"), ({"top_k": True}, "top_k")]:
        with pytest.raises(ValueError, match=msg):
            SamplingConfig(**bad)


# ----------------------------------------------------------------------------- 5. EOS and padding


def _check_eos_bookkeeping(r: Rollout, max_new_tokens: int, pad_token_id: int):
    R = r.response_ids.size(1)
    assert R <= max_new_tokens
    for ids, mask, logps, fin in zip(r.response_ids, r.response_mask, r.logps, r.finished):
        eos_at = (ids == EOS).nonzero().flatten()
        if fin:
            first = int(eos_at[0])
            assert mask.tolist() == [1] * (first + 1) + [0] * (R - first - 1)  # EOS counted
            assert (ids[first + 1:] == pad_token_id).all()
            assert (logps[first + 1:] == 0).all() and logps[first] < 0
        else:
            assert eos_at.numel() == 0 and R == max_new_tokens and mask.all()


@pytest.mark.parametrize("name", MODELS)
def test_after_eos_everything_is_pad_and_masked(name):
    model = _model(name)
    r = _gen(model, _prompts(), max_new_tokens=12)
    assert r.finished.any() and not r.finished.all()
    _check_eos_bookkeeping(r, 12, PAD)
    assert r.finished.tolist() == (r.response_ids == EOS).any(-1).tolist()
    lengths = r.response_lengths()
    assert lengths.tolist() == r.response_mask.sum(-1).tolist()
    assert (lengths[~r.finished] == 12).all() and (lengths[r.finished] < 12).all()
    # sequences(): left-padded prompt then right-padded response, masks side by side.
    ids, mask = r.sequences()
    P = r.prompt_ids.size(1)
    assert torch.equal(ids[:, :P], r.prompt_ids) and torch.equal(ids[:, P:], r.response_ids)
    assert torch.equal(mask, torch.cat([r.prompt_mask, r.response_mask], 1))


def test_pad_equal_to_eos_keeps_the_real_eos_in_the_mask():
    model = _llama(eos_bias=2.0)
    r = generate(model, _prompts(), SamplingConfig(max_new_tokens=12), eos_token_id=EOS,
                 pad_token_id=EOS, generator=torch.Generator().manual_seed(1))
    assert r.finished.any() and not r.finished.all()
    _check_eos_bookkeeping(r, 12, EOS)
    with torch.no_grad():
        torch.testing.assert_close(rollout_logps(model, r), r.logps, rtol=0, atol=1e-5)


def test_stops_early_when_every_row_finished():
    model = _llama(eos_bias=8.0)  # EOS almost surely first
    r = _gen(model, _prompts(), max_new_tokens=30)
    assert r.finished.all() and r.response_ids.size(1) < 30
    assert r.response_ids.size(1) == int(r.response_lengths().max())
    _check_eos_bookkeeping(r, 30, PAD)


def test_max_new_tokens_respected_without_eos():
    model = _gpt2()
    r = _gen(model, _prompts(), max_new_tokens=7, temperature=0.0)
    r2 = generate(model, _prompts(), SamplingConfig(max_new_tokens=7), eos_token_id=V + 10,
                  pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert r.response_ids.size(1) <= 7
    assert r2.response_ids.shape == (8, 7) and r2.response_mask.all() and not r2.finished.any()


def test_decode_drops_padding_and_special_tokens():
    class CharTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            return "".join("" if (skip_special_tokens and i == EOS) else chr(ord("a") + i % 26) for i in ids)

    r = Rollout(prompt_ids=torch.tensor([[BOS], [BOS]]), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                response_ids=torch.tensor([[7, EOS, PAD], [8, 9, 10]]),
                response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
                logps=torch.zeros(2, 3), finished=torch.tensor([True, False]))
    assert r.decode(CharTokenizer()) == ["h", "ijk"]


def test_bad_prompts_rejected():
    model = _llama()
    cfg = SamplingConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[BOS, 7], []], cfg, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.tensor([[7, 8]]), cfg, eos_token_id=EOS, pad_token_id=PAD,
                 prompt_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, [[BOS]], cfg, eos_token_id=EOS, pad_token_id=PAD, batch_size=0)


# ----------------------------------------------------------------------------- optional compile


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_equals_eager():
    """sampling.compile=true (a compilation of the decoder's step and one of the model's forward,
    ~20-50 s each on 2 cores) gives the same tokens and logps,
    across row compaction (rows finishing early) and a second call with other prompt lengths.
    The model runs alignkit_sdpa, as a policy trained on packed batches does (online DPO, ReST):
    without sequence boundaries it must trace as transformers' SDPA."""
    from alignkit.engine.attention import flat_packing

    model = _model("llama")
    assert flat_packing(model)
    for lengths in (PROMPT_LENGTHS, (4, 12, 2, 8, 3)):
        kw = dict(eos_token_id=EOS, pad_token_id=PAD)
        eager = generate(model, _prompts(lengths), SamplingConfig(max_new_tokens=12),
                         generator=torch.Generator().manual_seed(1), **kw)
        compiled = generate(model, _prompts(lengths), SamplingConfig(max_new_tokens=12, compile=True),
                            generator=torch.Generator().manual_seed(1), **kw)
        assert eager.finished.any() and not eager.finished.all()
        assert torch.equal(compiled.response_ids, eager.response_ids)
        torch.testing.assert_close(compiled.logps, eager.logps, rtol=0, atol=1e-5)
    # An optimiser step changes the weights in place between rollouts: the compiled step reads them
    # (not constants baked at trace time). Also the compiled model forward (no decoder step).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    for fast in (True, False):
        kw = dict(eos_token_id=EOS, pad_token_id=PAD, fast_decode=fast)
        eager = generate(model, _prompts(), SamplingConfig(max_new_tokens=12),
                         generator=torch.Generator().manual_seed(2), **kw)
        compiled = generate(model, _prompts(), SamplingConfig(max_new_tokens=12, compile=True),
                            generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(compiled.response_ids, eager.response_ids)
        torch.testing.assert_close(compiled.logps, eager.logps, rtol=0, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_decoding(monkeypatch):
    """sampling.compile=true where compiling fails (no working C++ compiler, a compiler bug: here a
    backend that raises, which dynamo reports as inductor's failures are, BackendCompilerFailed):
    one warning, the samples of eager decoding, and later rollouts do not compile again. The
    decoder's step, and the model's forward where a graph break lets a first graph run (writing
    layer 0's cache) before the second fails to compile: that write is undone before decoding on."""
    import operator
    import warnings

    import torch._dynamo

    from alignkit.engine import generation

    tries, writes = [], []   # graphs the backend was given; those that write the KV cache
    fail_after_write = {}

    def failing_backend(graph_module, example_inputs):
        tries.append(graph_module)
        if not fail_after_write["on"] or writes:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found (test)")
        if any(n.target is operator.setitem or n.target == "copy_" for n in graph_module.graph.nodes):
            writes.append(graph_module)
        return graph_module.forward  # runs the graph as traced

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None, options=None:  # inductor's options
                        compile_(fn, backend=failing_backend, dynamic=dynamic))
    torch._dynamo.reset()  # graphs compiled by earlier tests would serve the call without compiling
    generation._compiled_decode_and_draw.cache_clear()
    model = _model("llama")
    layer = model.model.layers[1]

    def broken_forward(*args, **kwargs):
        torch._dynamo.graph_break()
        return type(layer).forward(layer, *args, **kwargs)

    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    try:
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(layer, "forward", broken_forward)
            tries.clear()
            fail_after_write["on"] = not fast
            monkeypatch.setattr(generation, "_compile_failure", [])
            eager = generate(model, _prompts(), SamplingConfig(max_new_tokens=12), fast_decode=fast,
                             generator=torch.Generator().manual_seed(3), **kw)
            failed = r"torch.compile failed \(RuntimeError: InvalidCxxCompiler: No working C\+\+"
            with pytest.warns(RuntimeWarning, match=failed):
                compiled = generate(model, _prompts(), SamplingConfig(max_new_tokens=12, compile=True),
                                    fast_decode=fast, generator=torch.Generator().manual_seed(3), **kw)
            n = len(tries)
            assert n == 1 if fast else len(writes) == 1  # the failure came after a write
            assert eager.finished.any() and not eager.finished.all()
            assert torch.equal(compiled.response_ids, eager.response_ids)
            assert torch.equal(compiled.logps, eager.logps)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again = generate(model, _prompts(), SamplingConfig(max_new_tokens=12, compile=True),
                                 fast_decode=fast, generator=torch.Generator().manual_seed(3), **kw)
            assert len(tries) == n and torch.equal(again.response_ids, eager.response_ids)
    finally:
        generation._compiled_decode_and_draw.cache_clear()
        torch._dynamo.reset()
