"""SFT stage end to end on a tiny model: resume after a crash equals an uninterrupted run."""

import json

import pytest
import torch

from alignkit.config import build
from alignkit.engine import lm_loss
from alignkit.engine.lm_loss import causal_lm_loss, supports_last_rows_only
from alignkit.stages import sft


def cfg(model, out, **train):
    return build(sft.Config, {
        "model": str(model), "out_dir": str(out),
        "data": {"train": "task:sentiment", "eval": "task:sentiment", "task_samples": 64,
                 "eval_samples": 16, "max_length": 96},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "mixed_precision": "no",
                  "save_every": 2, "log_every": 1, **train}})


def weights(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_sft_resume_equals_uninterrupted(tiny_base, tmp_path, monkeypatch):
    sft.main(cfg(tiny_base, tmp_path / "straight"))
    real = lm_loss.causal_lm_loss
    calls = {"n": 0}

    def crash_in_step_4(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches per step: the first of step 4
            raise RuntimeError("killed")
        return real(model, batch, **kw)

    monkeypatch.setattr(lm_loss, "causal_lm_loss", crash_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        sft.main(cfg(tiny_base, tmp_path / "resumed"))
    monkeypatch.setattr(lm_loss, "causal_lm_loss", real)
    final = sft.main(cfg(tiny_base, tmp_path / "resumed"))
    assert final["steps"] == 6
    assert torch.equal(weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model"))
    assert not torch.equal(weights(tmp_path / "straight" / "model"), weights(tiny_base))
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(final["eval_loss"])
    assert (tmp_path / "resumed" / "config.yaml").exists()


def test_sft_lora_trains_and_saves_a_plain_model(tiny_base, tmp_path):
    c = build(sft.Config, {**_plain(cfg(tiny_base, tmp_path)), "lora": {"enabled": True, "r": 4}})
    out = sft.main(c)
    before, after = weights(tiny_base), weights(tmp_path / "model")
    assert after.shape == before.shape          # merged: loads as the plain architecture
    assert not torch.equal(before, after)
    assert out["eval_loss"] < 6.5


def _plain(c):
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(c)))


def test_sft_on_packed_batches_trains_as_on_padded_ones(tiny_base, tmp_path):
    packed = sft.main(cfg(tiny_base, tmp_path / "packed", save_every=0))
    padded = sft.main(cfg(tiny_base, tmp_path / "padded", save_every=0, packing=False))
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], abs=1e-5)
    assert torch.allclose(weights(tmp_path / "packed" / "model"),
                          weights(tmp_path / "padded" / "model"), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pack", [None, "flat"])
def test_last_mlp_at_the_targets_only_gives_the_same_loss_and_gradients(tiny_lm, arch, pack):
    """With ``last_rows_only`` the last layer's MLP sees only the positions with a target, in
    every row, and the loss and every gradient are those of the whole computation."""
    from alignkit.engine.attention import flat_packing
    from alignkit.data.collate import collate_rows
    from alignkit.engine.forward import last_mlp
    from alignkit.math.losses import reduce_loss

    model = tiny_lm(arch)
    if pack == "flat":
        assert flat_packing(model)
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]},
            {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]}]
    batch = collate_rows(rows, 0, pack)
    assert supports_last_rows_only(model, pack)
    seen = []   # the rows the MLP's first linear layer computes
    first = next(last_mlp(model).children())
    hook = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:-1].numel()))
    grads = []
    for only in (False, True):
        model.zero_grad()
        out = causal_lm_loss(model, batch, last_rows_only=only)
        loss = reduce_loss(out.values, out.weights, out.weights.sum(), 1)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    # Padded: 2 rows of 6, targets at next-token positions {2, 3, 4} and {1, 2}: their union,
    # 4 positions, in both rows. Flat: one row of 10, targets at 2, 3, 4 and 7, 8.
    assert seen == ([12, 8] if pack is None else [10, 5])
    (loss_all, g_all), (loss_part, g_part) = grads
    assert torch.allclose(loss_all, loss_part, atol=1e-6, rtol=0)
    for a, b in zip(g_all, g_part):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_last_rows_only_is_refused_under_gradient_checkpointing(tiny_lm):
    model = tiny_lm("llama")
    model.gradient_checkpointing_enable()
    assert not supports_last_rows_only(model, None)


def test_sft_lora_saves_an_adapter_peft_loads_onto_the_base_and_a_chat_template(tiny_base, tmp_path):
    """A base whose tokenizer has no chat template: chat SFT asks for data.chat_template; with one
    (a .jinja file) the template travels with the model and the adapter, and the adapter loaded
    onto the base with peft gives the merged model's logits."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import ConfigError
    from alignkit.engine.tokenizer import CHAT_TEMPLATE

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "chat_template.jinja").unlink()
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    data = {"train": "task:sentiment", "task_samples": 16, "max_length": 96, "chat": True}
    settings = {**_plain(cfg(base, tmp_path / "run", max_steps=3, save_every=0)), "data": data,
                "lora": {"enabled": True, "r": 4}}
    with pytest.raises(ConfigError, match=r"has no chat template and this stage renders chat; "
                                          r"give one with data.chat_template="):
        sft.main(build(sft.Config, settings))
    settings["data"] = {**data, "chat_template": str(tmp_path / "chat.jinja")}
    sft.main(build(sft.Config, settings))

    out = tmp_path / "run"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(base)
    for folder in ("model", "adapter"):
        assert AutoTokenizer.from_pretrained(out / folder).chat_template == CHAT_TEMPLATE
    ids = AutoTokenizer.from_pretrained(out / "adapter").apply_chat_template(
        [{"role": "user", "content": "Tell me about the film."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
        via_adapter = adapted.eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()(ids).logits
    assert (merged - before).abs().max() > 1e-3      # LoRA trained: the merged model moved
    assert torch.allclose(via_adapter, merged, rtol=0, atol=2e-6)
