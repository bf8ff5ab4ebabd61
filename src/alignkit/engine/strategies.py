"""How the training loop distributes a model over processes: ``train.strategy``.

One registry, :data:`STRATEGIES`: ``ddp`` (replicated weights, all-reduced gradients; through
``accelerate``), ``fsdp2`` (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard`` per decoder
layer and at the root, over a 1-D device mesh) and ``zero2`` / ``zero3`` (DeepSpeed ZeRO stage 2:
optimiser state and gradients sharded; stage 3: parameters too). Each strategy wraps the
``accelerate.Accelerator`` that :func:`alignkit.engine.training.make_accelerator` made (device,
autocast, the process group, ``reduce``, ``print``...) and offers what the loop uses of it:
``prepare``, ``backward``, ``no_sync``, :meth:`Strategy.optimizer_step` (clipping to the *global*
norm of sharded gradients), ``save_state`` / ``load_state`` (sharded checkpoints:
``torch.distributed.checkpoint`` for FSDP2, DeepSpeed's own for ZeRO) and
:meth:`Strategy.full_model`: the consolidated model on the main process, ready for
``save_pretrained``.

Why the engines directly rather than accelerate's plugins: accelerate 1.16 selects FSDP only for
GPU-type setups (``state.py``: a CPU run with an FSDP plugin becomes ``MULTI_CPU`` DDP, or no
distribution at all under ``use_cpu``, without a word), and its DeepSpeed path on the CPU reports
one process per rank, so its batch checks fail. ``fully_shard`` and ``deepspeed.initialize`` do
the same thing on every device, so one code path is tested on CPU processes (gloo) and runs on
GPUs. Each strategy checks what it got (the distributed type, the ZeRO stage and world size
DeepSpeed reports, that parameters are sharded) and stops with a :class:`ConfigError` naming the
setting where the request cannot be met.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from alignkit.config import ConfigError, require

# accelerate's distributed types that are plain data parallelism (or none, in one process).
_DATA_PARALLEL = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU",
                  "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU", "MULTI_NEURON"}


class Strategy:
    """``ddp``: accelerate's data parallelism (``DistributedDataParallel``), unchanged; the base
    of the sharded strategies, which override what they do differently. Attributes it does not
    define are the accelerator's (``device``, ``is_main_process``, ``reduce``, ...)."""

    name: ClassVar[str] = "ddp"
    supports_offload: ClassVar[bool] = False
    # What one process holds, for P parameters on N processes (fp32 weights, fp32 AdamW).
    memory: ClassVar[str] = "params 4P + grads 4P + AdamW 8P = 16P bytes (nothing sharded)"

    def __init__(self, accelerator, offload: bool = False):
        self.accelerator = accelerator
        self.offload = offload
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self._objects: list = []          # what prepare returned, in order, for save/load_state
        self.check()

    def __getattr__(self, name):
        # Only reached for names this class lacks; "accelerator" itself must exist first (copy,
        # pickle and a failing __init__ look attributes up before it is set).
        if name == "accelerator":
            raise AttributeError(name)
        return getattr(self.accelerator, name)

    # -- what a run got -------------------------------------------------------------------------

    @property
    def distributed_type(self) -> str:
        return str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))

    def check(self) -> None:
        got = self.distributed_type
        if got not in _DATA_PARALLEL:
            raise ConfigError(f"train.strategy={self.name} asks for data parallelism, but accelerate "
                              f"was configured for {got} (accelerate config / ACCELERATE_USE_* "
                              f"variables): set train.strategy=fsdp2, zero2 or zero3 instead, and "
                              f"launch without accelerate's FSDP / DeepSpeed plugin")

    def describe(self) -> dict:
        """What a run logs and records in ``metrics.json``: the strategy and what it really got."""
        return {"strategy": self.name, "distributed_type": self.distributed_type,
                "processes": self.world, "offload": self.offload}

    def announce(self) -> None:
        d = self.describe()
        self.accelerator.print("alignkit: train.strategy=" + d.pop("strategy") + " (" +
                               ", ".join(f"{k}={v}" for k, v in d.items()) + ")")

    # -- building the model ---------------------------------------------------------------------

    def build(self, load, empty):
        """The model to train, built as this strategy shards it; called on every process, before
        ``prepare``. ``load()``: the whole model with its weights (``from_pretrained``, or a
        seeded random init); ``empty()``: the same module (same parameter names and shapes) from
        its config through transformers' ``from_config``, whose values do not matter. Data
        parallelism: every process loads the whole model. Sharded strategies: only the main
        process calls ``load``; ``prepare`` gives every process its shard of the main process's
        weights (:meth:`FSDP2.build`, :meth:`ZeRO3.build`)."""
        return load()

    def on_whole(self, model, fn):
        """``fn(model)`` where ``model`` (as :meth:`build` made it, before ``prepare``) has its
        whole weights, the same result on every process (e.g. a probe forward). Data
        parallelism: every process has them."""
        return fn(model)

    def _main_result(self, fn, module):
        """``fn(module)`` on the main process, its result sent to every process."""
        import torch.distributed as dist

        box = [fn(module) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- the loop's calls -----------------------------------------------------------------------

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def prepare_frozen(self, model):
        """A model that is never trained (DPO's reference; a frozen reward), built through
        :meth:`build`, placed as this strategy keeps it, in eval mode with gradients off; call
        it on every process. Data parallelism (and ZeRO-2, whose parameters are replicated):
        the whole model on every process. ZeRO-3 and FSDP2 shard it as they shard a trained
        model, with no gradients or optimiser state: every process then holds 4P/N bytes of it,
        and calls it in lockstep (each forward gathers the parameters from all processes)."""
        model.requires_grad_(False)
        return model.to(self.accelerator.device).eval()

    def release(self, frozen) -> None:
        """Let go of a model :meth:`prepare_frozen` returned (call on every process, then drop
        every reference to it): what the engine holds of it is freed with it."""

    def backward(self, loss: torch.Tensor, model=None) -> None:
        """Backpropagate ``loss``; ``model``: the prepared model it came from, where a run trains
        several (PPO's policy and value; DeepSpeed has one engine per model)."""
        self.accelerator.backward(loss)

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def clip_grad_norm_(self, params, max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer, scheduler, params, max_grad_norm: float):
        """Clip the gradients of ``params`` to ``max_grad_norm`` (0: no clipping), step the
        optimiser and the schedule, clear the gradients; the norm before clipping (None
        unclipped)."""
        grad_norm = self.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def unwrap_model(self, model):
        return self.accelerator.unwrap_model(model)

    def full_model(self, model):
        """The trained model as a plain module (LoRA still attached, weights complete) on the
        main process, for ``save_pretrained``; called on every process (sharded strategies gather
        the weights there). Other processes get whatever the strategy has (None when sharded)."""
        return self.unwrap_model(model)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The prepared ``model``'s whole weights (its ``state_dict`` keys) on every process;
        called on every process (sharded strategies all-gather them)."""
        return self.unwrap_model(model).state_dict()

    def rollout_model(self, model):
        """A plain, unsharded module with ``model``'s current weights on every process, to sample
        from (a sampler reads whole weights, as verl and OpenRLHF feed their inference engine);
        call it on every process after each update. Data parallelism: the replica itself. Sharded
        strategies keep one copy per model and write the gathered weights into it in place (its
        parameters' version counters move, so the vLLM and Ray backends resend them)."""
        return self.unwrap_model(model)

    def save_state(self, folder: str) -> None:
        self.accelerator.save_state(folder)

    def load_state(self, folder: str) -> None:
        self.accelerator.load_state(folder)


# ---------------------------------------------------------------------------------------------
# Shared by the sharded strategies.


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The modules to shard one by one: those whose class transformers names in
    ``_no_split_modules`` (a model's decoder layers; a PEFT model's base model's), as accelerate's
    transformer auto-wrap policy picks them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _skeleton(model):
    """A copy of ``model``'s structure whose parameters live on the meta device (no memory):
    sharding replaces the parameters in place, and this is what the gathered weights are loaded
    into at the end (``load_state_dict(assign=True)``) to save a plain transformers model.
    Buffers are copied (e.g. rotary frequencies, which are not in the state dict)."""
    # A ZeRO-3 parameter built partitioned (zero.Init) holds its shard; ds_shape is its shape.
    memo = {id(p): torch.nn.Parameter(torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype,
                                                  device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _set_buffers(module, buffers: dict[str, torch.Tensor]) -> None:
    """Replace ``module``'s buffers by name (e.g. a skeleton's meta buffers by real ones)."""
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = value


def _built_here(model, built: list) -> bool:
    """Whether ``model`` (or a module inside it: a PEFT model wraps the base) is one that
    :meth:`Strategy.build` made, identity compared."""
    return any(m is b for m in model.modules() for b in built)


def _fill(skeleton, state_dict: dict):
    skeleton.load_state_dict(state_dict, assign=True)
    base = skeleton.get_base_model() if hasattr(skeleton, "get_base_model") else skeleton
    if hasattr(base, "tie_weights"):   # assign=True unties shared tensors; tie them again
        base.tie_weights()
    return skeleton


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Unit:
    """One trained model of a sharded run: the module as built, what ``prepare`` made of it (the
    same module sharded in place, or DeepSpeed's engine), its optimiser, its skeleton (the
    structure on the meta device) and its unsharded rollout copy (made on first use)."""

    def __init__(self, module, model, optimizer, skeleton):
        self.module, self.model, self.optimizer, self.skeleton = module, model, optimizer, skeleton
        self.rollout = None


class _Sharded(Strategy):
    """What FSDP2 and ZeRO share: each ``prepare`` call takes one model (with its optimiser and
    schedule): a run may prepare several (PPO: policy and value), each its own sharded unit; its
    skeleton for the final save and the rollout copy; the schedules, RNG states and the objects
    registered with ``register_for_checkpointing`` saved per process beside the engine's own
    sharded checkpoints."""

    def check(self) -> None:
        self.available()
        if self.distributed_type not in _DATA_PARALLEL:
            raise ConfigError(f"train.strategy={self.name}: launch without accelerate's FSDP / "
                              f"DeepSpeed plugin (accelerate configured {self.distributed_type}); "
                              "alignkit shards the model itself")
        if self.offload and self.accelerator.device.type == "cpu":
            raise ConfigError("train.offload=true moves parameters and optimiser state from the "
                              "accelerator (GPU) to CPU memory; this run has no accelerator and "
                              "trains in CPU memory already: set train.offload=false")
        if not torch.distributed.is_initialized():
            raise ConfigError(f"train.strategy={self.name} runs over a process group: launch with "
                              f"torchrun or accelerate launch (one process: --nproc_per_node 1), "
                              f"or use train.strategy=ddp")
        self._units: list[_Unit] = []
        self._built: list[torch.nn.Module] = []   # what build made, its weights still to share
        self._wholes: list[tuple] = []   # ZeRO-3, main process: (built, whole copy) until prepare

    def _take_built(self, model) -> bool:
        """Whether :meth:`build` made ``model`` (or a module inside it); called once, when it is
        prepared: the strategy forgets it (and the main process's whole copy), so a frozen model
        the caller drops is freed."""
        built = _built_here(model, self._built)
        self._built = [b for b in self._built if not _built_here(model, [b])]
        self._wholes = [(m, w) for m, w in self._wholes if not _built_here(model, [m])]
        return built

    def available(self) -> None:
        """Raise a :class:`ConfigError` naming what is missing where the installed packages or
        the device cannot provide this strategy (checked first, before anything launches)."""

    def _split(self, objects):
        models = [o for o in objects if isinstance(o, torch.nn.Module)]
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if len(models) != 1 or len(optimizers) > 1:
            raise ConfigError(f"train.strategy={self.name} trains one model with one optimiser "
                              f"per run (got {len(models)} models, {len(optimizers)} optimisers)")
        return models[0], (optimizers[0] if optimizers else None)

    def _unit(self, model=None, optimizer=None) -> _Unit:
        """The unit of a prepared ``model`` (or of its ``optimizer``); with neither, the only one."""
        for u in self._units:
            if (model is not None and (model is u.model or model is u.module)) or \
                    (optimizer is not None and optimizer is u.optimizer):
                return u
        if model is None and optimizer is None and len(self._units) == 1:
            return self._units[0]
        raise ValueError(f"train.strategy={self.name}: not a model or optimiser it prepared "
                         f"({len(self._units)} prepared; name the model where there are several)")

    @property
    def _model(self):
        return self._units[-1].model if self._units else None

    def _tag(self, i: int) -> str:
        # The first unit keeps the name of a one-model run's checkpoint.
        return "" if i == 0 else str(i)

    def full_model(self, model):
        unit = self._unit(model)
        sd = self._gathered(unit, main_only=True)
        if not self.accelerator.is_main_process or sd is None:
            return None
        return _fill(copy.deepcopy(unit.skeleton), sd)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        return self._gathered(self._unit(model), main_only=False)

    def rollout_model(self, model):
        unit = self._unit(model)
        sd = self._gathered(unit, main_only=False)
        if unit.rollout is None:
            unit.rollout = _fill(copy.deepcopy(unit.skeleton), {k: v.clone() for k, v in sd.items()})
            unit.rollout.requires_grad_(False)
        else:
            with torch.no_grad():   # in place: the same parameters, their versions moved
                unit.rollout.load_state_dict(sd)
        return unit.rollout

    def _gathered(self, unit: _Unit, main_only: bool) -> dict | None:
        raise NotImplementedError

    def _extra_path(self, folder: str) -> Path:
        return Path(folder) / f"loop_state_rank{self.rank}.pt"

    def _save_extra(self, folder: str) -> None:
        scheds = [o.state_dict() for o in self._objects if hasattr(o, "get_last_lr")]
        custom = [o.state_dict() for o in self.accelerator._custom_objects]
        torch.save({"schedulers": scheds, "rng": _rng_state(), "custom": custom},
                   self._extra_path(folder))

    def _load_extra(self, folder: str) -> None:
        state = torch.load(self._extra_path(folder), weights_only=False)
        for sched, sd in zip([o for o in self._objects if hasattr(o, "get_last_lr")],
                             state["schedulers"]):
            sched.load_state_dict(sd)
        for obj, sd in zip(self.accelerator._custom_objects, state.get("custom", [])):
            obj.load_state_dict(sd)
        _set_rng_state(state["rng"])


# ---------------------------------------------------------------------------------------------
# FSDP2.


class FSDP2(_Sharded):
    """PyTorch FSDP2: each decoder layer, then the root (embeddings, final norm, head), is a
    ``fully_shard`` unit over a 1-D mesh of all processes. Parameters, gradients and AdamW state
    are sharded (``DTensor`` on dim 0); a unit's parameters are all-gathered for its forward and
    backward and freed after (``reshard_after_forward``); gradients are reduce-scattered (mean)."""

    name = "fsdp2"
    supports_offload = True
    memory = ("(4P + 4P + 8P) / N = 16P/N bytes, plus the largest unit's full parameters and "
              "gradients while it computes (offload: parameters, gradients and AdamW state in CPU "
              "memory, the unit on the GPU)")

    def available(self) -> None:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
        except ImportError:
            raise ConfigError(f"train.strategy=fsdp2 needs torch >= 2.6 "
                              f"(torch.distributed.fsdp.fully_shard); this torch is "
                              f"{torch.__version__}") from None

    def describe(self) -> dict:
        return {**super().describe(), "distributed_type": f"FSDP2 over {self.distributed_type}"}

    def build(self, load, empty):
        """PyTorch's recipe for building an FSDP2 model without a whole copy per process: the
        main process loads it on the CPU, every other process builds it on the meta device (no
        memory); ``prepare`` shards it (``fully_shard``), gives the meta processes storage for
        their shards only (``to_empty``) and broadcasts the main process's weights into every
        shard (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``: one
        tensor at a time), then its buffers, which no state dict holds (e.g. rotary
        frequencies)."""
        if self.rank == 0:
            model = load()
        else:
            with torch.random.fork_rng(), torch.device("meta"):   # draws nothing: rank 0 seeds
                model = empty()
        self._built.append(model)
        return model

    def on_whole(self, model, fn):
        if not _built_here(model, self._built):
            return fn(model)
        return self._main_result(fn, model)   # rank 0's model is the whole one

    def prepare(self, *objects):
        model, optimizer = self._split(objects)
        skeleton = _skeleton(model)
        names = {id(p): n for n, p in model.named_parameters()}
        # The optimiser's references would keep every full parameter alive until all are sharded.
        groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] \
            if optimizer is not None else []
        for group in optimizer.param_groups if optimizer is not None else []:
            group["params"] = []
        self._shard(model, skeleton)
        if optimizer is not None:
            # fully_shard replaced the parameters (DTensor shards): point the optimiser at them.
            new = dict(model.named_parameters())
            for group, params in zip(optimizer.param_groups, groups):
                group["params"] = [new[n] for n in params]
        self._units.append(_Unit(model, model, optimizer, skeleton))
        self._objects += list(objects)
        return objects if len(objects) > 1 else objects[0]

    def prepare_frozen(self, model):
        model.requires_grad_(False)
        self._shard(model.eval(), None)
        return model

    def _shard(self, model, skeleton) -> None:
        """``fully_shard`` each decoder layer, then the root; a model :meth:`build` made gets
        the main process's weights (and the ``skeleton``, where given, its buffers)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                            fully_shard)

        device = self.accelerator.device
        built = self._take_built(model)
        if not (built and self.rank != 0):   # meta: to_empty after sharding, shards only
            model.to(device)
        # The main process's whole weights (and LoRA adapters added since), kept alive for the
        # broadcast below: fully_shard copies each process's shard out of them.
        full = dict(model.state_dict()) if built and self.rank == 0 else {}
        mesh = init_device_mesh(device.type, (self.world,))
        kwargs = {"mesh": mesh, "reshard_after_forward": True}
        if self.accelerator.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                       reduce_dtype=torch.float32)
        if self.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if not isinstance(model, FSDPModule):
            raise ConfigError("train.strategy=fsdp2: the model was not sharded")
        if built:
            self._share_from_main(model, full, skeleton)

    def _share_from_main(self, model, full: dict, skeleton) -> None:
        """Fill the shards of a model :meth:`build` made: the main process's ``full`` weights
        broadcast into every process's shard, then its buffers (the skeleton gets them too)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        device = self.accelerator.device
        if self.rank != 0:
            model.to_empty(device=device)   # storage for this process's shards only
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=True))
        buffers = dict(model.named_buffers())
        for value in buffers.values():     # the same order everywhere: the same module
            dist.broadcast(value, src=0)
        if self.rank != 0 and skeleton is not None:
            _set_buffers(skeleton, {n: b.detach().clone() for n, b in buffers.items()})
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ConfigError(f"train.strategy=fsdp2: {len(meta)} parameters were not filled from "
                              f"the main process (first: {meta[0]})")

    def backward(self, loss: torch.Tensor, model=None) -> None:
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model):
        # Accumulate unsharded gradients locally; the last micro-batch reduce-scatters them all.
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, params, max_norm: float):
        from torch.distributed.tensor import DTensor

        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):   # a partial sum over the shards: reduce it to the global norm
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def unwrap_model(self, model):
        return model

    def _gathered(self, unit: _Unit, main_only: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True leaves the full tensors on rank 0 only; without it every rank has them.
        return get_model_state_dict(unit.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=main_only))

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state = {}
        for i, u in enumerate(self._units):
            msd, osd = get_state_dict(u.model, u.optimizer)
            state[f"model{self._tag(i)}"], state[f"optim{self._tag(i)}"] = msd, osd
        return state

    def save_state(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(Path(folder) / "fsdp2"))
        self._save_extra(folder)

    def load_state(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(Path(folder) / "fsdp2"))
        for i, u in enumerate(self._units):
            set_state_dict(u.model, u.optimizer, model_state_dict=state[f"model{self._tag(i)}"],
                           optim_state_dict=state[f"optim{self._tag(i)}"])
        self._load_extra(folder)


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO.


