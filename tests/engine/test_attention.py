"""alignkit_sdpa: per-sequence attention on a flat packed row, transformers' SDPA otherwise."""

import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.engine.attention import NAME, _plan, flat_packing, sequence_sdpa

pytestmark = pytest.mark.usefixtures("one_thread")


def written_out(q, k, v, lengths, scale, shared=None):
    """Causal softmax attention of each sequence on its own, from the definition
    (Vaswani et al. 2017, eq. 1), key/value heads shared by consecutive query heads; segment ``j``
    also attends to the first ``shared[j]`` keys of segment ``j - 1`` (those of its prefix first,
    when it continues one too), its own queries at positions ``shared[j] + i``."""
    groups = q.shape[1] // k.shape[1]
    out, keys, start = [], [], 0
    for n, s in zip(lengths, shared or [0] * len(lengths)):
        keys = (keys[:s] if s else []) + list(range(start, start + n))
        qs = q[0, :, start:start + n]
        ks, vs = (t[0][:, keys].repeat_interleave(groups, 0) for t in (k, v))
        scores = qs @ ks.transpose(-1, -2) * scale
        late = torch.arange(s + n)[None, :] > (s + torch.arange(n))[:, None]  # key after the query
        out.append(scores.masked_fill(late, -math.inf).softmax(-1) @ vs)
        start += n
    return torch.cat(out, 1).transpose(0, 1)[None]  # [1, T, H, D]


