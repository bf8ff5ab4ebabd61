"""Shared fixtures: a tiny base model + tokenizer on the sentiment task, saved with
save_pretrained, so stages load it through from_pretrained exactly as they load real models;
``one_thread`` for modules that run tiny models (``pytestmark = usefixtures("one_thread")``)."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.tasks import get_task
    from alignkit.engine.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    texts = get_task("sentiment").corpus(400, seed=0)
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """Tiny models spend their time in per-op overhead; extra threads only contend (10x slower
    on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_lm():
    """Factory of tiny random causal LMs (vocabulary 30, hidden 32, pad id 0): "llama", "gpt2" or
    "llama-gqa" (4 query heads sharing 2 key/value heads)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def make(arch: str = "llama", seed: int = 0):
        torch.manual_seed(seed)
        if arch == "gpt2":
            return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=32, n_layer=2, n_head=4,
                                              n_positions=64, pad_token_id=0, resid_pdrop=0.0,
                                              embd_pdrop=0.0, attn_pdrop=0.0))
        return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2 if arch == "llama-gqa" else 4,
                                            pad_token_id=0))
    return make
