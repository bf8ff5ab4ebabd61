"""``alignkit ppo strategy=fsdp2|zero3`` (and zero2, ddp) on 2 CPU processes (gloo over loopback), through the
stage's real path, against the same config in one process.

Each run: 2 iterations of 4 prompts x 2 samples (8 rows), minibatches of 4 (2 rows per process,
micro-batches of 1: accumulation inside each process), scores standardised by running moments.
The two processes sample their halves of the rows with the rows' own seeds from the policy's
gathered rollout copy, gather the experience and train their halves of each minibatch; the
result must be one process's: per-iteration metrics within METRIC_TOL (relative) and the saved
policy and value weights within WEIGHT_TOL (absolute). Measured here: weights within 4.8e-6
(GRPO; PPO 8.7e-7, the runs move them by 1.2e-2), metrics within 2e-5 relative (policy_loss
~1e-2). A run resumed from the iteration-1
checkpoint must end bit-equal to the uninterrupted one. One torchrun launch
(``--master_addr 127.0.0.1``, ``GLOO_SOCKET_IFNAME=lo``, tests/engine/test_strategies.py's
launcher); the one-process references run in this process.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError

HERE = Path(__file__).parent
WEIGHT_TOL = 1e-5
METRIC_TOL = 1e-4
COMPARED = ("policy_loss", "value_loss", "proxy_reward_mean", "score_mean", "kl_to_ref", "beta",
            "entropy", "clipfrac", "approx_kl", "grad_norm", "value_grad_norm",
            "explained_variance", "response_length")
# (algo, strategy) on 2 processes; zero2 and ddp cost a few seconds more in the same launch.
SHARDED = [("ppo", "fsdp2"), ("ppo", "zero3"), ("grpo", "fsdp2"), ("ppo", "zero2"), ("ppo", "ddp")]
GOT = {"fsdp2": "FSDP2 over MULTI_CPU", "zero2": "DeepSpeed ZeRO-2 over MULTI_CPU",
       "zero3": "DeepSpeed ZeRO-3 over MULTI_CPU", "ddp": "MULTI_CPU"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Review {i}: the film" + " was" * (i % 3)}) + "\n"
                            for i in range(12)))
    return path


@pytest.fixture(scope="module")
def runs(tiny_base, prompt_file, tmp_path_factory):
    """Out folders ``one_<algo>`` (one process), ``<algo>_<strategy>`` (2 processes) and
    ``ppo_fsdp2_resumed`` (2 processes, from ``ppo_fsdp2``'s iteration-1 checkpoint)."""
    sys.path.insert(0, str(HERE.parent / "engine"))
    sys.path.insert(0, str(HERE))
    from ppo_sharded_worker import main
    from test_strategies import launch

    root = tmp_path_factory.mktemp("ppo_sharded")
    common = {"model": str(tiny_base), "prompts": str(prompt_file)}
    n = torch.get_num_threads()
    try:
        main([{**common, "out": str(root / f"one_{a}"), "algo": a} for a in ("ppo", "grpo")])
        worker = HERE / "ppo_sharded_worker.py"
        # One launch (each costs ~20 s of imports here): the resumed run follows the run whose
        # checkpoint it loads, in the same processes but rebuilding everything from the files.
        launch([{**common, "out": str(root / f"{a}_{s}"), "algo": a, "strategy": s}
                for a, s in SHARDED]
               + [{**common, "out": str(root / "ppo_fsdp2_resumed"), "strategy": "fsdp2",
                   "resume": str(root / "ppo_fsdp2" / "checkpoints" / "step_1")}],
               root / "full.log", worker)
    finally:
        torch.set_num_threads(n)
        sys.path.remove(str(HERE))
        sys.path.remove(str(HERE.parent / "engine"))
    return root


def _weights(folder: Path, kind: str) -> torch.Tensor:
    import transformers

    model = getattr(transformers, kind).from_pretrained(str(folder))
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("algo, strategy", SHARDED)
def test_sharded_ppo_equals_one_process(runs, algo, strategy, tiny_base):
    one, got = runs / f"one_{algo}", runs / f"{algo}_{strategy}"
    policy = _weights(got / "model", "AutoModelForCausalLM")     # a plain transformers model
    reference = _weights(one / "model", "AutoModelForCausalLM")
    assert (reference - _weights(tiny_base, "AutoModelForCausalLM")).abs().max() > 1e-3
    assert (policy - reference).abs().max() <= WEIGHT_TOL
    if algo == "ppo":
        value = _weights(got / "value", "AutoModelForSequenceClassification")
        assert (value - _weights(one / "value", "AutoModelForSequenceClassification")
                ).abs().max() <= WEIGHT_TOL
    else:
        assert not (got / "value").exists()
    a, b = _metrics(one), _metrics(got)
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in COMPARED:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=METRIC_TOL, abs=1e-7), (ra["step"], key)
    final = json.loads((got / "metrics.json").read_text())
    assert (final["strategy"], final["processes"]) == (strategy, 2)
    assert final["distributed_type"] == GOT[strategy]
    # The samples are the whole iteration's, in one process's order.
    assert (got / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    # Built through the strategy: policy, reference and (PPO) value; under fsdp2 / zero3 only
    # rank 0 loads them whole. The frozen reference: sharded with the policy (fsdp2, zero3),
    # whole on each process else.
    builds = 3 if algo == "ppo" else 2
    for rank in (0, 1):
        built = json.loads((got / f"build_rank{rank}.json").read_text())
        assert built["builds"] == builds
        assert built["loads"] == (0 if rank == 1 and strategy in ("fsdp2", "zero3") else builds)
        held = json.loads((got / f"frozen_rank{rank}.json").read_text())
        assert held["trainable"] == 0
        if strategy in ("fsdp2", "zero3"):
            assert held["local"] <= held["whole"] // 2 + 64
        else:
            assert held["local"] == held["whole"]


@pytest.mark.slow
def test_resumed_sharded_ppo_equals_uninterrupted(runs):
    straight, resumed = runs / "ppo_fsdp2", runs / "ppo_fsdp2_resumed"
    for folder, kind in (("model", "AutoModelForCausalLM"),
                         ("value", "AutoModelForSequenceClassification")):
        assert torch.equal(_weights(resumed / folder, kind), _weights(straight / folder, kind))
    timing = {"tokens_per_s", "iteration_s"}
    a = [r for r in _metrics(straight) if r["step"] == 2]
    b = _metrics(resumed)
    assert [r["step"] for r in b] == [2]
    assert {k: v for k, v in b[0].items() if k not in timing} == \
        {k: v for k, v in a[0].items() if k not in timing}


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the setting.


def _config(tiny_base, prompt_file, **overrides):
    from alignkit.config import load_config
    from alignkit.stages import ppo

    settings = {"model": tiny_base, "reward": "python:os:getcwd", "rollout.prompts": prompt_file,
                "rollout.prompts_per_iteration": 4, "rollout.samples_per_prompt": 2,
                "ppo.minibatch_size": 4, **overrides}
    return load_config(ppo.Config, None, [f"{k}={v}" for k, v in settings.items()])


@pytest.mark.parametrize("overrides, match", [
    ({"rollout.prompts_per_iteration": 3, "ppo.minibatch_size": 6},
     r"rollout.prompts_per_iteration \(3\) must be a multiple of the number of processes \(2\)"),
    ({"rollout.prompts_per_iteration": 2, "rollout.samples_per_prompt": 3, "ppo.minibatch_size": 3},
     r"ppo.minibatch_size \(3\) must be a multiple of the number of processes \(2\)"),
    ({"rollout.sampling.engine": "vllm"}, r"2 processes sample with rollout.sampling.engine=hf "
     r"and workers.backend=local .* got engine=vllm, workers.backend=local"),
    ({"workers.backend": "ray"}, r"got engine=hf, workers.backend=ray"),
])
def test_rows_that_do_not_split_evenly_are_refused(tiny_base, prompt_file, overrides, match):
    from alignkit.stages import ppo

    cfg = _config(tiny_base, prompt_file, **overrides)
    ppo.check_processes(cfg, 1)     # one process takes any split
    with pytest.raises(ConfigError, match=match):
        ppo.check_processes(cfg, 2)


def test_sharded_strategies_refuse_the_shared_placement_and_unknown_names(tiny_base, prompt_file):
    with pytest.raises(ConfigError, match="roles=shared .* strategy=ddp; strategy=zero3 .* "
                                          "roles=separate"):
        _config(tiny_base, prompt_file, roles="shared", strategy="zero3")
    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp2, zero2, zero3"):
        _config(tiny_base, prompt_file, strategy="fsdp")
    with pytest.raises(ConfigError, match="offload=true needs .*strategy=ddp does not"):
        _config(tiny_base, prompt_file, offload="true")
