"""train.strategy on 2 CPU processes (gloo over loopback), through the SFT stage's real path.

Each sharded run (fsdp2, zero2, zero3; LoRA on fsdp2 and zero3) trains 4 steps of a global batch
of 8 (2 micro-batches of 2 per process) and is compared with the same run in one process (ddp,
4 micro-batches of 2): the same global batch, so the same losses and weights up to float
reduction order. Measured here: weights within 2.4e-6 (the run moves them by 7.8e-3), losses
within 3e-7; the tolerances below are 1e-5 (weights) and 1e-5 (losses, relative). The final
folders are loaded with plain ``AutoModelForCausalLM.from_pretrained``.

Two launches in all (torchrun, ``--master_addr 127.0.0.1``, ``GLOO_SOCKET_IFNAME=lo``): every
full run in one, then every resume (from the step-2 checkpoint, in new processes) in another.
DeepSpeed's first run JIT-builds its shared-memory op into TORCH_EXTENSIONS_DIR (kept across
runs: ``~/.cache/torch_extensions`` or, where that is not writable, a folder under the system
temp dir); nothing here is timed, the launch only has a generous timeout.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.engine.training import LoopConfig, make_accelerator, resume

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
SHARDED = ("fsdp2", "zero2", "zero3")
LORA = ("fsdp2", "zero3")
FROZEN = ("fsdp2", "zero3")     # DPO with its reference sharded
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extensions_dir() -> str:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    home = Path.home() / ".cache"
    if os.access(home if home.exists() else Path.home(), os.W_OK):
        return str(home / "torch_extensions")
    return str(Path(tempfile.gettempdir()) / "alignkit-torch-extensions")


def launch(runs: list[dict], log: Path, worker: Path = HERE / "sharded_worker.py") -> None:
    """Run ``worker`` (a script taking the runs as JSON) on 2 processes; also the PPO stage's
    (tests/stages/test_ppo_sharded.py)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": _extensions_dir(),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(worker), json.dumps(runs)]
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1500)
    assert proc.returncode == 0, log.read_text()[-6000:]


def write_pairs(path: Path, n: int = 70) -> str:
    """``n`` preference pairs on the sentiment task's prompts: 3 batches of the reference's
    cached pass (32 pairs each), an uneven share for 2 processes."""
    from alignkit.tasks import get_task

    good = [" a warm and lovely film.", " moving, funny and kind.", " a joy from start to end."]
    bad = [" dull, dull and slow.", " a tired and empty film.", " flat and far too long."]
    prompts = get_task("sentiment").prompts("train", n)
    path.write_text("".join(json.dumps({"prompt": p, "chosen": good[i % 3], "rejected": bad[i % 2]})
                            + "\n" for i, p in enumerate(prompts)))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """Out folders: ``one`` / ``one_lora`` (one process), ``<strategy>`` / ``<strategy>_lora``
    (2 processes), ``<strategy>_resumed`` (2 new processes from ``<strategy>``'s step 2)."""
    sys.path.insert(0, str(HERE))
    from sharded_worker import main

    root = tmp_path_factory.mktemp("strategies")
    pairs = write_pairs(root / "pairs.jsonl")
    n = torch.get_num_threads()
    try:
        main([{"model": str(tiny_base), "out": str(root / "one")},
              {"model": str(tiny_base), "out": str(root / "one_lora"), "lora": True},
              {"model": str(tiny_base), "out": str(root / "one_dpo"), "pairs": pairs}])
    finally:
        torch.set_num_threads(n)
        sys.path.remove(str(HERE))
    launch([{"model": str(tiny_base), "out": str(root / s), "strategy": s, "probe": True}
            for s in SHARDED]
           + [{"model": str(tiny_base), "out": str(root / f"{s}_lora"), "strategy": s, "lora": True}
              for s in LORA]
           + [{"model": str(tiny_base), "out": str(root / f"{s}_dpo"), "strategy": s,
               "pairs": pairs} for s in FROZEN], root / "full.log")
    launch([{"model": str(tiny_base), "out": str(root / f"{s}_resumed"), "strategy": s,
             "resume": str(root / s / "checkpoints" / "step_2")} for s in SHARDED],
           root / "resumed.log")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_build_never_loads_whole_model_on_rank_1(runs, strategy, tiny_base):
    """``Strategy.build`` through the SFT stage's loader (sharded_worker.probe): under fsdp2 and
    zero3 only rank 0 loads the weights (rank 1's model is on the meta device, resp. ZeRO-3
    partitions of half a parameter or less, when build returns), and what ``prepare`` made of
    it holds exactly the weights of the model loaded whole in one process (torch.equal);
    zero2 (replicated weights) loads them on every rank, as before."""
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    rank0, rank1 = (json.loads((runs / strategy / f"build_rank{r}.json").read_text())
                    for r in (0, 1))
    assert rank0["loaded"] and rank0["params"] == rank1["params"] > 0
    if strategy == "zero2":
        assert rank1["loaded"] and rank1["meta"] == rank1["partitioned"] == 0
    else:
        assert not rank1["loaded"]
        if strategy == "fsdp2":
            assert rank1["meta"] == rank1["params"] and rank0["meta"] == 0
        else:
            assert rank0["partitioned"] == rank1["partitioned"] == rank1["params"]
    built = torch.load(runs / strategy / "built.pt")
    whole = load_causal_lm(tiny_base, tokenizer=load_tokenizer(tiny_base)).state_dict()
    assert sorted(built) == sorted(whole)
    assert [k for k in whole if not torch.equal(built[k], whole[k])] == []


