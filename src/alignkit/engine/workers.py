"""Where sampling runs: in this process (``local``) or on a pool of Ray actors (``ray``).

Every stage samples through :func:`alignkit.engine.sampling.sample` (or ``sample_texts`` /
``sample_pairs`` on top of it), which derives one seed per prompt row and hands the call to the
backend of :data:`WORKER_BACKENDS` named by ``WorkersConfig.backend``. Stages pass their
``workers`` section down as a value and never see Ray.

``ray``: the rows of a call are cut into the chunks the local backend makes (``batch_size`` rows
each, in order); each chunk goes to a free actor, which runs the sampling backend
``BACKENDS[sampling.engine]`` on its own copy of the model, and the results are put back in chunk
order. A row's draw depends only on its prompt, its seed and the weights (the contract of
:data:`~alignkit.engine.sampling.BACKENDS`), and every chunk holds the same rows as locally, so a
run on N actors returns the same tensors as the local backend.

The learner stays in the driver; actors hold copies of its model. The first call with a model
sends the whole module through the object store (one ``ray.put``; each actor deserialises its
own copy); later calls compare :func:`weights_version` (per parameter and buffer: its version
counter, which in-place writes such as ``load_state_dict`` or ``copy_`` bump; its storage; and
the optimiser steps that updated it, counted by a global step hook, because torch's fused AdamW,
what the training loop uses, writes parameters without bumping their counters) with that of the
last sync and, when it changed, broadcast the state dict once (one ``ray.put`` of numpy arrays,
read by the actors of a node from shared memory without a copy) for each actor to load. A write
through ``tensor.data`` changes none of these: call :func:`weights_changed` after one.

Reward models and judge models go the same way (:func:`map_chunks`): the actors hold each module
the driver sends in a slot of its own, so a policy, a reward model and a judge model are each sent
once and re-sent only when their own weights change.

An actor that dies mid-call (its process killed, its node lost) is noticed when its chunk's result
is collected (``RayActorError``, or ``OutOfMemoryError`` when Ray's memory monitor killed it): a
replacement is started, loads the current weights, and the chunk is dispatched again; every
chunk's result is kept once, by its index, so nothing is lost or duplicated.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch

from alignkit.config import require
from alignkit.engine.generation import Rollout

_ADDRESS = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5})$")


class WorkerBackend(Protocol):
    """Where the work of a call runs. ``sample`` runs ``backend`` (a sampling backend, e.g.
    ``sampling.BACKENDS[cfg.engine]``, handed down by the sampling entry point so that this layer
    never looks sampling up) on the rows; ``map`` runs ``fn(model, *chunk)`` on each chunk (a
    frozen module's function over rows: reward-model scores, a judge's verdict log-probs, a batch
    of HTTP requests with ``model=None``) and returns the results in chunk order."""

    def sample(self, backend, model, prompt_ids: list[list[int]], cfg, *, eos_token_id: int,
               pad_token_id: int, seeds: list[int], batch_size: int | None,
               workers: WorkersConfig) -> Rollout: ...

    def map(self, fn, model, chunks: list[tuple], workers: WorkersConfig) -> list: ...


class _Local:
    """This process: the sampling backend on all rows at once (it chunks by ``batch_size``),
    ``fn`` on the chunks one after the other."""

    @staticmethod
    def sample(backend, model, prompt_ids, cfg, *, eos_token_id, pad_token_id, seeds, batch_size,
               workers):
        return backend(model, prompt_ids, cfg, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, seeds=seeds, batch_size=batch_size)

    @staticmethod
    def map(fn, model, chunks, workers):
        return [fn(model, *chunk) for chunk in chunks]


class _Ray:
    """The chunks on the actors of the Ray pool of ``workers``."""

    @staticmethod
    def sample(backend, model, prompt_ids, cfg, *, eos_token_id, pad_token_id, seeds, batch_size,
               workers):
        return pool(workers).sample(backend, model, prompt_ids, cfg, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, seeds=seeds, batch_size=batch_size)

    @staticmethod
    def map(fn, model, chunks, workers):
        return pool(workers).map(fn, model, chunks)


WORKER_BACKENDS: dict[str, WorkerBackend] = {"local": _Local(), "ray": _Ray()}


@dataclass(frozen=True)
class WorkersConfig:
    """Where sampling runs (see the module docstring).

    ``address`` (ray): ``auto`` joins the cluster named by ``RAY_ADDRESS`` or the one ``ray start``
    runs on this machine, else starts one in this process; ``local`` always starts one in this
    process; ``HOST:PORT`` (or ``ray://HOST:PORT``, Ray Client) joins that cluster's head.
    """

    backend: str = "local"
    num: int = 2                    # actors (ray)
    address: str = "auto"
    cpus_per_worker: float = 1.0    # Ray CPUs each actor reserves
    threads: int = 1                # torch threads in each actor
    gpus_per_worker: float = 0.0    # > 0: each actor reserves that share of a GPU and samples on it
    max_restarts: int = 4           # actors replaced within one call before it fails

    def __post_init__(self):
        require(self.backend in WORKER_BACKENDS,
                f"workers.backend must be one of {sorted(WORKER_BACKENDS)}, got {self.backend!r}")
        require(_is_int(self.num) and self.num >= 1, f"workers.num must be an int >= 1, got {self.num!r}")
        require(isinstance(self.address, str) and bool(_ADDRESS.match(self.address)),
                f"workers.address must be auto, local or HOST:PORT, got {self.address!r}")
        require(_is_num(self.cpus_per_worker) and self.cpus_per_worker >= 0,
                f"workers.cpus_per_worker must be a number >= 0, got {self.cpus_per_worker!r}")
        require(_is_int(self.threads) and self.threads >= 1,
                f"workers.threads must be an int >= 1, got {self.threads!r}")
        require(_is_num(self.gpus_per_worker) and self.gpus_per_worker >= 0,
                f"workers.gpus_per_worker must be a number >= 0, got {self.gpus_per_worker!r}")
        require(_is_int(self.max_restarts) and self.max_restarts >= 0,
                f"workers.max_restarts must be an int >= 0, got {self.max_restarts!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def run(backend, model, prompt_ids: list[list[int]], cfg, *, eos_token_id: int,
        pad_token_id: int, seeds: list[int], batch_size: int | None,
        workers: WorkersConfig | None) -> Rollout:
    """Sample ``prompt_ids`` (row ``i`` with seed ``seeds[i]``) with the sampling backend
    ``backend`` where ``workers`` says."""
    workers = workers or WorkersConfig()
    return WORKER_BACKENDS[workers.backend].sample(
        backend, model, prompt_ids, cfg, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        seeds=seeds, batch_size=batch_size, workers=workers)


def map_chunks(fn, model, chunks: list[tuple], workers: WorkersConfig | None) -> list:
    """``[fn(model, *chunk) for chunk in chunks]`` where ``workers`` says: in this process, or
    each chunk on a Ray actor holding a copy of ``model`` (sent once per weights version; None:
    no model). ``fn`` must be a module-level function (it travels by reference), read ``model``
    only, and return what is the same on any device (CPU tensors, floats)."""
    workers = workers or WorkersConfig()
    return WORKER_BACKENDS[workers.backend].map(fn, model, chunks, workers)


# ----------------------------------------------------------------------------- chunks


def chunk_bounds(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of ``n`` rows: ``batch_size`` rows each, in order (one
    chunk of all rows without a ``batch_size``), as the local backend cuts them."""
    step = batch_size or n
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of ``parts`` in order, as the local backend builds it from its chunks:
    prompts left-padded to the widest, responses right-padded to the longest."""
    width = max(p.prompt_ids.size(1) for p in parts)
    length = max(p.response_ids.size(1) for p in parts)
    F = torch.nn.functional

    def cat(name, value, left):
        return torch.cat([F.pad(t := getattr(p, name),
                                (width - t.size(1), 0) if left else (0, length - t.size(1)),
                                value=value) for p in parts])

    return Rollout(prompt_ids=cat("prompt_ids", pad_token_id, True),
                   prompt_mask=cat("prompt_mask", 0, True),
                   response_ids=cat("response_ids", pad_token_id, False),
                   response_mask=cat("response_mask", 0, False), logps=cat("logps", 0.0, False),
                   finished=torch.cat([p.finished for p in parts]))


# ----------------------------------------------------------------------------- weights


_STEPS = "_alignkit_optimizer_steps"
_watching: list[bool] = []


def _count_steps(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            setattr(p, _STEPS, getattr(p, _STEPS, 0) + 1)


def watch_optimizer_steps() -> None:
    """Count, on each parameter, the optimiser steps that updated it (a global step hook,
    registered once): torch's fused AdamW writes parameters without bumping their version
    counters, so the counters alone miss a training step."""
    if not _watching:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_steps)
        _watching.append(True)


def weights_version(model) -> tuple[tuple[int, int, int], ...]:
    """Per parameter and buffer of ``model``: its version counter (any in-place write through
    autograd-visible ops: ``copy_``, ``load_state_dict``, non-fused optimiser steps), its storage
    (``p.data = ...``) and the optimiser steps that updated it (:func:`watch_optimizer_steps`)."""
    return tuple((t.data_ptr(), t._version, getattr(t, _STEPS, 0))
                 for t in (*model.parameters(), *model.buffers()))


def weights_changed(model) -> None:
    """Tell the pools that ``model``'s weights changed by a write they cannot see (``.data``)."""
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0)   # bumps the version counter, values unchanged


