"""The one sampling entry point: the backend chosen by config draws, the same samples as the
decoder it wraps, and every sampling stage reaches a backend through it."""

import pytest
import torch

from alignkit.engine import sampling
from alignkit.engine.generation import Rollout, generate
from alignkit.engine.models import load_causal_lm, load_tokenizer
from alignkit.engine.sampling import (BACKENDS, SamplingConfig, informative_pairs, sample,
                                      sample_pairs, sample_texts)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_engine_is_validated_against_the_registry():
    assert SamplingConfig().engine == "hf" and BACKENDS["hf"] is generate
    with pytest.raises(ValueError, match=r"sampling engine 'nope' is not one of \['hf'\]"):
        SamplingConfig(engine="nope")


def test_hf_backend_gives_the_decoders_samples(tiny_base):
    tok = load_tokenizer(tiny_base)
    model = load_causal_lm(tiny_base, tokenizer=tok).eval()
    ids = [tok("The film was")["input_ids"], tok("A slow")["input_ids"]]
    cfg = SamplingConfig(max_new_tokens=6)
    kw = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    got = sample(model, ids, cfg, generator=torch.Generator().manual_seed(3), **kw)
    want = generate(model, ids, cfg, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.logps, want.logps) and torch.equal(got.finished, want.finished)


class _Canned:
    """A backend that answers every prompt with the same two tokens and records its calls."""

    def __init__(self, tokens):
        self.tokens, self.calls = tokens, []

    def __call__(self, model, prompt_ids, cfg, *, eos_token_id, pad_token_id, seeds,
                 batch_size):
        self.calls.append((len(prompt_ids), cfg.engine, batch_size))
        n, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        prompts = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompt_ids])
        return Rollout(prompt_ids=prompts, prompt_mask=(prompts != pad_token_id).long(),
                       response_ids=torch.tensor([self.tokens] * n),
                       response_mask=torch.ones(n, len(self.tokens), dtype=torch.long),
                       logps=torch.full((n, len(self.tokens)), -0.5),
                       finished=torch.ones(n, dtype=torch.bool))


def test_a_registered_backend_serves_text_sampling_and_pairs(tiny_base, monkeypatch):
    tok = load_tokenizer(tiny_base)
    canned = _Canned(tok(" great", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    monkeypatch.setitem(sampling.BACKENDS, "canned", canned)
    cfg = SamplingConfig(engine="canned")
    rollout, texts = sample_texts(None, tok, ["The film was", "Dull"], cfg, chat=False, seed=0,
                                  batch_size=7)
    assert texts == [" great", " great"] and rollout.logps.sum().item() == -0.5 * rollout.logps.numel()
    pairs = sample_pairs(None, tok, ["The film was"], cfg, chat=False, seed=0)
    assert pairs == [{"prompt": "The film was", "response_a": " great", "response_b": " great"}]
    assert canned.calls == [(2, "canned", 7), (2, "canned", 64)]
    assert informative_pairs(pairs) == []   # identical responses carry no preference


def test_informative_pairs_by_hand():
    pairs = [{"prompt": "p", "response_a": "a", "response_b": "b"},
             {"prompt": "p", "response_a": " ", "response_b": "b"},
             {"prompt": "p", "response_a": "a", "response_b": ""},
             {"prompt": "p", "response_a": "same", "response_b": "same"}]
    assert informative_pairs(pairs) == pairs[:1]


def test_row_uniforms_are_uniform_and_independent_across_rows_and_steps():
    from alignkit.engine.generation import row_seeds, row_uniforms

    seeds = torch.tensor(row_seeds(0, 20_000))
    u = torch.cat([row_uniforms(seeds, t) for t in range(50)], 1)      # [rows, steps]
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    # 1e6 draws: mean and variance of U[0, 1) within ~4 standard errors.
    assert abs(u.mean().item() - 0.5) < 1.2e-3 and abs(u.var().item() - 1 / 12) < 4e-4
    counts = torch.histc(u.flatten().float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 43.8          # chi2, 19 dof, p = 0.001
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):             # next step, next row
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 5e-3
    # Consecutive raw seeds (a caller's seed, seed + 1) give unrelated streams too.
    raw = torch.arange(100_000)
    a, b = row_uniforms(raw, 0).flatten(), row_uniforms(raw + 1, 0).flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 1.5e-2


def test_row_seeds_of_a_slice_are_the_slice_of_the_seeds():
    from alignkit.engine.generation import row_seeds

    whole = row_seeds(7, 10)
    assert row_seeds(7, 4, start=3) == whole[3:7] and len(set(whole)) == 10
    assert all(0 <= s < 2**63 for s in whole) and row_seeds(8, 10) != whole


def test_a_rows_sample_depends_on_its_prompt_and_seed_not_on_its_batch(tiny_base):
    """Any split of a call's rows draws what the whole call draws: the contract that lets chunks,
    workers and engines share a call (the same seed gives the same sample wherever it runs)."""
    tok = load_tokenizer(tiny_base)
    model = load_causal_lm(tiny_base, tokenizer=tok).eval()
    ids = [tok(t)["input_ids"] for t in ("The film was", "A slow", "Dull and long, but", "Great")]
    ids = ids + ids[:2]                                  # repeated prompts share a prefill
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    kw = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    whole = sample(model, ids, cfg, seed=5, **kw)
    by_two = sample(model, ids, cfg, seed=5, batch_size=2, **kw)
    seeds = sampling.row_seeds(5, len(ids))
    order = [3, 0, 5, 2, 4, 1]
    shuffled = generate(model, [ids[i] for i in order], cfg, seeds=[seeds[i] for i in order], **kw)
    back = torch.empty(len(ids), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(ids))
    for other, rows in ((by_two, slice(None)), (shuffled, back)):
        n = whole.response_ids.size(1)
        assert torch.equal(other.response_ids[rows][:, :n], whole.response_ids)
        torch.testing.assert_close(other.logps[rows][:, :n], whole.logps, rtol=0, atol=1e-5)
    # Rows 4 and 5 repeat rows 0 and 1 with other seeds: other samples.
    assert not torch.equal(whole.response_ids[4:], whole.response_ids[:2])
    assert not torch.equal(sample(model, ids, cfg, seed=6, **kw).response_ids, whole.response_ids)
