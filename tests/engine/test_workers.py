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
                                     load_state_arrays, state_arrays, watch_optimizer_steps,
                                     weights_version)

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
    v2 = weights_version(model)
    assert v2 != v1
    # torch's fused AdamW (the training loop's) leaves the version counters alone: the step hook
    # counts its steps on the parameters instead.
    watch_optimizer_steps()
    counters = [p._version for p in model.parameters()]
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    fused.step()
    assert [p._version for p in model.parameters()] == counters
    assert weights_version(model) != v2


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
                          text=True, timeout=1200)
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


# ----------------------------------------------------------------------------- scoring, judging, ppo


def _ai_comparisons(store_path) -> list[tuple]:
    from alignkit.data.store import PreferenceStore

    with PreferenceStore(store_path) as store:
        return [(c["pair_id"], c["label"], c["prob_a"], c["rationale"])
                for c in store.comparisons(source="ai")]


LABEL_AI_KEYS = ("labels", "ties", "unlabelled", "requests", "cache_hits", "prompt_tokens",
                 "completion_tokens", "ai_agreement_with_simulated", "position_bias_rate",
                 "train_pairs", "eval_pairs")


@pytest.mark.slow
def test_label_ai_with_a_local_judge_on_ray_workers_writes_the_local_labels(
        ray_results, tiny_base, tmp_path, monkeypatch):
    """The judge model's rationales (sampled) and verdicts (scored in batches of 4) on 2 actors:
    the same files, byte for byte, as the local backend on a copy of the judge model (what an
    actor holds; see assert_as_local), and the same labels, soft labels within 2e-6, as on the
    model as loaded."""
    import copy
    import json

    import alignkit.engine.models as models
    from alignkit.stages import judge
    from ray_session import judge_yaml

    res, out, _ = ray_results
    remote = out / "label_ai"
    load = models.load_causal_lm
    with monkeypatch.context() as m:
        m.setattr(models, "load_causal_lm", lambda *a, **k: copy.deepcopy(load(*a, **k)))
        judge.main(judge.load(str(judge_yaml(tmp_path / "j.yaml", str(tiny_base), out / "label",
                                             tmp_path / "copy")), []))
    for name in ("train.jsonl", "eval.jsonl", "unlabelled.jsonl"):
        assert (remote / name).read_text() == (tmp_path / "copy" / name).read_text(), name
    ai = _ai_comparisons(remote / "store.db")
    assert ai == _ai_comparisons(tmp_path / "copy" / "store.db")
    mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (remote, tmp_path / "copy"))
    assert {k: mine[k] for k in LABEL_AI_KEYS} == {k: theirs[k] for k in LABEL_AI_KEYS}
    assert mine["labels"] >= 8 and mine["requests"] == 2 * (mine["labels"] + mine["unlabelled"])
    # chain-of-thought: 4 rationale tokens sampled (greedy) and 1 verdict token per request
    assert mine["completion_tokens"] == 5 * mine["requests"]
    assert res["label_ai_chunks"] >= 2                          # verdict batches on the actors

    judge.main(judge.load(str(judge_yaml(tmp_path / "j2.yaml", str(tiny_base), out / "label",
                                         tmp_path / "loaded")), []))
    for split in ("train", "eval"):
        a, b = (read_records(d / f"{split}.jsonl") for d in (remote, tmp_path / "loaded"))
        assert [{k: v for k, v in r.items() if k != "label_prob"} for r in a] == \
            [{k: v for k, v in r.items() if k != "label_prob"} for r in b]
        torch.testing.assert_close(torch.tensor([r["label_prob"] for r in a], dtype=torch.float64),
                                   torch.tensor([r["label_prob"] for r in b], dtype=torch.float64),
                                   rtol=0, atol=2e-6)