def _deepspeed(name: str):
    """Import DeepSpeed for this device (``DS_ACCELERATOR=cpu`` where there is no GPU: its
    auto-detection would pick the CPU too, with a warning), or a :class:`ConfigError`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(f"train.strategy={name} needs DeepSpeed, which is not installed "
                          f"({exc}): pip install 'alignkit[deepspeed]'") from None
    return deepspeed


def _check_jit_build(name: str) -> None:
    """On the CPU, DeepSpeed's communication layer JIT-builds its shared-memory op
    (``deepspeed_shm_comm``) on first use, with ninja and a C++ compiler, into
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); torch checks the build with
    ninja on every later load too. Stop before launching anything where that cannot work."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return   # DeepSpeed uses plain torch.distributed (gloo) without it
    import torch.utils.cpp_extension as ext

    try:
        ext.verify_ninja_availability()
    except RuntimeError:
        raise ConfigError(f"train.strategy={name} on the CPU: DeepSpeed builds its communication "
                          f"op with ninja on first use and ninja is not installed: "
                          f"pip install ninja") from None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ConfigError(f"train.strategy={name} on the CPU: DeepSpeed builds its communication "
                          f"op with a C++ compiler on first use and {cxx!r} (CXX) is not found: "
                          f"install g++ (e.g. apt-get install g++) or set CXX")
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ext.get_default_build_root())
    existing = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"train.strategy={name} on the CPU: DeepSpeed builds its communication "
                          f"op into {root}, which is not writable: set TORCH_EXTENSIONS_DIR to a "
                          f"writable folder")


