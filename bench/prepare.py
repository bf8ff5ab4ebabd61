"""Build the benchmark's models, tokenizers and datasets (runs in the alignkit venv).

Nothing is downloaded: tokenizers are trained on the sentiment task's corpus with
``alignkit.engine.tokenizer.train_tokenizer``, models are built from configs with fixed seeds, and both are
written with ``save_pretrained`` so each side loads them with ``from_pretrained``. Datasets are
JSONL *text* records, so each side tokenises with its own data pipeline; the recorded ``length``
is the token count both pipelines should produce (BOS + prompt + completion + EOS), which the
workers check.

Usage: python bench/prepare.py --out bench/work [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# name -> (family, tokenizer vocab, architecture)
MODELS = {
    # GPT-2 shape, ~42M parameters (37.8M outside the embeddings), vocab 8192, 256 positions.
    "gpt2-40m": ("gpt2", 8192, dict(n_layer=12, n_embd=512, n_head=8, n_positions=256)),
    # The demo pipeline's base model shape (alignkit.stages.base.ArchConfig defaults).
    "llama-demo": ("llama", 1024, dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=4, intermediate_size=384,
                                       max_position_embeddings=256)),
    # --quick only: a tiny GPT-2 so the GPT-2 code paths run in the smoke test.
    "gpt2-tiny": ("gpt2", 1024, dict(n_layer=2, n_embd=64, n_head=4, n_positions=256)),
}


def build_model(name: str, tokenizer):
    import torch

    family, _, arch = MODELS[name]
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    vocab = MODELS[name][1]
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # Dropout off (as in current LLMs and the Llama shape): the benchmark times the same
        # arithmetic on both sides, and TRL's DPO would switch dropout off anyway.
        cfg = GPT2Config(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=True, **arch, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **arch, **ids)
        model = LlamaForCausalLM(cfg)
    return model


def model_meta(model) -> dict:
    """Parameter counts for the FLOP model (see bench/README.md, "MFU")."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    pos = 0
    if hasattr(model, "transformer") and hasattr(model.transformer, "wpe"):
        pos = model.transformer.wpe.weight.numel()
    d = model.get_input_embeddings().weight.shape[1]
    return {"n_params": total, "n_embedding": emb + pos, "n_nonembedding": total - emb - pos,
            "d_model": d, "vocab": cfg.vocab_size, "lm_head_params": d * cfg.vocab_size,
            "n_layer": getattr(cfg, "n_layer", getattr(cfg, "num_hidden_layers", None))}


class Words:
    """An endless stream of corpus words, each with its token count when preceded by a space.

    The byte-level pre-tokeniser splits text at spaces before BPE, so a text's token count is
    the sum of its words' counts: lengths can be hit exactly without re-tokenising.
    """

    def __init__(self, texts: list[str], tokenizer, seed: int):
        self.words = " ".join(texts).split()
        self.tok = tokenizer
        self.cache: dict[str, int] = {}
        self.pos = random.Random(seed).randrange(len(self.words))

    def count(self, word: str, first: bool = False) -> int:
        key = word if first else " " + word
        if key not in self.cache:
            self.cache[key] = len(self.tok(key, add_special_tokens=False)["input_ids"])
        return self.cache[key]

    def take(self, n_tokens: int, first: bool = False) -> tuple[str, int]:
        """Words whose tokens add up to at most ``n_tokens`` (at least one word)."""
        out, used = [], 0
        while True:
            w = self.words[self.pos % len(self.words)]
            c = self.count(w, first and not out)
            if out and used + c > n_tokens:
                break
            out.append(w)
            used += c
            self.pos += 1
        text = " ".join(out)
        return (text if first else " " + text), used


def n_tokens(tokenizer, prompt: str, completion: str) -> int:
    """Tokens of BOS + prompt + completion + EOS, as both data pipelines build them."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return len(p) + len(c) + 1


def make_data(words: Words, tokenizer, n_sft: int, n_pref: int, max_len: int, seed: int,
              prompts: list[str]) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    budget = max_len - 4  # room for BOS/EOS and a word that straddles the target
    sft, pref = [], []
    for _ in range(n_sft):
        prompt, p_tok = words.take(rng.randint(4, 16), first=True)
        completion, _ = words.take(rng.randint(max(budget // 4, 8), budget) - p_tok)
        sft.append({"prompt": prompt, "completion": completion,
                    "length": n_tokens(tokenizer, prompt, completion)})
    for _ in range(n_pref):
        prompt, p_tok = words.take(rng.randint(4, 16), first=True)
        chosen, _ = words.take(rng.randint(max(budget // 8, 8), budget) - p_tok)
        rejected, _ = words.take(rng.randint(max(budget // 8, 8), budget) - p_tok)
        pref.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_length": n_tokens(tokenizer, prompt, chosen),
                     "rejected_length": n_tokens(tokenizer, prompt, rejected)})
    for r in sft + pref:
        assert max(r.get("length", 0), r.get("chosen_length", 0),
                   r.get("rejected_length", 0)) <= max_len, r
    return {"sft": sft, "pref": pref, "prompts": [{"prompt": p} for p in prompts]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/work")
    ap.add_argument("--models", default="gpt2-40m,llama-demo")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--n-sft", type=int, default=256)
    ap.add_argument("--n-pref", type=int, default=128)
    ap.add_argument("--n-prompts", type=int, default=128)
    args = ap.parse_args()

    from alignkit.tasks import get_task
    from alignkit.engine.tokenizer import train_tokenizer

    out = Path(args.out)
    task = get_task("sentiment")
    texts = task.corpus(20000, seed=0)
    pool = task.prompts("train")
    prompts = [pool[i % len(pool)] for i in range(args.n_prompts)]
    tokenizers = {}
    manifest = {}
    for name in args.models.split(","):
        mdir, ddir = out / "models" / name, out / "data" / name
        stamp = mdir / "bench_meta.json"
        key = {"name": name, "arch": MODELS[name], "max_len": args.max_len, "n_sft": args.n_sft,
               "n_pref": args.n_pref, "n_prompts": args.n_prompts, "version": 1}
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == json.loads(json.dumps(key)):
            manifest[name] = json.loads(stamp.read_text())
            continue
        vocab = MODELS[name][1]
        if vocab not in tokenizers:
            tokenizers[vocab] = train_tokenizer(texts, vocab_size=vocab)
        tok = tokenizers[vocab]
        model = build_model(name, tok)
        mdir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(mdir))
        tok.save_pretrained(str(mdir))
        words = Words(texts, tok, seed=1)
        data = make_data(words, tok, args.n_sft, args.n_pref, args.max_len, seed=2, prompts=prompts)
        ddir.mkdir(parents=True, exist_ok=True)
        for kind, rows in data.items():
            with open(ddir / f"{kind}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        meta = {"key": key, "tokenizer_size": len(tok), **model_meta(model)}
        stamp.write_text(json.dumps(meta, indent=1))
        manifest[name] = meta
        print(f"prepared {name}: {meta['n_params'] / 1e6:.2f}M params "
              f"({meta['n_nonembedding'] / 1e6:.2f}M non-embedding), tokenizer {len(tok)}", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
