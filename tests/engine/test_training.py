"""The shared loop: accumulation and resume invariances on a tiny model (fp32)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.stages.base import lm_collate
from alignkit.engine.lm_loss import causal_lm_loss
from alignkit.engine.training import (LoopConfig, OptimConfig, epoch_batches, lr_lambda, make_accelerator,
                               make_optimizer, resolve_precision, train)
from alignkit.tracking import Tracker, read_metrics


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, max_position_embeddings=64,
                                        pad_token_id=0))


def items(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        out.append(torch.randint(1, 40, (length,), generator=g).tolist())
    return out


def run(out_dir, loop, loss_fn=causal_lm_loss, data=None):
    data = data or items()
    model = tiny_model()
    acc = make_accelerator(loop.mixed_precision)
    tracker = Tracker(out_dir, stage="t")    # writes and prints on the main process only
    result = train(model, data, lengths=[len(s) for s in data], collate=lambda b: lm_collate(b, 0),
                   weight_of=lambda s: len(s) - 1, loss_fn=loss_fn, loop=loop,
                   optim=OptimConfig(lr=1e-2, warmup_steps=2), out_dir=out_dir, tracker=tracker,
                   accelerator=acc)
    return acc.unwrap_model(model), result


def flat(model):  # on the CPU: a trained model is on the accelerator's device (a GPU where there is one)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


BASE = dict(max_steps=6, batch_size=8, micro_batch_size=8, mixed_precision="no", log_every=1)


def test_accumulation_matches_full_batch(tmp_path):
    full, r1 = run(tmp_path / "a", LoopConfig(**BASE))
    accum, r2 = run(tmp_path / "b", LoopConfig(**{**BASE, "micro_batch_size": 3}))
    # Six Adam steps of ~1e-2 each: float-rounding differences of the gradients (different
    # padding per micro-batch) reach ~8e-6 in the parameters; a wrong normaliser moves them by
    # ~1e-3.
    assert torch.allclose(flat(full), flat(accum), atol=2e-5, rtol=0)
    assert r1.last_metrics["loss"] == pytest.approx(r2.last_metrics["loss"], abs=1e-6)
    # and the update was not a no-op
    assert not torch.allclose(flat(full), flat(tiny_model()), atol=1e-3)


def test_resume_after_crash_equals_uninterrupted(tmp_path, capsys):
    loop = LoopConfig(**{**BASE, "save_every": 2})
    straight, _ = run(tmp_path / "straight", loop)
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4: steps 1-3 done, checkpoint at step 2
            raise RuntimeError("simulated crash")
        return causal_lm_loss(model, batch)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", loop, loss_fn=crashing)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_2"]
    capsys.readouterr()
    resumed, result = run(tmp_path / "resumed", loop)
    assert result.step == 6
    # Each logged step of the total, with the time left (timed from the resumed step on).
    shown = re.findall(r"^\[t +\d+s\] step (\d+/\d+) eta (\d+)s loss=", capsys.readouterr().out, re.M)
    assert [at for at, _ in shown] == ["3/6", "4/6", "5/6", "6/6"] and shown[-1][1] == "0"
    assert torch.equal(flat(straight), flat(resumed))
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the crashed run's step 3 line was dropped and redone


def test_keyboard_interrupt_saves_checkpoint(tmp_path):
    calls = {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, LoopConfig(**BASE), loss_fn=interrupted)
    state = json.loads((tmp_path / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    # the step, and the metrics the run last logged (a run resumed at its end reports them)
    logged = {k: v for k, v in read_metrics(tmp_path)[-1].items() if k != "step"}
    assert state == {"step": 3, "last_metrics": logged}


def test_lr_schedule_values():
    fn = lr_lambda(OptimConfig(lr=1.0, warmup_steps=3, schedule="cosine", min_lr_ratio=0.0), 13)
    assert [fn(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert fn(3) == pytest.approx(1.0)
    assert fn(8) == pytest.approx(0.5)   # halfway through 10 decay steps
    assert fn(13) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda(OptimConfig(lr=1.0, schedule="linear", min_lr_ratio=0.2), 10)
    assert lin(5) == pytest.approx(0.2 + 0.8 * 0.5)


def test_optimizer_kernel_is_the_same_for_a_meta_built_model():
    """A sharded build leaves every process but the main one with meta parameters; all must pick
    the fused AdamW kernel the main process picks (its updates differ from the per-tensor loop's
    in the last bit, and the choice travels in the optimiser's checkpoint)."""
    def model():
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

    whole = make_optimizer(model(), OptimConfig(lr=1e-3))
    with torch.device("meta"):
        meta = make_optimizer(model(), OptimConfig(lr=1e-3))
    assert [g["fused"] for g in whole.param_groups] == [g["fused"] for g in meta.param_groups] \
        == [True, True]
    assert [len(g["params"]) for g in meta.param_groups] == [1, 3]   # decay: the matrix only


def test_epoch_batches_deterministic_and_grouped():
    lengths = list(range(100))
    a = epoch_batches(lengths, 10, seed=3, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 10, seed=3, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 10, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == lengths
    # grouped: each batch spans a narrow length range (here exactly 10 consecutive lengths)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) == 9 for b in a)


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import run, flat, BASE
from alignkit.engine.training import LoopConfig
model, _ = run({out!r}, LoopConfig(**{{**BASE, "micro_batch_size": 2}}))
import accelerate
state = accelerate.PartialState()
assert state.num_processes == 2, state.num_processes
if state.is_main_process:
    torch.save(flat(model), {out!r} + "/flat.pt")
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Two gloo processes (``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine)."""
    single, _ = run(tmp_path / "one", LoopConfig(**BASE))
    out = str(tmp_path / "two")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only the main process logs: each step once, of the total.
    assert [proc.stdout.count(f"] step {k}/6 ") for k in range(1, 7)] == [1] * 6, proc.stdout
    assert len(read_metrics(out)) == 6
    two = torch.load(out + "/flat.pt")
    assert torch.allclose(flat(single), two, atol=2e-5, rtol=0)  # see the accumulation test


def test_stages_with_different_precision_in_one_process():
    """The pipeline runs stages of different precision in one process."""
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "no"), (True, False, "bf16"),
                                                       (False, True, "bf16")])
def test_auto_precision_picks_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, avx512_bf16,
                                                                        amx, expected):
    """An AVX2-only CPU emulates bf16 products (~100x slower than fp32): "auto" means fp32 there."""
    # Where a GPU is present, accelerate's process-wide state already holds it and refuses a
    # CPU-only Accelerator in this process: resolve_precision alone is checked there.
    on_gpu = torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto") == expected
    if not on_gpu:
        assert make_accelerator("auto").mixed_precision == expected
    assert resolve_precision("no") == "no" and resolve_precision("bf16") == "bf16"