def assert_same_attention(out, ref, inputs):
    """Equal outputs, and equal gradients of the inputs under a random cotangent."""
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * g).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def qkv(lengths, heads=4, kv_heads=2, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    return [torch.randn(1, h, t, dim, generator=g).to(dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def test_flat_row_attends_within_each_sequence_with_shared_kv_heads():
    lengths = [3, 6, 1, 5]
    q, k, v = qkv(lengths)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    cu = torch.tensor([0, 3, 9, 10, 15])
    out, weights = sequence_sdpa(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    ref = written_out(q, k, v, lengths, 0.3)
    assert weights is None and out.shape == (1, 15, 4, 8)
    assert_same_attention(out, ref, (q, k, v))


def test_short_rows_are_batched_padded_and_exact_with_shared_prefixes():
    """Sampling groups (a prompt written once, the other rows continuing it), a segment whose
    prefix is longer than itself, and rows too few or too long to batch: the same outputs and
    gradients as attention written out per segment."""
    lengths = (9, 6, 6, 2, 5, 4, 4, 4, 8, 2, 3, 130, 7)
    shared = (0, 3, 3, 3, 0, 2, 2, 2, 0, 6, 0, 0, 0)
    plan = _plan(lengths, shared, torch.device("cpu"))
    singles = {j: prefix for j, prefix in plan.singles}
    assert [(rows, width) for rows, width, _ in plan.buckets] == [(9, 9)]  # the short rows, padded
    assert singles[9].length == 6 and singles[11] is None     # prefix > own; wider than _WIDTH
    q, k, v = qkv(list(lengths))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    cu = torch.tensor((0,) + lengths).cumsum(0)
    out, _ = sequence_sdpa(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, shared_prefix_lens=shared)
    ref = written_out(q, k, v, lengths, 0.3, shared)
    assert out.shape == ref.shape == (1, sum(lengths), 4, 8)
    assert_same_attention(out, ref, (q, k, v))


def test_bf16_training_attention_runs_in_fp32_and_returns_bf16():
    lengths = [7, 4]
    q, k, v = qkv(lengths, kv_heads=4, dtype=torch.bfloat16)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    out, _ = sequence_sdpa(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=torch.tensor([0, 7, 11]))
    assert out.dtype == torch.bfloat16
    # fp32 arithmetic on the bf16 inputs, rounded once at the end: within bf16's half ulp
    ref = written_out(q.float(), k.float(), v.float(), lengths, 0.5)
    assert torch.allclose(out.float(), ref, atol=0, rtol=2 ** -8)


def test_mixed_input_dtypes_under_autocast_give_the_autocast_dtype():
    """Llama under bf16 autocast hands fp32 queries/keys (rotary) and bf16 values."""
    lengths = [5, 3]
    q, k, v = qkv(lengths, kv_heads=4)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sequence_sdpa(module, q, k, v.bfloat16(), None, scaling=0.5,
                               cu_seq_lens_q=torch.tensor([0, 5, 8]))
        with torch.no_grad():  # inference runs in bf16 itself
            plain, _ = sequence_sdpa(module, q, k, v, None, scaling=0.5,
                                     cu_seq_lens_q=torch.tensor([0, 5, 8]))
    ref = written_out(q, k, v.bfloat16().float(), lengths, 0.5)
    assert out.dtype == plain.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0, rtol=2 ** -8)
    assert torch.allclose(plain.float(), ref, atol=2e-2, rtol=2e-2)


def test_without_boundaries_it_is_transformers_sdpa(tiny_lm):
    """Padded and generation batches (masks, KV cache) take transformers' own path unchanged."""
    ids = torch.randint(1, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    plain, switched = tiny_lm("llama-gqa"), tiny_lm("llama-gqa")
    assert flat_packing(switched) and switched.config._attn_implementation == NAME
    a = plain(input_ids=ids, attention_mask=mask).logits
    b = switched(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    a = plain.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    b = switched.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_switch_is_not_saved_and_leaves_other_attention_alone(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_lm("gpt2")
    assert flat_packing(model)
    model.save_pretrained(tmp_path)
    assert "alignkit" not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    eager = tiny_lm("gpt2")
    eager.set_attn_implementation("eager")
    assert not flat_packing(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_flat_packed_bf16_training_forward_matches_padded(arch, tiny_lm):
    from alignkit.data.collate import collate_packed, collate_sft
    from alignkit.engine.forward import causal_logits

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 30, (n,), generator=g).tolist() for n in (6, 9, 4)]
    rows = [{"input_ids": r, "labels": r} for r in rows]
    model = tiny_lm(arch)
    assert flat_packing(model)
    padded, flat = collate_sft(rows, pad_id=0), collate_packed(rows, "flat")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = causal_logits(model, padded)
        b = causal_logits(model, flat)
    b.float().sum().backward()  # the bf16 backward runs through the fp32 attention
    a = torch.cat([a[i, :len(r["input_ids"])] for i, r in enumerate(rows)]).float()
    # bf16 rounding: ~2e-3 here; attending across sequences would be off by ~0.25.
    assert torch.allclose(a, b[0].float(), atol=1e-2, rtol=0)


def test_mask_of_one_unpadded_row_is_deferred_and_equals_sdpas(monkeypatch):
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

    from alignkit.engine import attention

    # The block-diagonal causal mask of a row packing sequences of lengths 2 and 3.
    sequence = torch.tensor([[0, 0, 1, 1, 1]])
    same = lambda b, h, q, kv: sequence[0, q] == sequence[0, kv]  # noqa: E731
    args = dict(batch_size=1, q_length=5, kv_length=5, mask_function=and_masks(causal_mask_function, same),
                attention_mask=None, allow_is_causal_skip=False)
    built = []
    monkeypatch.setattr(attention, "sdpa_mask", lambda **kw: built.append(1) or sdpa_mask(**kw))
    deferred = attention.deferred_sdpa_mask(**args)
    assert isinstance(deferred, attention.DeferredMask) and not built
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(deferred.build()[0, 0], expected) and deferred.build() is deferred.build()
    assert len(built) == 1  # once per forward, however many layers ask
    # Padded rows, a cache's offsets and single-token steps are built at once, as before.
    for other in (dict(batch_size=2), dict(attention_mask=torch.ones(1, 5, dtype=torch.bool)),
                  dict(q_length=1, kv_length=1), dict(q_offset=torch.tensor(0))):
        assert isinstance(attention.deferred_sdpa_mask(**{**args, **other}), (torch.Tensor, type(None)))


def test_packed_row_without_boundaries_builds_its_mask(tiny_lm):
    # Packed position ids but no cu_seq_lens reaching attention: the deferred mask is built and
    # the row's sequences stay apart, as with transformers' own SDPA.
    # (No cache: transformers reads packing from position ids only in a cache-free forward.)
    model = tiny_lm("llama")
    ids = torch.randint(1, 30, (1, 9), generator=torch.Generator().manual_seed(0))
    packed = dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]), use_cache=False)
    ref = model(**packed).logits
    assert flat_packing(model)
    out = model(**packed).logits
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    for part in (slice(0, 4), slice(4, 9)):
        alone = model(input_ids=ids[:, part], use_cache=False).logits
        assert torch.allclose(out[:, part], alone, atol=1e-5, rtol=0)


def test_sequence_lengths_are_read_once_per_boundaries_tensor():
    from alignkit.engine.forward import sequence_lengths

    cu = torch.tensor([0, 3, 9, 10])
    first = sequence_lengths(cu)
    assert first == [3, 6, 1] and sequence_lengths(cu) is first  # every later layer: no read
    cu[2] = 5  # an in-place write bumps the version: read again
    assert sequence_lengths(cu) == [3, 2, 5]
    assert sequence_lengths(torch.tensor([0, 3, 9, 10])) == [3, 6, 1]  # another tensor, same values


def test_a_flat_forward_reads_its_boundaries_once(tiny_lm, monkeypatch):
    from alignkit.data.collate import collate_packed
    from alignkit.engine.forward import causal_logits

    model = tiny_lm("llama")
    assert flat_packing(model)
    reads = []
    diff = torch.Tensor.diff
    monkeypatch.setattr(torch.Tensor, "diff", lambda t, *a, **k: reads.append(1) or diff(t, *a, **k))
    rows = [{"input_ids": s, "labels": s} for s in ([3, 4, 5], [6, 7, 8, 9])]
    causal_logits(model, collate_packed(rows, "flat"))  # packed_inputs + 2 layers
    assert len(reads) == 1
