"""Ray workers (sampling, reward-model scoring, AI judging) against local, and what each Ray call
costs.

    unshare -n sh -c 'ip link set lo up; exec python bench/ray_workers.py'

Ray listens on every network interface: run this only inside a loopback-only network namespace,
as above (root). Needs ``bench/work/full`` (``python bench/prepare.py --out bench/work/full``).

Measured, in one process, each configuration in turn for ``--rounds`` rounds (median reported):

* **throughput** of ReST's Grow (``sample_texts``, ``--prompts`` x ``--k`` rows in chunks of
  ``--batch``) and of ``label``'s sampling (``sample_pairs``, two responses per prompt) on the
  demo model: local with 2 torch threads, local with 1, and Ray with 1 and 2 actors (1 torch
  thread each); response tokens per second.
* **throughput** of ``label-ai`` with a local judge (the demo model as the judge, text format,
  verdicts scored in batches of ``--batch``, both orders: ``2 x --prompts x --k / 2`` requests on
  pairs of sampled responses; pairs per second) and of reward-model scoring (the demo model with a
  scalar head on the Grow rows; rows per second), in the same four configurations.
* **per-call costs**: an empty actor round trip; the weight broadcast (``ray.put`` of the state
  dict, then every actor loads it) for the demo model and the 40M GPT-2, and the first sync that
  ships the whole module; the transfer of a chunk's result (a ``Rollout`` of ``--batch`` rows).

Prints one JSON object; ``--out FILE`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent / "work" / "full"


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="llama-demo",
                    help="the prepared model that samples, judges and scores (llama-demo, gpt2-40m)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: --prompts 8 --k 2 --batch 4 --new-tokens 8 --rounds 1, no "
                         "per-call costs")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.k, args.batch, args.new_tokens, args.rounds = 8, 2, 4, 8, 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The raylet waits this long for its agents; they start slowly on a loaded 2-core machine.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")

    import ray

    from alignkit.engine.generation import Rollout
    from alignkit.engine.judges import JudgeConfig, LocalBackend, PairwiseJudge
    from alignkit.engine.models import load_scalar_model
    from alignkit.engine.scoring import RewardModel
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.sampling import SamplingConfig, sample_pairs, sample_texts
    from alignkit.engine.workers import WorkersConfig, pool, state_arrays
    from alignkit.tasks import get_task

    # 4 logical CPUs on 2 cores: the 1- and 2-actor pools live side by side (an idle actor uses
    # no CPU), so the configurations alternate without restarting actors.
    start = time.perf_counter()
    for attempt in range(4):
        # Ray's raylet gives its agents a fixed time to start: on a loaded machine it can miss.
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _temp_dir=str(Path(args.work) / "ray"))
            break
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == 3:
                raise
            ray.shutdown()
    result = {"machine": "2-core AMD EPYC, AVX2 only, fp32", "ray_init_s": time.perf_counter() - start,
              "args": vars(args)}
    tok = load_tokenizer(f"{args.work}/models/{args.model}")
    model = load_causal_lm(f"{args.work}/models/{args.model}", tokenizer=tok).eval()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)
    prompts = get_task("sentiment").prompts("train", args.prompts)
    grow_rows = [p for p in prompts for _ in range(args.k)]
    one, two = WorkersConfig(backend="ray", num=1), WorkersConfig(backend="ray", num=2)
    for w in (one, two):   # start the actors and ship the module once (timed below separately)
        sample_texts(model, tok, grow_rows[:4], cfg, chat=False, seed=0, batch_size=2, workers=w)

    configs = {"local, 2 threads": (2, None), "local, 1 thread": (1, None),
               "ray, 1 actor x 1 thread": (1, one), "ray, 2 actors x 1 thread": (1, two)}
    demo = f"{args.work}/models/{args.model}"
    judge_cfg = JudgeConfig(model=demo, format="text", batch_size=args.batch)
    judges = {w: PairwiseJudge(judge_cfg, backend=LocalBackend(demo, args.batch, model=model,
                                                               tokenizer=tok, workers=w))
              for _, w in configs.values()}
    torch.manual_seed(0)
    rm_model = load_scalar_model(demo, tokenizer=tok).eval()
    scorers = {w: RewardModel(demo, batch_size=args.batch, model=rm_model, tokenizer=tok, workers=w)
               for _, w in configs.values()}
    pair_prompts = prompts * (args.k // 2)
    pairs = sample_pairs(model, tok, pair_prompts, cfg, chat=False, seed=1, batch_size=args.batch)
    pair_a, pair_b = [p["response_a"] for p in pairs], [p["response_b"] for p in pairs]
    grow_texts = sample_texts(model, tok, grow_rows, cfg, chat=False, seed=2,
                              batch_size=args.batch)[1]
    for w in (one, two):   # ship the judge's and the reward model's modules once
        judges[w].judge(pair_prompts[:2], pair_a[:2], pair_b[:2])
        scorers[w](grow_rows[:2], grow_texts[:2])

    def grow(workers):
        rollout, _ = sample_texts(model, tok, grow_rows, cfg, chat=False, seed=0,
                                  batch_size=args.batch, workers=workers)
        return int(rollout.response_mask.sum())

    def label(workers):
        sample_pairs(model, tok, prompts * (args.k // 2), cfg, chat=False, seed=0,
                     batch_size=args.batch, workers=workers)

    def label_ai(workers):
        judges[workers].judge(pair_prompts, pair_a, pair_b)

    def rm_scores(workers):
        scorers[workers](grow_rows, grow_texts)

    tokens = grow(None)
    work = {"grow": grow, "label": label, "label-ai": label_ai, "rm scoring": rm_scores}
    times = {(what, name): [] for what in work for name in configs}
    for _ in range(args.rounds):
        for name, (threads, workers) in configs.items():
            torch.set_num_threads(threads)
            for what, fn in work.items():
                start = time.perf_counter()
                fn(workers)
                times[(what, name)].append(time.perf_counter() - start)
    torch.set_num_threads(2)
    result["rows"] = len(grow_rows)
    result["response_tokens"] = tokens
    result["judged_pairs"] = len(pair_prompts)
    units = {"grow": ("tokens_per_s", tokens), "label": ("tokens_per_s", tokens),
             "label-ai": ("pairs_per_s", len(pair_prompts)), "rm scoring": ("rows_per_s", len(grow_rows))}
    result["throughput"] = {
        f"{what}: {name}": {"seconds": statistics.median(t),
                            units[what][0]: units[what][1] / statistics.median(t), "all_seconds": t}
        for (what, name), t in times.items()}
    if args.quick:
        ray.shutdown()
        print(json.dumps(result, indent=1))
        return

    # --- per-call costs
    actor = pool(two).actors[0]
    result["actor_round_trip_ms"] = 1e3 * median_time(lambda: ray.get(actor.ping.remote()), 50)

    @ray.remote(num_cpus=0)
    def rollout_of(rows: int, width: int) -> Rollout:
        z = torch.zeros(rows, width, dtype=torch.long)
        return Rollout(z, z, z, z, torch.zeros(rows, width), torch.zeros(rows, dtype=torch.bool))

    @ray.remote(num_cpus=0)
    def nothing() -> None:
        return None

    ray.get([rollout_of.remote(1, 1), nothing.remote()])
    task_ms = 1e3 * median_time(lambda: ray.get(nothing.remote()), 20)
    result["result_transfer_ms"] = {
        "empty task": task_ms,
        f"rollout {args.batch} x {16 + args.new_tokens}": 1e3 * median_time(
            lambda: ray.get(rollout_of.remote(args.batch, 16 + args.new_tokens)), 20)}

    broadcast = {}
    for name in ("llama-demo", "gpt2-40m"):
        m = load_causal_lm(f"{args.work}/models/{name}").eval()
        nbytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        p = pool(two)
        p._sync(m)
        first = p.stats.sync_seconds
        puts, syncs = [], []
        for i in range(args.rounds):
            with torch.no_grad():
                next(m.parameters()).add_(0.0)     # a new version, as after an optimiser step
            start = time.perf_counter()
            ray.put(state_arrays(m))
            puts.append(time.perf_counter() - start)
            with torch.no_grad():
                next(m.parameters()).add_(0.0)
            p._sync(m)
            assert p.stats.sync_kind == "weights"
            syncs.append(p.stats.sync_seconds)
        broadcast[name] = {"state_dict_MB": nbytes / 2**20, "first_sync_module_s": first,
                           "put_s": statistics.median(puts),
                           "broadcast_2_actors_s": statistics.median(syncs)}
    result["weight_broadcast"] = broadcast
    ray.shutdown()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