def state_arrays(model) -> dict[str, tuple[str, object]]:
    """``name -> (dtype, numpy array)`` of ``model``'s state dict on the CPU; dtypes numpy lacks
    (bfloat16) travel as the same bits in an integer array. Numpy arrays go through Ray's object
    store without a copy on the reading side."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        try:
            out[name] = (str(t.dtype), t.numpy())
        except TypeError:
            out[name] = (str(t.dtype), t.view(_same_width_int(t.dtype)).numpy())
    return out


def _same_width_int(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def load_state_arrays(model, arrays: dict[str, tuple[str, object]]) -> None:
    """Load what :func:`state_arrays` made into ``model`` (in place, strict)."""
    import warnings

    state = {}
    with warnings.catch_warnings():   # object-store arrays are read-only; load_state_dict copies
        warnings.simplefilter("ignore", UserWarning)
        for name, (dtype, array) in arrays.items():
            t = torch.from_numpy(array)
            want = getattr(torch, dtype.removeprefix("torch."))
            state[name] = t if t.dtype == want else t.view(want)
        model.load_state_dict(state, strict=True)


def _cpu_module(model):
    """What the first sync sends: the module itself, or a CPU copy of one on another device."""
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices <= {"cpu"}:
        return model
    import copy

    return copy.deepcopy(model).cpu()


_CAPTURING_HOOK = "install_output_capuring_hook.<locals>.output_capturing_hook"


@contextlib.contextmanager
def _without_capturing_hooks(model):
    """``model`` without the forward hooks transformers installs on the first forward that asks
    for hidden states or attentions (closures over a ``ContextVar``, which no pickler can send),
    and without the flag that says they are installed, so that a copy made meanwhile installs
    its own when it needs them; both are put back on exit."""
    hooked, flags = [], []
    for module in model.modules():
        hooks = module._forward_hooks
        if any(getattr(h, "__qualname__", "") == _CAPTURING_HOOK for h in hooks.values()):
            hooked.append((module, hooks))
            module._forward_hooks = collections.OrderedDict(
                (k, h) for k, h in hooks.items() if getattr(h, "__qualname__", "") != _CAPTURING_HOOK)
        if module.__dict__.pop("_output_capturing_hooks_installed", None) is not None:
            flags.append(module)
    try:
        yield model
    finally:
        for module, hooks in hooked:
            module._forward_hooks = hooks
        for module in flags:
            module._output_capturing_hooks_installed = True


# ----------------------------------------------------------------------------- the actor


class WorkerActor:
    """One Ray actor: copies of the driver's frozen modules (the policy, a reward model, a judge),
    each in a numbered slot with the weights version it holds, and one task, :meth:`call`, that
    runs a function of one of them over a chunk of rows (its methods run remotely)."""

    def __init__(self, threads: int, use_gpu: bool):
        from alignkit.engine.attention import register

        torch.set_num_threads(threads)
        # A module may name alignkit's attention (packed training switches the policy to it);
        # transformers looks it up by name in a registry of this process, so register it here.
        register()
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.models: dict[int, torch.nn.Module] = {}
        self.versions: dict[int, int] = {}

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> dict[int, int]:
        return dict(self.versions)

    def load_module(self, slot: int, module, version: int) -> int:
        self.models[slot] = module.to(self.device)
        self.versions[slot] = version
        return version

    def load_weights(self, slot: int, arrays, version: int) -> int:
        load_state_arrays(self.models[slot], arrays)
        self.versions[slot] = version
        return version

    def drop(self, slot: int) -> None:
        self.models.pop(slot, None)
        self.versions.pop(slot, None)

    def call(self, fn, slot: int | None, version: int, training: bool, args: tuple):
        """``fn(model, *args)`` with the module of ``slot`` (None: ``fn(None, *args)``)."""
        model = None
        if slot is not None:
            if self.versions.get(slot) != version:
                raise RuntimeError(f"worker actor holds weights v{self.versions.get(slot)} in "
                                   f"slot {slot}, the call needs v{version}")
            model = self.models[slot]
            model.train(training)
        return fn(model, *args)


def _sample_chunk(model, backend, prompt_ids, cfg, eos_token_id: int, pad_token_id: int,
                  seeds: list[int], batch_size: int | None) -> Rollout:
    """The sampling backend on one chunk, its tensors on the CPU (the task of a sampling call)."""
    rollout = backend(model, prompt_ids, cfg, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, seeds=seeds, batch_size=batch_size)
    return Rollout(**{f: getattr(rollout, f).cpu() for f in (
        "prompt_ids", "prompt_mask", "response_ids", "response_mask", "logps", "finished")})


# ----------------------------------------------------------------------------- the pool


@dataclass
class PoolStats:
    """What the last call cost (seconds) and did; read by the benchmarks."""

    chunks: int = 0
    restarts: int = 0
    sync_seconds: float = 0.0       # ray.put + every actor loaded (0 when the weights were current)
    sync_kind: str = ""             # "module", "weights" or "" (none)
    call_seconds: float = 0.0       # dispatch to the last chunk's result deserialised
    restarts_total: int = 0
    broadcasts: int = 0             # weight broadcasts ("weights" syncs) since the pool started


@dataclass
class _Held:
    """A module the actors hold a copy of, in slot ``slot`` at weights ``version``."""

    model: weakref.ref
    slot: int
    seen: tuple
    version: int
    module_ref: object
    weights_ref: object = None


def _dead_actor_errors() -> tuple[type[Exception], ...]:
    """What a call on an actor raises when the actor's process is gone: killed or crashed
    (``RayActorError``, ``WorkerCrashedError``), or killed by Ray's memory monitor
    (``OutOfMemoryError``)."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    return RayActorError, WorkerCrashedError, OutOfMemoryError


