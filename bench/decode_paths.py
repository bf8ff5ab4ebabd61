"""Sampling paths side by side in one process: ``python bench/decode_paths.py --model llama-demo``.

Calls transformers' ``generate`` and alignkit's four decoding paths (the model's forward or the
decoder's step, eager or compiled) in turn on the same prompts, ``--rounds`` times, after one
warm-up call each (which pays any compilation), and prints each path's median seconds per call and
``generate``'s median over it. Interleaving in one process makes the ratios steadier than separate
processes on a noisy machine. ``--device cuda --dtype bf16`` runs both sides on the GPU with bf16
weights; ``--paths`` picks some of the paths (``generate`` always runs: it is the baseline;
``generate-compiled`` adds transformers' own fast path, a static cache and the model's forward
through ``torch.compile``);
``--group K`` samples each of ``batch / K`` prompts ``K`` times (GRPO/RLOO), ``--prompt-tokens``
lengthens the prompts (their text repeated). Needs ``bench/work/full`` (``python bench/prepare.py``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from alignkit.data.formats import encode_prompt
from alignkit.engine.generation import generate
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.models import load_causal_lm, load_tokenizer


def bench_prompts(work: str, model: str, tok, rows: int, group: int = 1,
                  prompt_tokens: int = 0) -> list[list[int]]:
    """``rows`` prompts of the benchmark's model ``model``, token ids: ``rows / group`` of its
    prompts, each ``group`` times in a row (GRPO/RLOO's samples per prompt), each lengthened to
    ``prompt_tokens`` tokens (its ids repeated) if given."""
    with open(f"{work}/data/{model}/prompts.jsonl") as f:
        texts = [json.loads(line)["prompt"] for line in f][:rows // group]
    prompts = [encode_prompt(t, tok) for t in texts for _ in range(group)]
    if prompt_tokens:
        prompts = [(p * (prompt_tokens // len(p) + 1))[:prompt_tokens] for p in prompts]
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-demo")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "full"))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--paths", default="forward,step,forward-compiled,step-compiled",
                    help="alignkit paths to run, comma-separated (default: all four); "
                         "generate-compiled adds transformers' generate with a static cache and "
                         "its forward compiled")
    ap.add_argument("--group", type=int, default=1,
                    help="samples per prompt: batch / group prompts, each repeated (GRPO/RLOO)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="lengthen prompts to this many tokens")
    args = ap.parse_args()

    model_dir = f"{args.work}/models/{args.model}"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer=tok).eval().to(args.device, dtype)
    peer = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(args.device, dtype)
    prompts = bench_prompts(args.work, args.model, tok, args.batch, args.group, args.prompt_tokens)
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(args.device)
    generator = torch.Generator(args.device).manual_seed(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def alignkit(fast: bool, compile: bool):
        cfg = SamplingConfig(max_new_tokens=args.new_tokens, compile=compile)
        return lambda: generate(model, prompts, cfg, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, generator=generator, fast_decode=fast)

    def hf_generate(model=peer, **options):
        with torch.inference_mode():  # the bench's peer settings: plain sampling, no top-k
            model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **options)

    ours = {"forward": ("forward, eager", False, False), "step": ("decoder step, eager", True, False),
            "forward-compiled": ("forward, compiled", False, True),
            "step-compiled": ("decoder step, compiled", True, True)}
    paths = {"generate": hf_generate}
    for key in args.paths.split(","):
        if key == "generate-compiled":
            # transformers' documented fast path: a static cache and the model's forward through
            # torch.compile (its automatic compilation in generate() is for accelerators only).
            compiled = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(args.device, dtype)
            compiled.forward = torch.compile(compiled.forward)
            paths["generate, static cache, compiled"] = functools.partial(
                hf_generate, compiled, cache_implementation="static")
            continue
        name, fast, compile = ours[key]
        paths[name] = alignkit(fast, compile)
    for call in paths.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, call in paths.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["generate"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{args.model} {args.device} {args.dtype}  {name:33s} median {median:.3f} s  "
              f"min {min(values):.3f} s  generate / this {base / median:.2f}x")


if __name__ == "__main__":
    main()
