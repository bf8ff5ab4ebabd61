"""The Ray half of tests/engine/test_workers.py, run as a script inside a loopback-only network
namespace (``unshare -n``): Ray listens on every interface, so it never runs in the test process.

``python ray_session.py MODEL_DIR OUT_DIR`` starts one local Ray instance (2 CPUs), samples,
scores with a reward model and judges through a pool of 2 actors and writes what came back to
``OUT_DIR/results.pt``, with a ``label`` run in ``OUT_DIR/label``, ``label-ai`` runs (a local judge
model, an HTTP judge) in ``OUT_DIR/label_ai*`` and a ``ppo`` run in ``OUT_DIR/ppo``; the test
compares all of it with the local backend's results.
"""

import hashlib
import json
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class FakeJudgeServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 whose verdicts are a function of
    the request: P("1") from a digest of the messages, given as top log-probs. The first attempt
    at every third request (by digest) is answered 503 with ``Retry-After: 0``, so retries happen
    and are counted. ``answered`` counts the 200 replies per request digest."""

    def __init__(self):
        answered: dict[str, int] = {}
        refused: set[str] = set()
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
                with lock:
                    refuse = int(key[:8], 16) % 3 == 0 and key not in refused
                    refused.add(key)
                    if not refuse:
                        answered[key] = answered.get(key, 0) + 1
                if refuse:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                q = (int(key[8:16], 16) % 999 + 1) / 1000.0
                alternatives = [{"token": "1", "logprob": math.log(q)},
                                {"token": "2", "logprob": math.log(1.0 - q)}]
                reply = json.dumps({
                    "choices": [{"message": {"content": "1" if q > 0.5 else "2"},
                                 "logprobs": {"content": [{"token": "1" if q > 0.5 else "2",
                                                           "top_logprobs": alternatives}]}}],
                    "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                              "completion_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.answered = answered
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def judge_yaml(path: Path, model_dir: str, pairs_dir: Path, out_dir: Path, http: str | None = None,
               workers: str = "local") -> Path:
    """A ``label-ai`` config: the tiny model as a local judge with chain-of-thought (rationales
    generated, then the verdict scored) in batches of 4, or an endpoint at ``http``."""
    judge = (f"  model: judge-model\n  backend: http\n  id: fake\n"
             f"  http: {{base_url: '{http}', concurrency: 2, backoff_s: 0.0, api_key_env: null}}\n"
             if http else
             f"  model: {model_dir}\n  batch_size: 4\n"
             f"  pairwise: {{chain_of_thought: true, rationale_max_tokens: 4}}\n")
    path.write_text(f"judge:\n{judge}label_ai:\n  pairs_dir: {pairs_dir}\n  out_dir: {out_dir}\n"
                    f"  workers: {{backend: {workers}, num: 2}}\n")
    return path


def ppo_overrides(model_dir: str, prompts: Path, out_dir: Path) -> list[str]:
    """Two GRPO iterations of the tiny model on a gold reward, with a step size large enough
    that the second iteration samples from visibly different weights."""
    return [f"model={model_dir}", "reward=gold:sentiment", f"rollout.prompts={prompts}",
            f"out_dir={out_dir}", "iterations=2", "ppo.algo=grpo", "rollout.prompts_per_iteration=4",
            "rollout.samples_per_prompt=2", "rollout.sampling.max_new_tokens=8",
            "rollout.batch_size=4", "ppo.epochs=1", "ppo.minibatch_size=8",
            "ppo.micro_batch_size=8", "optim.lr=5e-2", "report_to=none"]


def ppo_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Review {i}: the film" + " was" * (i % 3)}) + "\n"
                            for i in range(8)))
    return path


def tensors(rollout) -> dict:
    return {f: getattr(rollout, f) for f in FIELDS}


FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logps", "finished")


def cases(model_dir: str, out: Path) -> dict:
    import ray

    from alignkit.config import load_config
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.sampling import SamplingConfig, sample, sample_texts
    from alignkit.engine.workers import WorkersConfig, pool
    from alignkit.stages import label

    torch.set_num_threads(1)
    start = time.perf_counter()
    for attempt in range(3):
        # Ray waits a fixed 30 s for its raylet to register: on an overloaded machine it can miss.
        try:
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(out / "ray"),
                     log_to_driver=False)
            break
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == 2:
                raise
            print(f"ray.init: {error}; trying again", flush=True)
            ray.shutdown()
    res = {"init_s": time.perf_counter() - start}
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer=tokenizer).eval()
    workers = WorkersConfig(backend="ray", num=2)
    cfg = SamplingConfig(max_new_tokens=12)
    prompts = [f"the film was {w}" for w in ("good", "bad", "long", "odd", "fine", "dull")] * 4

    # 1. parity: 24 rows in 6 chunks of 4 on 2 actors (the first call ships the module)
    rollout, texts = sample_texts(model, tokenizer, prompts, cfg, chat=False, seed=3,
                                  batch_size=4, workers=workers)
    res["first"] = {"rollout": tensors(rollout), "texts": texts, "sync": pool(workers).stats.sync_kind}
    rollout, _ = sample_texts(model, tokenizer, prompts, cfg, chat=False, seed=3, batch_size=4,
                              workers=workers)
    res["again_sync"] = pool(workers).stats.sync_kind   # weights unchanged: nothing sent

    # 2. an in-place update (what an optimiser step does): the state dict is broadcast
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(1.0 + 0.05 * (i % 3))
    rollout, texts = sample_texts(model, tokenizer, prompts, cfg, chat=False, seed=3,
                                  batch_size=4, workers=workers)
    res["updated"] = {"rollout": tensors(rollout), "texts": texts,
                      "sync": pool(workers).stats.sync_kind}

    # 3. kill -9 of an actor mid-call: its chunk is sampled again by a replacement
    pids = pool(workers).pids()
    ids = [tokenizer(p)["input_ids"] for p in prompts * 4]
    started = threading.Event()

    def kill():
        started.wait()
        time.sleep(0.5)
        os.kill(pids[0], 9)
        res["killed_at_s"] = time.perf_counter() - t0

    threading.Thread(target=kill).start()
    t0 = time.perf_counter()
    started.set()
    rollout = sample(model, ids, SamplingConfig(max_new_tokens=24), eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, seed=11, batch_size=2, workers=workers)
    res["kill"] = {"ids": ids, "rollout": tensors(rollout), "call_s": time.perf_counter() - t0,
                   "restarts": pool(workers).stats.restarts, "pids_before": pids,
                   "pids_after": pool(workers).pids()}

    # 4. a stage, configured by dotted overrides as on the command line
    cfg = load_config(label.Config, None, [
        f"policy={model_dir}", f"out_dir={out / 'label'}", "train_prompts=12", "eval_prompts=4",
        "batch_size=4", "sampling.max_new_tokens=10", "workers.backend=ray", "workers.num=2"])
    label.main(cfg)

    # 5. label-ai with a local judge model (rationales sampled, verdicts scored on the actors)
    from alignkit.stages import judge, ppo

    judge.main(judge.load(str(judge_yaml(out / "judge.yaml", model_dir, out / "label",
                                         out / "label_ai", workers="ray")), []))
    res["label_ai_chunks"] = pool(workers).stats.chunks

    # 6. label-ai with an HTTP judge: the actors send the requests
    server = FakeJudgeServer()
    judge.main(judge.load(str(judge_yaml(out / "judge_http.yaml", model_dir, out / "label",
                                         out / "label_ai_http", http=server.url,
                                         workers="ray")), []))
    res["http_answered"] = dict(server.answered)
    server.close()

    # 7. reward-model scores: a tiny scalar-head model, batches of 4 on the actors
    from alignkit.engine.models import load_scalar_model
    from alignkit.engine.scoring import make_reward_source

    torch.manual_seed(0)
    rm = load_scalar_model(model_dir, tokenizer=tokenizer)
    rm.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")
    source = make_reward_source(f"model:{out / 'rm'}", batch_size=4, workers=workers)
    responses = [" it was" + " very" * (i // 3) + f" {w}." for i, w in enumerate(["good", "bad", "fine"] * 7)]
    res["rm"] = {"scores": source(prompts[:21], responses), "responses": responses,
                 "sync": pool(workers).stats.sync_kind, "chunks": pool(workers).stats.chunks}

    # 8. ppo (GRPO) end to end: the policy's new weights reach the actors after each update
    stats = pool(workers).stats
    before = stats.broadcasts
    ppo.main(load_config(ppo.Config, None, ppo_overrides(model_dir, ppo_prompts(out / "prompts.jsonl"),
                                                          out / "ppo")
                         + ["workers.backend=ray", "workers.num=2"]))
    res["ppo_broadcasts"] = stats.broadcasts - before
    start = time.perf_counter()
    ray.shutdown()
    res["shutdown_s"] = time.perf_counter() - start
    return res


if __name__ == "__main__":
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.save(cases(model_dir, out), out / "results.pt")