class ZeRO(_Sharded):
    """DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
    Trillion Parameter Models", sec. 5): ``deepspeed.initialize`` on the model and alignkit's
    AdamW. Gradients are reduce-scattered, averaged over processes, clipped by DeepSpeed to the
    global norm with the formula of ``torch.nn.utils.clip_grad_norm_``."""

    stage: ClassVar[int] = 2

    def available(self) -> None:
        self._ds = _deepspeed(self.name)
        if self.accelerator.device.type == "cpu":
            _check_jit_build(self.name)

    def describe(self) -> dict:
        engine = getattr(self, "_model", None)
        got = (f"DeepSpeed ZeRO-{engine.zero_optimization_stage()} over {self.distributed_type}"
               if engine is not None else f"DeepSpeed over {self.distributed_type}")
        return {**super().describe(), "distributed_type": got}

    def _config(self, hidden: int | None) -> dict:
        """The DeepSpeed config of this run (``hidden``: the model's hidden size, for buckets)."""
        zero: dict = {"stage": self.stage}
        if hidden:
            # DeepSpeed's default buckets (5e8 elements: 2 GB in fp32 each) dwarf a small model's
            # shards; these are the sizes Hugging Face's "auto" values give (hidden^2 ...).
            zero.update(reduce_bucket_size=hidden * hidden, allgather_bucket_size=hidden * hidden)
            if self.stage == 3:
                zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                            stage3_param_persistence_threshold=10 * hidden)
        if self.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if self.stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        return {
            # alignkit batches itself: one "micro-batch" per process and step as DeepSpeed counts.
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "train_batch_size": self.world,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,   # torch's AdamW, as alignkit builds it
            "bf16": {"enabled": self.accelerator.mixed_precision == "bf16"},
            "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
        }

    def prepare(self, *objects):
        model, optimizer = self._split(objects)
        if optimizer is None:
            raise ConfigError(f"train.strategy={self.name} needs the optimiser with the model")
        skeleton = _skeleton(model)
        model.to(self.accelerator.device)
        config = self._config(getattr(getattr(model, "config", None), "hidden_size", None))
        engine, ds_optimizer, _, _ = self._ds.initialize(model=model, optimizer=optimizer,
                                                         config=config, dist_init_required=False)
        got = (engine.zero_optimization_stage(), engine.world_size)
        if got != (self.stage, self.world):
            raise ConfigError(f"train.strategy={self.name}: DeepSpeed runs ZeRO stage {got[0]} on "
                              f"{got[1]} processes, not stage {self.stage} on {self.world}")
        self._units.append(_Unit(model, engine, ds_optimizer, skeleton))
        prepared = [engine if o is model else ds_optimizer if o is optimizer else o
                    for o in objects]
        self._objects += prepared
        return tuple(prepared) if len(objects) > 1 else prepared[0]

    def backward(self, loss: torch.Tensor, model=None) -> None:
        self._unit(model).model.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self, model):
        # Not a gradient-accumulation boundary: DeepSpeed accumulates into its partitioned
        # gradients; the last micro-batch of the step (outside this context) is one.
        engine = self._unit(model).model
        engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            engine.set_gradient_accumulation_boundary(True)

    def optimizer_step(self, optimizer, scheduler, params, max_grad_norm: float):
        engine = self._unit(optimizer=optimizer).model
        engine.optimizer.clip_grad = float(max_grad_norm)   # 0: none, as alignkit's setting
        engine.step()          # reduce, clip to the global norm, AdamW step, zero the gradients
        scheduler.step()
        norm = engine.get_global_grad_norm()
        return None if max_grad_norm <= 0 or norm is None else torch.tensor(float(norm))

    def unwrap_model(self, model):
        for u in self._units:
            if model is u.model:
                return u.module
        return model

    def full_model(self, model):
        if self.stage < 3:   # parameters are replicated: every process has them whole
            return self._unit(model).module
        return super().full_model(model)

    def rollout_model(self, model):
        if self.stage < 3:   # the replica itself, stepped in place
            return self._unit(model).module
        return super().rollout_model(model)

    def _gathered(self, unit: _Unit, main_only: bool) -> dict:
        if self.stage < 3:
            return unit.module.state_dict()
        if main_only:
            return unit.model._zero3_consolidated_16bit_state_dict()   # every process; rank 0's
        # Every process: one parameter gathered at a time (tied weights once), in the same order.
        out: dict[str, torch.Tensor] = {}
        full: dict[int, torch.Tensor] = {}
        for name, t in unit.module.state_dict(keep_vars=True).items():
            if isinstance(t, torch.nn.Parameter) and hasattr(t, "ds_id"):
                if id(t) not in full:
                    with self._ds.zero.GatheredParameters([t]):
                        full[id(t)] = t.detach().clone()
                out[name] = full[id(t)]
            else:
                out[name] = t.detach()
        return out

    def save_state(self, folder: str) -> None:
        for i, u in enumerate(self._units):
            u.model.save_checkpoint(folder, tag=f"deepspeed{self._tag(i)}", save_latest=False)
        self._save_extra(folder)

    def load_state(self, folder: str) -> None:
        for i, u in enumerate(self._units):
            u.model.load_checkpoint(folder, tag=f"deepspeed{self._tag(i)}",
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        self._load_extra(folder)


class ZeRO2(ZeRO):
    """ZeRO stage 2: optimiser state and gradients sharded, parameters replicated."""

    name = "zero2"
    stage = 2
    memory = "params 4P + (grads 4P + AdamW 8P) / N bytes"


class ZeRO3(ZeRO):
    """ZeRO stage 3: parameters sharded too, gathered per module for its forward and backward."""

    name = "zero3"
    stage = 3
    supports_offload = True
    memory = ("(4P + 4P + 8P) / N = 16P/N bytes, plus the gathered modules' parameters "
              "(offload: parameters and AdamW state in CPU memory)")

    def build(self, load, empty):
        """Every process builds the model partitioned as it is created (``deepspeed.zero.Init``,
        which transformers' ``from_config`` enters while an ``HfDeepSpeedConfig`` of stage 3 is
        alive: each module's parameters are partitioned as soon as the module exists); the main
        process loads the whole model beside it and writes each parameter into the partitioned
        one (``GatheredParameters(modifier_rank=0)``: gathered one at a time, written on rank 0,
        re-partitioned from it). No other process loads the weights."""
        import torch.distributed as dist
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        whole = load() if self.rank == 0 else None
        hidden = getattr(getattr(whole, "config", None), "hidden_size", None)
        box = [hidden]
        dist.broadcast_object_list(box, src=0)
        # zero.Init reads the world size from DeepSpeed's communication layer: wrap the process
        # group (as deepspeed.initialize does in prepare) before it counts one process.
        self._ds.init_distributed(dist_init_required=False)
        ds_config = HfDeepSpeedConfig(self._config(box[0]))   # zero3 on while it is alive
        try:
            with torch.random.fork_rng():   # draws nothing: rank 0's load seeded what it needs
                model = empty()
        finally:
            del ds_config
            unset_hf_deepspeed_config()   # models built later (a reference) are whole again
        params = dict(model.named_parameters(remove_duplicate=False))
        if not all(hasattr(p, "ds_id") for p in params.values()):
            raise ConfigError("train.strategy=zero3: the model was not built partitioned "
                              "(deepspeed.zero.Init); build it with transformers' from_config")
        source = whole.state_dict() if whole is not None else {}
        names = [list(params)]
        dist.broadcast_object_list(names, src=0)
        if names[0] != list(params):
            raise ConfigError(f"train.strategy=zero3: process {self.rank} built a model with other "
                              f"parameters than the main process's")
        done: set[int] = set()
        with torch.no_grad():
            for name, p in params.items():
                if id(p) in done:                     # tied: written once
                    continue
                done.add(id(p))
                with self._ds.zero.GatheredParameters([p], modifier_rank=0):
                    if self.rank == 0:
                        if name not in source or tuple(source[name].shape) != tuple(p.shape):
                            raise ConfigError(f"train.strategy=zero3: the model built from its "
                                              f"config has {name} {tuple(p.shape)}, the loaded "
                                              f"one {tuple(source[name].shape) if name in source else 'none'}")
                        p.copy_(source[name])
            theirs = dict(whole.named_buffers()) if whole is not None else {}
            for n, b in model.named_buffers():        # e.g. rotary frequencies: rank 0's
                if n in theirs:
                    b.copy_(theirs[n])
                dist.broadcast(b, src=0)
        del source
        if whole is not None:   # for on_whole until prepare
            self._wholes.append((model, whole))
        self._built.append(model)
        return model

    def on_whole(self, model, fn):
        if not _built_here(model, self._built):
            return fn(model)
        whole = next((w for m, w in self._wholes if _built_here(model, [m])), None)
        return self._main_result(lambda _: fn(whole), model)

    def prepare(self, *objects):
        self._take_built(self._split(objects)[0])
        return super().prepare(*objects)

    def prepare_frozen(self, model):
        # ZeRO-3 inference: an engine without optimiser, whose hooks gather each module's
        # parameters for its forward (as DeepSpeed-Chat and TRL keep their reference models).
        self._take_built(model)
        model.requires_grad_(False)
        config = self._config(getattr(getattr(model, "config", None), "hidden_size", None))
        engine, *_ = self._ds.initialize(model=model.to(self.accelerator.device), config=config,
                                         dist_init_required=False)
        engine.eval()   # DeepSpeed's returns None
        return engine

    def release(self, frozen) -> None:
        # DeepSpeed 0.19 keeps a ZeRO-3 engine alive past every reference to it, even after its
        # destroy(), in two module-level places: the stack its hooks push the root module on
        # (parameter_offload.FWD_MODULE_STACK, never popped for the root) and a class-level
        # lru_cache of the parameter coordinator (__params_to_release, keyed by coordinator and
        # submodule). Take the module off the one and clear the other (a cache: recomputed).
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import (
            PartitionedParameterCoordinator)

        frozen.destroy()
        stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
        stack[:] = [m for m in stack if m is not frozen.module]
        cached = vars(PartitionedParameterCoordinator).get(
            "_PartitionedParameterCoordinator__params_to_release")
        for fn in [cached, *(c.cell_contents for c in getattr(cached, "__closure__", None) or ())]:
            if hasattr(fn, "cache_clear"):   # under DeepSpeed's nvtx wrapper
                fn.cache_clear()


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, FSDP2, ZeRO2, ZeRO3)}


def validate(strategy: str, offload: bool, prefix: str = "") -> None:
    """A config's ``strategy`` / ``offload`` pair, checked in its ``__post_init__`` (``prefix``:
    where the keys live, e.g. ``"train."``)."""
    require(strategy in STRATEGIES, f"{prefix}strategy must be one of {', '.join(STRATEGIES)}, "
            f"got {strategy!r}")
    require(not offload or STRATEGIES[strategy].supports_offload,
            f"{prefix}offload=true needs a sharded strategy that offloads "
            f"({', '.join(n for n, s in STRATEGIES.items() if s.supports_offload)}); "
            f"{prefix}strategy={strategy} does not")
