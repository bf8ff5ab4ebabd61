"""A policy's forward and backward over a rollout, padded and packed (``ppo.packing``), in turn in
one process: ``python bench/rollout_packing.py [--full] [--group 4 [--prompt-tokens 128]]``.

Samples ``--rows`` responses of up to ``--new-tokens`` from the benchmark's demo-shaped model, then
cuts each to a length drawn uniformly from ``[new_tokens / 6, new_tokens]`` (the demo's responses
average 60% of the maximum; ``--full`` keeps every row at the maximum), and times
``rollout_logps`` + backward each way, ``--rounds`` times, after a warm-up: median seconds.
``--group K``: ``rows / K`` prompts, each sampled ``K`` times (GRPO/RLOO's groups), which adds
the layout with each prompt written once for its group (``pack="shared"``); ``--prompt-tokens``
lengthens every prompt to that many tokens (its text repeated). Needs ``bench/work/full``
(``python bench/prepare.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from alignkit.engine.attention import flat_packing
from alignkit.engine.generation import Rollout, generate, rollout_logps
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.models import load_causal_lm, load_tokenizer
from decode_paths import bench_prompts  # bench/ is the script's folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-demo")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "full"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--full", action="store_true", help="every response at the maximum length")
    ap.add_argument("--group", type=int, default=1, help="samples per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="lengthen prompts to this many tokens")
    args = ap.parse_args()

    model_dir = f"{args.work}/models/{args.model}"
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer=tok).eval()
    assert flat_packing(model)
    prompts = bench_prompts(args.work, args.model, tok, args.rows, args.group, args.prompt_tokens)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=args.new_tokens),
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    lengths = torch.randint(n // 6, n + 1, (args.rows,), generator=torch.Generator().manual_seed(1))
    lengths[0] = n
    if args.full:
        lengths[:] = n
    mask = (torch.arange(r.response_ids.size(1))[None] < lengths[:, None]).long()
    r = Rollout(r.prompt_ids, r.prompt_mask, r.response_ids, mask, r.logps * mask, r.finished)
    print(f"{args.rows} rows, responses {float(mask.sum(1).float().mean()):.1f} of {n} tokens on "
          f"average, prompts padded to {r.prompt_ids.size(1)}")
    model.train()

    def step(pack) -> float:
        start = time.perf_counter()
        (rollout_logps(model, r, 1.0, pack) * r.response_mask).sum().backward()
        return time.perf_counter() - start

    layouts = {"padded": False, "packed": True} | ({"shared": "shared"} if args.group > 1 else {})
    for pack in layouts.values():
        step(pack)
    times = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, pack in layouts.items():
            times[name].append(step(pack))
    median = {name: statistics.median(t) for name, t in times.items()}
    print("forward + backward: " + ", ".join(f"{name} {t:.3f} s ({t / median['padded']:.2f} of padded)"
                                             for name, t in median.items()))


if __name__ == "__main__":
    main()