def read_records(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_label_ai_with_an_http_judge_on_ray_workers_sends_each_request_once(ray_results, tiny_base,
                                                                            tmp_path):
    """The endpoint's requests sent from 2 actors (chunks of 8, 2 in flight per actor): the same
    files as sent from this process, every request answered once, the retries of 503s counted."""
    import json

    from alignkit.stages import judge
    from ray_session import FakeJudgeServer, judge_yaml

    res, out, _ = ray_results
    server = FakeJudgeServer()
    try:
        judge.main(judge.load(str(judge_yaml(tmp_path / "h.yaml", str(tiny_base), out / "label",
                                             tmp_path / "http", http=server.url)), []))
    finally:
        server.close()
    for name in ("train.jsonl", "eval.jsonl", "unlabelled.jsonl"):
        assert (out / "label_ai_http" / name).read_text() == (tmp_path / "http" / name).read_text()
    assert res["http_answered"] == server.answered
    assert set(server.answered.values()) == {1}
    mine, theirs = (json.loads((d / "metrics.json").read_text())
                    for d in (out / "label_ai_http", tmp_path / "http"))
    assert mine["http_retries"] == theirs["http_retries"] > 0
    assert mine["requests"] == len(server.answered) == theirs["requests"] and mine["labels"] >= 8
    assert mine["failed_requests"] == 0


@pytest.mark.slow
def test_reward_model_scores_on_ray_workers_equal_the_local_scores(ray_results):
    """21 rows in 6 batches of 4 on 2 actors: exactly the local scores on a copy of the reward
    model (what an actor holds), within 2e-6 of those of the model as loaded (see
    assert_as_local)."""
    import copy

    from alignkit.engine.models import load_scalar_model, load_tokenizer
    from alignkit.engine.scoring import RewardModel, make_reward_source

    res, out, _ = ray_results
    rm, path = res["rm"], out / "rm"
    assert rm["sync"] == "module" and rm["chunks"] == 6
    prompts = PROMPTS[:21]
    tok = load_tokenizer(path)
    on_copy = RewardModel(str(path), batch_size=4, tokenizer=tok,
                          model=copy.deepcopy(load_scalar_model(str(path), tokenizer=tok)))
    assert rm["scores"] == on_copy(prompts, rm["responses"])
    loaded = make_reward_source(f"model:{path}", batch_size=4)(prompts, rm["responses"])
    torch.testing.assert_close(torch.tensor(rm["scores"]), torch.tensor(loaded), rtol=0, atol=2e-6)
    assert len({round(s, 6) for s in loaded}) > 10              # scores of different rows


@pytest.mark.slow
def test_ppo_on_ray_workers_equals_ppo_in_one_process(ray_results, tiny_base, tmp_path):
    """Two GRPO iterations with rollouts on 2 actors: the new weights reach the actors after the
    update (one broadcast), and every iteration's metrics and the final weights equal a local
    run's. The sampling log-probs (actors' copies) enter only the sampling-vs-training gap."""
    from safetensors.torch import load_file

    from alignkit.stages import ppo
    from alignkit.tracking import read_metrics
    from ray_session import ppo_overrides, ppo_prompts

    res, out, _ = ray_results
    ppo.main(load_config(ppo.Config, None, ppo_overrides(
        str(tiny_base), ppo_prompts(tmp_path / "prompts.jsonl"), tmp_path / "ppo")))
    assert res["ppo_broadcasts"] == 1
    remote, local = read_metrics(out / "ppo"), read_metrics(tmp_path / "ppo")
    assert len(remote) == len(local) == 2
    timing = {"iteration_s", "tokens_per_s", "time", "elapsed_s", "peak_rss_mb"}
    gap = {"logprob_gap_max", "logprob_gap_mean"}
    for r, l in zip(remote, local):
        assert set(r) == set(l)
        assert {k: v for k, v in r.items() if k not in timing | gap} == \
            {k: v for k, v in l.items() if k not in timing | gap}
        for k in gap & set(r):
            assert abs(r[k] - l[k]) <= 2e-6, k
    a = load_file(out / "ppo" / "model" / "model.safetensors")
    b = load_file(tmp_path / "ppo" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_base / "model.safetensors")
    assert max(float((a[k] - start[k]).abs().max()) for k in start) > 1e-3   # the update moved it
