import pytest
import torch

from alignkit.math.logprobs import IGNORE_INDEX, token_logps


def _reference(logits, labels):
    """log_softmax written out, in float64, gathered at the labels; 0 where ignored."""
    logp = torch.log_softmax(logits.double(), -1)
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.masked_fill(~mask, 0)[..., None]).squeeze(-1)
    return picked * mask


def test_hand_computed_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]]])
    labels = torch.tensor([[1, 3]])
    lse = torch.log(torch.tensor(torch.e ** 2 + 2 + torch.e))
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([-torch.log(torch.tensor(4.0)), 1 - lse])[None],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [0, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_log_softmax(chunk, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    weights = torch.randn(3, 7, dtype=torch.float64)
    ours = token_logps(logits, labels, chunk=chunk)
    grad, = torch.autograd.grad((ours.double() * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference(ref_logits, labels)
    ref_grad, = torch.autograd.grad((ref * weights).sum(), ref_logits)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=0)
    assert (ours[labels == IGNORE_INDEX] == 0).all()
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=0)
    assert (grad[labels == IGNORE_INDEX] == 0).all()


def test_large_logits_are_stable_and_double_backward_is_refused():
    logits = torch.tensor([[[1000.0, 999.0, -1000.0]]], requires_grad=True)
    out = token_logps(logits, torch.tensor([[1]]))
    torch.testing.assert_close(out, torch.tensor([[-1 - torch.log1p(torch.exp(torch.tensor(-1.0)))]]))
    grad, = torch.autograd.grad(out.sum(), logits, create_graph=True)
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), logits)


def test_no_rows():
    out = token_logps(torch.zeros(0, 5, 11), torch.zeros(0, 5, dtype=torch.long))
    assert out.shape == (0, 5)


def test_next_token_logps_shift_the_labels_and_match_sliced_logits():
    from alignkit.math.logprobs import next_token_logps

    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6))
    labels[1, :3] = IGNORE_INDEX
    weights = torch.randn(2, 5, dtype=torch.float64)
    ours, targets = next_token_logps(logits, labels)
    assert ours.shape == targets.shape == (2, 5)
    assert torch.equal(targets, labels[:, 1:])
    grad, = torch.autograd.grad((ours.double() * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference(ref_logits[:, :-1], labels[:, 1:])
    ref_grad, = torch.autograd.grad((ref * weights).sum(), ref_logits)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=0)
    assert (grad[:, -1] == 0).all()  # the last position predicts nothing


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_labelled_logps_run_the_head_at_the_targets_only_and_match_all_positions(tiny_lm, arch):
    """A right-padded batch whose targets start at different positions: the LM head sees only
    the positions where some row has a target, and log-probs and gradients are those of the
    full logits at those positions; a forward without ``logits_to_keep`` computes them all."""
    from alignkit.math.logprobs import next_token_logps
    from alignkit.engine.forward import causal_logits, labelled_logps

    model = tiny_lm(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    logps, targets, positions = labelled_logps(model, batch)
    hook.remove()
    assert seen == [4] and positions.tolist() == [1, 2, 3, 4]   # targets at tokens 2..5
    assert targets.tolist() == [[-100, 8, 9, 10], [13, 14, -100, -100]]
    (g_part,) = torch.autograd.grad(logps.sum(), model.lm_head.weight)

    full, full_targets = next_token_logps(causal_logits(model, batch), labels)
    assert torch.equal(full_targets[:, positions], targets)
    assert torch.allclose(full[:, positions], logps, atol=1e-6, rtol=0)
    assert (full[:, [0]] == 0).all()   # no target there in any row
    (g_full,) = torch.autograd.grad(full.sum(), model.lm_head.weight)
    assert torch.allclose(g_part, g_full, atol=1e-6, rtol=0)

    class NoKeep(torch.nn.Module):   # a forward that does not take logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    all_logps, all_targets, all_positions = labelled_logps(NoKeep(model), batch)
    assert all_positions.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(all_logps, full, atol=1e-6, rtol=0) and torch.equal(all_targets, labels[:, 1:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_lora_wrapped_model_runs_the_head_at_the_targets_only(tiny_lm, arch):
    """PEFT's LoRA wrapper passes ``logits_to_keep`` through to the model it wraps, so the head
    runs at the target positions only there too, with the log-probs and adapter gradients of the
    full logits; a prompt-tuning wrapper (virtual tokens) keeps its own signature."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from alignkit.math.logprobs import next_token_logps

    from alignkit.engine.forward import causal_logits, forward_parameters, labelled_logps

    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    lora = get_peft_model(tiny_lm(arch), LoraConfig(r=2, target_modules=targets,
                                                    init_lora_weights=False,
                                                    fan_in_fan_out=arch == "gpt2"))
    assert "logits_to_keep" in forward_parameters(lora)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    head = lora.get_base_model().lm_head
    seen = []
    hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    logps, _, positions = labelled_logps(lora, batch)
    hook.remove()
    assert seen == [4] and positions.tolist() == [1, 2, 3, 4]
    adapter = [p for n, p in lora.named_parameters() if "lora_A" in n][0]
    (g_part,) = torch.autograd.grad(logps.sum(), adapter)
    full, _ = next_token_logps(causal_logits(lora, batch), labels)
    assert torch.allclose(full[:, positions], logps, atol=1e-6, rtol=0)
    (g_full,) = torch.autograd.grad(full.sum(), adapter)
    assert torch.allclose(g_part, g_full, atol=1e-6, rtol=0)

    prompt_tuned = get_peft_model(tiny_lm(arch), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                     num_virtual_tokens=2))
    assert "logits_to_keep" not in forward_parameters(prompt_tuned)
