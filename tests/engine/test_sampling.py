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

    def __call__(self, model, prompt_ids, cfg, *, eos_token_id, pad_token_id, generator,
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