def weights(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_run_equals_one_process(runs, strategy, tiny_base):
    one, got = weights(runs / "one" / "model"), weights(runs / strategy / "model")
    assert got.shape == one.shape       # a whole, plain transformers model
    assert (one - weights(tiny_base)).abs().max() > 1e-3     # the run moved the weights
    assert torch.allclose(got, one, rtol=0, atol=WEIGHT_TOL)
    ref, run = losses(runs / "one"), losses(runs / strategy)
    assert sorted(run) == [1, 2, 3, 4]
    assert run == pytest.approx(ref, rel=LOSS_TOL)
    metrics = json.loads((runs / strategy / "metrics.json").read_text())
    expected = "FSDP2" if strategy == "fsdp2" else f"DeepSpeed ZeRO-{strategy[-1]}"
    assert metrics["strategy"] == strategy and metrics["processes"] == 2
    assert metrics["distributed_type"] == f"{expected} over MULTI_CPU"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SHARDED)
def test_resumed_sharded_run_equals_uninterrupted(runs, strategy):
    resumed, straight = runs / f"{strategy}_resumed", runs / strategy
    # Sharded checkpoints: the engine's own files, one schedule / RNG file per process.
    step2 = straight / "checkpoints" / "step_2"
    assert (step2 / ("fsdp2" if strategy == "fsdp2" else "deepspeed")).is_dir()
    assert sorted(p.name for p in step2.glob("loop_state_rank*.pt")) == [
        "loop_state_rank0.pt", "loop_state_rank1.pt"]
    # Same processes' arithmetic on the same state: equal to the bit, not just within tolerance.
    # (This caught rank 1 of a sharded build stepping the per-tensor AdamW while rank 0 ran the
    # fused kernel, and the fused one after resuming: the optimiser state carries `fused`.)
    assert torch.equal(weights(resumed / "model"), weights(straight / "model"))
    assert losses(resumed) == {s: v for s, v in losses(straight).items() if s > 2}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", FROZEN)
def test_dpo_with_a_sharded_reference_equals_one_process(runs, strategy, tiny_base):
    """DPO's reference sharded as the policy is (``Strategy.prepare_frozen``): each process holds
    half of its weights, none trainable; the cached pass split between the processes (3 batches:
    one process repeats one to keep the lockstep) gives the one-process run's training."""
    for rank in (0, 1):
        frozen = json.loads((runs / f"{strategy}_dpo" / f"frozen_rank{rank}.json").read_text())
        assert frozen["trainable"] == 0
        assert frozen["local"] <= frozen["whole"] // 2 + 64    # its shard (dim-0 rounding)
        assert frozen["freed"]    # released after the cached pass (no evaluation needs it)
    one, got = weights(runs / "one_dpo" / "model"), weights(runs / f"{strategy}_dpo" / "model")
    assert (one - weights(tiny_base)).abs().max() > 1e-3     # the run moved the weights
    assert torch.allclose(got, one, rtol=0, atol=WEIGHT_TOL)
    ref, run = losses(runs / "one_dpo"), losses(runs / f"{strategy}_dpo")
    assert sorted(run) == [1, 2, 3] and run == pytest.approx(ref, rel=LOSS_TOL)
    # The reference's log-probs enter from step 2 on (step 1: policy == reference, loss log 2).
    assert ref[1] == pytest.approx(0.693147, abs=1e-5) and ref[3] < ref[1] - 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", LORA)
def test_sharded_lora_equals_one_process(runs, strategy, tiny_base):
    one, got = weights(runs / "one_lora" / "model"), weights(runs / f"{strategy}_lora" / "model")
    assert got.shape == weights(tiny_base).shape     # merged into the plain architecture
    assert (one - weights(tiny_base)).abs().max() > 1e-4
    assert torch.allclose(got, one, rtol=0, atol=WEIGHT_TOL)
    assert losses(runs / f"{strategy}_lora") == pytest.approx(losses(runs / "one_lora"), rel=LOSS_TOL)
    assert (runs / f"{strategy}_lora" / "adapter" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the setting, before anything launches.


@pytest.mark.parametrize("train, match", [
    ({"strategy": "fsdp"}, "train.strategy must be one of ddp, fsdp2, zero2, zero3"),
    ({"offload": True}, "train.offload=true needs .*fsdp2, zero3.*train.strategy=ddp"),
    ({"strategy": "zero2", "offload": True}, "train.strategy=zero2 does not"),
])
def test_bad_strategy_settings(train, match):
    with pytest.raises(ConfigError, match=match):
        LoopConfig(**train)


def test_offload_without_an_accelerator_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: offload is meaningful")
    with pytest.raises(ConfigError, match="train.offload=true .* no accelerator"):
        make_accelerator("no", "fsdp2", offload=True)


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_strategy_needs_a_process_group(strategy):
    with pytest.raises(ConfigError, match=f"train.strategy={strategy} runs over a process group"):
        make_accelerator("no", strategy)


def test_missing_deepspeed_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)     # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match="train.strategy=zero3 needs DeepSpeed.*pip install"):
        make_accelerator("no", "zero3")


def test_missing_build_tools_are_named(monkeypatch):
    import torch.utils.cpp_extension as ext

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed builds no CPU communication op on a GPU machine")

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "verify_ninja_availability", no_ninja)
    with pytest.raises(ConfigError, match="train.strategy=zero2 on the CPU.*ninja"):
        make_accelerator("no", "zero2")
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ConfigError, match="'no-such-compiler-here' \\(CXX\\) is not found"):
        make_accelerator("no", "zero2")


def test_resume_refuses_another_strategy(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "strategy": "zero3",
                                                         "processes": 2}))

    class NoTracker:
        def truncate_after(self, step):
            pass

    with pytest.raises(ConfigError, match="written by .*zero3.*same train.strategy"):
        resume(make_accelerator("no"), tmp_path, "auto", NoTracker())
