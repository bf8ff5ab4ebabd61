"""The Ray half of tests/engine/test_workers.py, run as a script inside a loopback-only network
namespace (``unshare -n``): Ray listens on every interface, so it never runs in the test process.

``python ray_session.py MODEL_DIR OUT_DIR`` starts one local Ray instance (2 CPUs), samples
through a pool of 2 actors and writes what came back to ``OUT_DIR/results.pt`` (and a ``label``
run to ``OUT_DIR/label``); the test compares all of it with the local backend's results.
"""

import os
import sys
import threading
import time
from pathlib import Path

import torch


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
    start = time.perf_counter()
    ray.shutdown()
    res["shutdown_s"] = time.perf_counter() - start
    return res


if __name__ == "__main__":
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.save(cases(model_dir, out), out / "results.pt")
