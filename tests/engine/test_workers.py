"""Workers (engine/workers.py): the config, the chunks and their reassembly, the weight transfer,
and a real Ray pool of 2 actors (run in a loopback-only network namespace, see ray_session.py)
whose samples, after a weight update, after a worker killed mid-call, and in a ``label`` run,
equal the local backend's exactly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.engine.sampling import BACKENDS, SamplingConfig, sample, sample_texts
from alignkit.engine.workers import (WorkersConfig, chunk_bounds, concat_rollouts,
                                     load_state_arrays, state_arrays, weights_version)

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logps", "finished")


def assert_same(a, b, fields=FIELDS):
    for f in fields:
        x, y = (a[f] if isinstance(a, dict) else getattr(a, f)), (b[f] if isinstance(b, dict) else getattr(b, f))
        assert torch.equal(x, y), f


def assert_as_local(remote: dict, draw, model):
    """``remote`` (what the actors sampled) against ``draw(model)`` (the local backend).

    An actor holds a copy of the weights in memory it allocated (64-byte aligned); a model loaded
    from safetensors keeps tensors at the file's offsets (here 56 mod 64), and for some shapes
    (batches of 2 rows) the CPU kernels round differently on them: log-probs differ by up to
    1e-6 (1 ulp at |logp| ~ 6), tokens do not. So: exactly the local backend on a copy of the
    model (``copy.deepcopy``, what an actor holds), and the same tokens as on the loaded model
    with log-probs within 2e-6."""
    import copy

    assert_same(remote, draw(copy.deepcopy(model)))
    local = draw(model)
    assert_same(remote, local, fields=FIELDS[:4] + ("finished",))
    torch.testing.assert_close(remote["logps"], local.logps, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- config


def test_workers_config_from_dotted_overrides_and_its_refusals():
    from alignkit.stages import label

    cfg = load_config(label.Config, None, ["policy=p", "workers.backend=ray", "workers.num=3",
                                           "workers.address=10.1.2.3:6379"])
    assert cfg.workers == WorkersConfig(backend="ray", num=3, address="10.1.2.3:6379")
    assert load_config(label.Config, None, ["policy=p"]).workers.backend == "local"
    for bad, says in ((["workers.backend=dask"], "workers.backend"), (["workers.num=0"], "workers.num"),
                      (["workers.address=somewhere"], "workers.address"),
                      (["workers.threads=0"], "workers.threads")):
        with pytest.raises(ConfigError, match=says):
            load_config(label.Config, None, ["policy=p", *bad])


def test_every_sampling_stage_has_a_workers_section():
    import importlib

    from alignkit.stages import STAGES

    for name in ("rest", "label", "dpo", "bon", "evaluate", "ppo"):
        config = importlib.import_module(STAGES[name]).Config
        assert config.__dataclass_fields__["workers"].type in ("WorkersConfig", WorkersConfig), name


# ----------------------------------------------------------------------------- chunks


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(5, None) == [(0, 5)]


def test_chunks_sampled_apart_and_concatenated_equal_one_local_call(tiny_lm):
    """What the Ray pool does, without Ray: each chunk through the backend alone, with its rows'
    seeds, then concat_rollouts: the same tensors as the local backend on all rows."""
    model = tiny_lm("gpt2").eval()
    widths = [1, 2, 1, 2, 3, 1, 2, 3, 1, 1]      # chunks of 4: widest rows 2, 3, 1
    prompts = [[1 + i % 7, 3, 4 + i % 5][:w] for i, w in enumerate(widths)]
    cfg = SamplingConfig(max_new_tokens=9)
    seeds = [1000 + 17 * i for i in range(10)]
    kw = dict(eos_token_id=2, pad_token_id=0)
    whole = BACKENDS["hf"](model, prompts, cfg, seeds=seeds, batch_size=4, **kw)
    parts = [BACKENDS["hf"](model, prompts[lo:hi], cfg, seeds=seeds[lo:hi], batch_size=4, **kw)
             for lo, hi in chunk_bounds(10, 4)]
    assert [p.prompt_ids.size(1) for p in parts] == [2, 3, 1]    # each chunk padded alone
    assert_same(concat_rollouts(parts, 0), whole)


def test_local_workers_backend_is_the_sampling_backend(tiny_lm):
    model = tiny_lm().eval()
    prompts = [[1, 2, 3], [4, 5], [6]] * 3
    cfg = SamplingConfig(max_new_tokens=6)
    a = sample(model, prompts, cfg, eos_token_id=2, pad_token_id=0, seed=7, batch_size=4)
    b = sample(model, prompts, cfg, eos_token_id=2, pad_token_id=0, seed=7, batch_size=4,
               workers=WorkersConfig(backend="local"))
    assert_same(a, b)


# ----------------------------------------------------------------------------- weights


def test_weights_version_moves_with_in_place_updates_only(tiny_lm):
    model = tiny_lm()
    v0 = weights_version(model)
    model(torch.tensor([[1, 2, 3]]))        # a forward writes nothing
    assert weights_version(model) == v0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    v1 = weights_version(model)
    assert v1 != v0
    model.load_state_dict(tiny_lm(seed=1).state_dict())
    assert weights_version(model) != v1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_arrays_round_trip(tiny_lm, dtype):
    source, target = tiny_lm(seed=0).to(dtype), tiny_lm(seed=1).to(dtype)
    load_state_arrays(target, state_arrays(source))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name


# ----------------------------------------------------------------------------- a Ray cluster


def _unshare_refusal() -> str | None:
    """Why a loopback-only network namespace cannot be made here (None: it can)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (iproute2) is not installed"
    try:
        done = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare -n failed: {error}"
    if done.returncode != 0:
        return f"unshare -n is not permitted here: {done.stderr.strip()[:200]}"
    return None