class RayPool:
    """``workers.num`` :class:`WorkerActor` s on a Ray cluster (joined or started on first use).

    Sampling, scoring and judging share one path: :meth:`map` brings the actors to the module's
    current weights (:meth:`_sync`), sends each chunk to a free actor, replaces an actor that
    died and runs its chunk again, and returns the results in chunk order."""

    def __init__(self, workers: WorkersConfig):
        import ray

        if not ray.is_initialized():
            ray.init(address=None if workers.address == "auto" else workers.address,
                     include_dashboard=False, log_to_driver=False)
        watch_optimizer_steps()
        self.workers = workers
        self._remote = ray.remote(WorkerActor).options(
            num_cpus=workers.cpus_per_worker, num_gpus=workers.gpus_per_worker)
        self.actors = [self._start() for _ in range(workers.num)]
        self._held: list[_Held] = []
        self.version = -1               # the last weights version sent (of any slot)
        self._slots = 0
        self.stats = PoolStats()

    def _start(self):
        return self._remote.remote(self.workers.threads, self.workers.gpus_per_worker > 0)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # -- weights

    def _sync(self, model) -> _Held:
        """Bring every actor to ``model``'s current weights (a no-op when they hold them); the
        slot holding it. A module the driver no longer holds is dropped from the actors."""
        import ray

        for gone in [h for h in self._held if h.model() is None]:
            self._held.remove(gone)
            for a in self.actors:
                a.drop.remote(gone.slot)
        seen = weights_version(model)
        held = next((h for h in self._held if h.model() is model), None)
        if held is not None and seen == held.seen:
            self.stats.sync_kind = ""
            self.stats.sync_seconds = 0.0
            return held
        start = time.perf_counter()
        self.version += 1
        if held is not None:
            held.weights_ref = ray.put(state_arrays(model))
            loads = [a.load_weights.remote(held.slot, held.weights_ref, self.version)
                     for a in self.actors]
            self.stats.sync_kind = "weights"
            self.stats.broadcasts += 1
        else:
            with _without_capturing_hooks(_cpu_module(model)) as module:
                module_ref = ray.put(module)
            held = _Held(weakref.ref(model), self._slots, seen, self.version, module_ref)
            self._slots += 1
            self._held.append(held)
            loads = [a.load_module.remote(held.slot, held.module_ref, self.version)
                     for a in self.actors]
            self.stats.sync_kind = "module"
        held.seen, held.version = seen, self.version
        for i, ref in enumerate(loads):
            try:
                ray.get(ref)
            except _dead_actor_errors():   # died since the last call: a replacement loads the same
                self._replace(i)
        self.stats.sync_seconds = time.perf_counter() - start
        return held

    def _replace(self, i: int) -> None:
        """A new actor in slot ``i`` holding every module at its current weights (its calls
        queue behind the loads)."""
        import ray

        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:   # already gone
            pass
        actor = self._start()
        for h in self._held:
            if h.weights_ref is None:
                actor.load_module.remote(h.slot, h.module_ref, h.version)
            else:
                actor.load_module.remote(h.slot, h.module_ref, -1)
                actor.load_weights.remote(h.slot, h.weights_ref, h.version)
        self.actors[i] = actor

    # -- calls

    def map(self, fn, model, chunks: list[tuple]) -> list:
        """``fn(copy of model, *chunk)`` for each chunk on the actors, results in chunk order."""
        import ray

        held = self._sync(model) if model is not None else None
        slot, version = (held.slot, held.version) if held is not None else (None, -1)
        training = bool(model is not None and model.training)
        start = time.perf_counter()
        results: list = [None] * len(chunks)
        queue = collections.deque(range(len(chunks)))
        idle = collections.deque(range(len(self.actors)))
        pending = {}
        restarts = 0
        while queue or pending:
            while queue and idle:
                a, c = idle.popleft(), queue.popleft()
                ref = self.actors[a].call.remote(fn, slot, version, training, chunks[c])
                pending[ref] = (a, c)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                a, c = pending.pop(ref)
                try:
                    results[c] = ray.get(ref)
                except _dead_actor_errors() as error:
                    restarts += 1
                    if restarts > self.workers.max_restarts:
                        raise RuntimeError(f"workers died {restarts} times in one call "
                                           f"(workers.max_restarts={self.workers.max_restarts}); "
                                           f"last: {error}") from error
                    print(f"[workers] actor {a} died ({type(error).__name__}); starting a "
                          f"replacement and running its chunk {c} again", flush=True)
                    self._replace(a)
                    queue.appendleft(c)
                idle.append(a)
        self.stats.chunks, self.stats.restarts = len(chunks), restarts
        self.stats.restarts_total += restarts
        self.stats.call_seconds = time.perf_counter() - start
        return results

    def sample(self, backend, model, prompt_ids, cfg, *, eos_token_id: int, pad_token_id: int,
               seeds: list[int], batch_size: int | None) -> Rollout:
        """The rows' chunks (as the local backend cuts them) sampled on the actors."""
        rows = [[int(t) for t in r] for r in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor)
                                               else prompt_ids)]
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompt rows")
        chunks = [(backend, rows[lo:hi], cfg, eos_token_id, pad_token_id, seeds[lo:hi], batch_size)
                  for lo, hi in chunk_bounds(len(rows), batch_size)]
        return concat_rollouts(self.map(_sample_chunk, model, chunks), pad_token_id)


_POOLS: dict[WorkersConfig, RayPool] = {}


def pool(workers: WorkersConfig) -> RayPool:
    """The process's pool for ``workers`` (started on first use, kept for later calls)."""
    import ray

    if _POOLS and not ray.is_initialized():   # Ray was shut down: its actors are gone
        _POOLS.clear()
    if workers not in _POOLS:
        _POOLS[workers] = RayPool(workers)
    return _POOLS[workers]


def shutdown_pools() -> None:
    """Stop the actors of every pool of this process (Ray itself stays up)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown()
