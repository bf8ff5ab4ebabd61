"""Loading helpers: the packed-sequence probe."""

from types import SimpleNamespace

import pytest
import torch

from alignkit.engine.attention import flat_packing
from alignkit.engine.forward import supports_packing

pytestmark = pytest.mark.usefixtures("one_thread")


class RunningSum(torch.nn.Module):
    """A stand-in 'model' whose state at t sums every earlier token of the row: it ignores
    position ids, as a model with its own attention mask code might."""

    def __init__(self, per_sequence: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 4)
        self.per_sequence = per_sequence

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, position_ids=None, use_cache=False, output_hidden_states=False):
        h = self.emb(input_ids)
        if self.per_sequence and position_ids is not None:
            starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [h.shape[1]]
            h = torch.cat([h[:, a:b].cumsum(1) for a, b in zip(starts, starts[1:])], 1)
        else:
            h = h.cumsum(1)
        return SimpleNamespace(hidden_states=(h,))


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_transformers_models_honour_packed_position_ids(tiny_lm, layout):
    for arch in ("llama", "gpt2", "llama-gqa"):
        model = tiny_lm(arch)
        assert supports_packing(model, layout)  # SDPA: a dense mask over the row
        assert flat_packing(model) and supports_packing(model, layout)  # alignkit_sdpa
    model = tiny_lm("llama").train()
    supports_packing(model)
    assert model.training  # the probe restores the mode


def test_only_alignkit_sdpa_lets_a_pair_share_its_prefix(tiny_lm):
    for arch in ("llama", "gpt2", "llama-gqa"):
        model = tiny_lm(arch)
        assert not supports_packing(model, "shared")  # transformers' SDPA: suffix cut off
        assert flat_packing(model) and supports_packing(model, "shared")
    eager = tiny_lm("gpt2")
    eager.set_attn_implementation("eager")
    assert not supports_packing(eager, "shared")


def test_a_model_that_attends_across_sequences_is_refused():
    assert not supports_packing(RunningSum(per_sequence=False))
    assert supports_packing(RunningSum(per_sequence=True))


def test_gpt2_gelu_is_swapped_for_the_fused_kernel_with_the_same_outputs(tiny_lm):
    from transformers.activations import GELUTanh, NewGELUActivation

    from alignkit.engine.models import fuse_activations

    ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = tiny_lm("gpt2")
    fused = fuse_activations(tiny_lm("gpt2"))
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == 2  # one per block
    a, b = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    a.sum().backward()
    b.sum().backward()
    ga = torch.cat([p.grad.flatten() for p in plain.parameters()])
    gb = torch.cat([p.grad.flatten() for p in fused.parameters()])
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


def test_use_packing_follows_the_switch_and_the_probe(tiny_lm, capsys):
    from alignkit.engine.training import LoopConfig, use_packing

    model = tiny_lm("llama")
    assert use_packing(model, LoopConfig()) == "flat"
    assert model.config._attn_implementation == "alignkit_sdpa"
    assert use_packing(model, LoopConfig(), pairs=True) == "shared"
    eager = tiny_lm("gpt2")
    eager.set_attn_implementation("eager")  # attention over dense masks: rows, not one flat row
    assert use_packing(eager, LoopConfig()) == "rows"
    assert use_packing(eager, LoopConfig(), pairs=True) == "rows"
    assert not use_packing(tiny_lm("llama"), LoopConfig(packing=False))
    assert not use_packing(RunningSum(per_sequence=False), LoopConfig())
    # Flash attention would take a flat row, but this forward takes no boundaries: rows it is.
    flash_named = RunningSum(per_sequence=True)
    flash_named.config = SimpleNamespace(_attn_implementation="flash_attention_2")
    assert flat_packing(flash_named)
    assert use_packing(flash_named, LoopConfig(), pairs=True) == "rows"
    assert "does not confine attention to packed sequences" in capsys.readouterr().out