def _raylet_failures(out: Path) -> str:
    """The raylet's failed checks (what a Ray that did not start says about why)."""
    lines = [line[:400] for log in out.glob("ray/session_*/logs/raylet.out")
             for line in log.read_text(errors="replace").splitlines() if "Check failed" in line]
    return "\nraylet: " + "\n".join(lines) if lines else ""


@pytest.fixture(scope="module")
def ray_results(tiny_base, tmp_path_factory):
    """Run ray_session.py once for the module, Ray confined to a loopback-only namespace and to a
    fresh HOME (token auth writes ~/.ray/auth_token there, as on a new machine). The raylet
    waits ``RAY_raylet_start_wait_time_s`` (default 30 s here) for its agents, which start slowly
    on a loaded 2-core machine."""
    pytest.importorskip("ray")
    reason = _unshare_refusal()
    if reason:
        pytest.skip(f"Ray must run in a loopback-only network namespace (it listens on every "
                    f"interface); {reason}")
    out = tmp_path_factory.mktemp("ray")
    import alignkit

    env = {**os.environ, "HOME": str(out / "home"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_raylet_start_wait_time_s": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(alignkit.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    script = Path(__file__).with_name("ray_session.py")
    command = f"ip link set lo up; exec {sys.executable} {script} {tiny_base} {out}"
    done = subprocess.run(["unshare", "-n", "sh", "-c", command], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + _raylet_failures(out)
    assert (out / "home" / ".ray" / "auth_token").exists()
    return torch.load(out / "results.pt", weights_only=False), out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base):
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_base)
    return load_causal_lm(tiny_base, tokenizer=tok).eval(), tok


PROMPTS = [f"the film was {w}" for w in ("good", "bad", "long", "odd", "fine", "dull")] * 4


@pytest.mark.slow
def test_two_ray_workers_sample_what_the_local_backend_samples(ray_results, model_and_tokenizer):
    res, _, _ = ray_results
    model, tok = model_and_tokenizer
    def draw(m):
        return sample_texts(m, tok, PROMPTS, SamplingConfig(max_new_tokens=12), chat=False,
                            seed=3, batch_size=4)

    local, texts = draw(model)
    assert res["first"]["sync"] == "module" and res["again_sync"] == ""
    assert_as_local(res["first"]["rollout"], lambda m: draw(m)[0], model)
    assert res["first"]["texts"] == texts
    assert len(set(texts)) > 6      # sampled, not one response repeated


@pytest.mark.slow
def test_ray_workers_get_the_updated_weights(ray_results, model_and_tokenizer, tiny_base):
    from alignkit.engine.models import load_causal_lm

    res, _, _ = ray_results
    _, tok = model_and_tokenizer
    model = load_causal_lm(tiny_base, tokenizer=tok).eval()
    before, _ = sample_texts(model, tok, PROMPTS, SamplingConfig(max_new_tokens=12), chat=False,
                             seed=3, batch_size=4)
    with torch.no_grad():   # the update ray_session.py made
        for i, p in enumerate(model.parameters()):
            p.mul_(1.0 + 0.05 * (i % 3))
    def draw(m):
        return sample_texts(m, tok, PROMPTS, SamplingConfig(max_new_tokens=12), chat=False,
                            seed=3, batch_size=4)

    local, texts = draw(model)
    assert res["updated"]["sync"] == "weights"
    assert not torch.equal(before.logps, local.logps)
    assert_as_local(res["updated"]["rollout"], lambda m: draw(m)[0], model)
    assert res["updated"]["texts"] == texts


@pytest.mark.slow
def test_a_worker_killed_mid_call_loses_and_duplicates_nothing(ray_results, model_and_tokenizer,
                                                                tiny_base):
    from alignkit.engine.models import load_causal_lm

    res, _, log = ray_results
    _, tok = model_and_tokenizer
    model = load_causal_lm(tiny_base, tokenizer=tok).eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(1.0 + 0.05 * (i % 3))
    kill = res["kill"]

    def draw(m):
        return sample(m, kill["ids"], SamplingConfig(max_new_tokens=24),
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=11,
                      batch_size=2)

    # The kill landed while the call ran, and the pool noticed it within that call.
    assert kill["restarts"] == 1, (kill, log[-2000:])
    assert res["killed_at_s"] < kill["call_s"]
    assert kill["pids_before"][0] not in kill["pids_after"]
    assert kill["pids_before"][1] in kill["pids_after"]
    assert_as_local(kill["rollout"], draw, model)    # no row lost, none twice, none changed


@pytest.mark.slow
def test_label_stage_on_ray_workers_writes_the_local_files(ray_results, tiny_base, tmp_path):
    from alignkit.stages import label

    _, out, _ = ray_results
    cfg = load_config(label.Config, None, [
        f"policy={tiny_base}", f"out_dir={tmp_path}", "train_prompts=12", "eval_prompts=4",
        "batch_size=4", "sampling.max_new_tokens=10"])
    label.main(cfg)
    for name in ("pairs_train.jsonl", "train.jsonl", "pairs_eval.jsonl", "eval.jsonl"):
        assert (out / "label" / name).read_text() == (tmp_path / name).read_text(), name
    assert (tmp_path / "pairs_train.jsonl").read_text().count("\n") >= 6
