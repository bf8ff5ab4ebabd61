"""Where the four roles of RLHF live: policy, reference, reward and value.

Two placements, one interface for the loop (``alignkit ppo roles=separate|shared``):

* ``separate``: distinct models. Policy and reference are causal LMs (the reference frozen),
  the reward is any reward source (a trained reward model is its own scalar-head model), and
  the value is a scalar-head model initialised from the policy (fresh head) or from the reward
  model (its trained head, as InstructGPT initialises the value function from the RM; Ouyang
  et al. 2022).
* ``shared``: one frozen base in memory. Policy and value are LoRA adapters on it (Hu et al.
  2021; PEFT multi-adapter, ``set_adapter``), the reference is the base with the adapters
  switched off (``disable_adapter()``), and a reward model trained as a LoRA adapter on the same
  base (``alignkit rm lora.enabled=true save_adapter=true``) is a third adapter. The value and
  reward heads are small ``Linear`` modules outside the base.

Outside :meth:`SharedRoles._active` the policy adapter is the active one, so ``roles.policy`` can
be handed to :func:`alignkit.engine.generation.generate` and :func:`~alignkit.engine.generation.rollout_logps`
like any causal LM. Values are per token: the head reads the hidden state that predicts each
response token, the positions whose logits give the policy's log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from alignkit.config import ConfigError
from alignkit.engine.generation import Rollout
from alignkit.engine.models import LoraSpec

POLICY, VALUE, REWARD = "default", "value", "reward"  # adapter names; the policy is PEFT's default


@dataclass(frozen=True)
class RoleSpec:
    """What to load, as plain values from the stage's config."""

    model: str                       # the initial policy (and, by default, the reference)
    reference: str | None            # separate placement only; default ``model``
    reward: str                      # reward source spec (``model:PATH``, ``gold:TASK``, ...)
    value_init: str = "policy"       # "policy" (fresh head) | "reward" (the RM's weights + head)
    chat: bool = False
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)  # shared placement adapters


def backbone(model):
    """The transformer under a causal-LM or sequence-classification head (``model.model`` for
    Llama, ``model.transformer`` for GPT-2)."""
    return getattr(model, model.base_model_prefix)


def token_values(body, head: torch.nn.Module, rollout: Rollout,
                 pack: bool | str = False) -> torch.Tensor:
    """Per-token values ``[B, R]`` (fp32, 0 on padding), gradients flowing.

    ``V_t`` is read at position ``P + t - 1`` of prompt + response, the state from which
    response token ``t`` is drawn; position ids as :func:`~alignkit.engine.generation.rollout_logps`,
    and ``pack`` as there (the real tokens in one flat row).
    """
    if pack:
        packed = rollout.packing(pack)
        hidden = body(**packed.inputs()).last_hidden_state[0, packed.targets]
        return packed.unflatten(head(hidden).squeeze(-1).float())
    input_ids, attention_mask = rollout.sequences()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    width = rollout.response_ids.size(1)
    values = head(hidden[:, -(width + 1):-1]).squeeze(-1).float()
    return values * rollout.response_mask


class TokenValueModel(torch.nn.Module):
    """A scalar-head model (``AutoModelForSequenceClassification``) read per token, as one
    module whose forward is :func:`token_values`: a sharded strategy wraps a model's forward
    (FSDP2 gathers the root's parameters, the embeddings and the head, in the root's forward;
    DeepSpeed's engine runs the module), so the value forward must be the forward of the module
    it prepared."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        # What a sharded strategy splits into units (the decoder layers), as the model names it.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, rollout: Rollout, pack: bool | str = False) -> torch.Tensor:
        return token_values(backbone(self.model), self.model.score, rollout, pack)


def params_in_memory(modules, adapters: bool = True) -> int:
    """Parameters held by ``modules``, each tensor counted once (a shared base, tied weights);
    ``adapters=False`` leaves LoRA adapter weights out."""
    seen: dict[int, int] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if adapters or "lora_" not in name:
                seen[id(p)] = getattr(p, "ds_numel", p.numel())   # a ZeRO-3 partition: its whole
    return sum(seen.values())


def _reward_source(spec: RoleSpec, **kwargs):
    from alignkit.engine.scoring import make_reward_source

    if spec.reward.startswith("model:"):
        kwargs["chat"] = spec.chat
    return make_reward_source(spec.reward, **kwargs)


def _is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def _reward_path(spec: RoleSpec) -> str:
    if not spec.reward.startswith("model:"):
        raise ConfigError(f"value_init=reward needs a trained reward model (reward: model:PATH), "
                          f"got reward={spec.reward!r}")
    return spec.reward[len("model:"):]


class SeparateRoles:
    """Policy, reference, reward and value as distinct models."""

    placement = "separate"

    def __init__(self, spec: RoleSpec, tokenizer, needs_value: bool, strategy=None):
        """``strategy``: the run's training strategy, which builds the policy, the value model
        and the reference (``Strategy.build``: under fsdp2 / zero3 only the main process loads
        them whole); the reward source loads its own model, whole on every process."""
        from alignkit.engine.models import load_causal_lm, load_scalar_model

        if spec.reward.startswith("model:") and _is_adapter(spec.reward[6:]):
            raise ConfigError(f"{spec.reward} is a LoRA adapter folder; roles=separate loads a full "
                              "reward model (the rm stage's model/ folder), roles=shared an adapter")
        self.policy = load_causal_lm(spec.model, tokenizer=tokenizer, strategy=strategy)
        self.reference = load_causal_lm(spec.reference or spec.model, tokenizer=tokenizer,
                                        strategy=strategy)
        self.reference.eval().requires_grad_(False)
        self.reward = _reward_source(spec)
        self.value = self.value_model = None
        if needs_value:
            source = _reward_path(spec) if spec.value_init == "reward" else spec.model
            self.value = load_scalar_model(source, tokenizer=tokenizer, strategy=strategy)
            self.value_model = TokenValueModel(self.value)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules (what a checkpoint must hold): ``policy`` and, with a critic,
        ``value`` (its :class:`TokenValueModel`)."""
        return {"policy": self.policy,
                **({"value": self.value_model} if self.value_model is not None else {})}

    def use_prepared(self, prepared: dict[str, torch.nn.Module]) -> None:
        """Run the trained models' forwards through what the strategy made of them (``prepare``
        of each module of :meth:`modules`: the same module sharded in place, a DDP wrapper or
        DeepSpeed's engine)."""
        self.policy = prepared["policy"]
        if "value" in prepared:
            self.value_model = prepared["value"]

    def held(self) -> list[torch.nn.Module]:
        reward_model = getattr(self.reward, "model", None)
        return [m for m in (self.policy, self.reference, self.value, reward_model) if m is not None]

    def rollout_models(self) -> list[torch.nn.Module]:
        """The models whose forwards read rollouts (log-probs, values)."""
        return [m for m in (self.policy, self.reference, self.value) if m is not None]

    def one_model_params(self) -> int:
        return params_in_memory([self.reference])

    def to(self, device) -> SeparateRoles:
        for m in self.held():
            if not any(p.is_meta for p in m.parameters()):   # a sharded build's: placed by prepare
                m.to(device)
        return self

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def value_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.value.parameters() if p.requires_grad]

    def values(self, rollout: Rollout, pack: bool | str = False) -> torch.Tensor:
        return self.value_model(rollout, pack)

    def train(self, mode: bool = True) -> None:
        for m in self.modules().values():
            m.train(mode)


class _AdapterOff(torch.nn.Module):
    """The shared base with every adapter switched off, callable like a causal LM: the reference
    policy of the shared placement (e.g. for :func:`alignkit.stages.evaluate.sequence_kl`)."""

    def __init__(self, peft_model):
        super().__init__()
        self._peft = (peft_model,)  # a tuple, not a submodule: the base is not held twice
        self.config = peft_model.base_model.model.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if torch.is_tensor(logits_to_keep) or logits_to_keep:  # a count, or positions (packed)
            kwargs["logits_to_keep"] = logits_to_keep
        with self._peft[0].disable_adapter():
            return self._peft[0].base_model.model(input_ids=input_ids, attention_mask=attention_mask,
                                                   position_ids=position_ids, use_cache=use_cache,
                                                   **kwargs)


class _AdapterScorer(torch.nn.Module):
    """A reward adapter + its head, scoring like ``AutoModelForSequenceClassification``: the head
    on the hidden state of the last real token (right-padded batches, as the RM was trained)."""

    def __init__(self, roles: SharedRoles, head: torch.nn.Linear):
        super().__init__()
        self._roles = (roles,)
        self.head = head

    def forward(self, input_ids, attention_mask, **_):
        roles = self._roles[0]
        with roles._active(REWARD):
            hidden = backbone(roles.policy)(input_ids=input_ids, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state
        width = attention_mask.size(1)
        last = width - 1 - attention_mask.flip(-1).argmax(-1)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return SimpleNamespace(logits=self.head(hidden[rows, last]).float())


class SharedRoles:
    """One frozen base; policy, value (and reward) are LoRA adapters on it."""

    placement = "shared"

    def __init__(self, spec: RoleSpec, tokenizer, needs_value: bool, strategy=None):
        # ``strategy`` is not used: the adapters on one base train in one process (ppo refuses
        # a sharded strategy with roles=shared).
        from alignkit.engine.models import apply_lora, load_causal_lm

        if spec.reference not in (None, spec.model):
            raise ConfigError("roles=shared: the reference is the shared base itself (the policy's "
                              f"starting model {spec.model}); do not set reference={spec.reference}")
        base = load_causal_lm(spec.model, tokenizer=tokenizer)
        self.peft = apply_lora(base, dataclasses.replace(spec.lora, enabled=True))
        self.policy = self.peft.base_model.model   # the causal LM with LoRA layers inside
        self.reference = _AdapterOff(self.peft)
        self._trainable = [POLICY]
        self.reward_head = None
        if spec.reward.startswith("model:"):
            self.reward_head = self._add_reward_adapter(Path(spec.reward[len("model:"):]), spec.model)
            self.reward = _reward_source(spec, model=_AdapterScorer(self, self.reward_head),
                                         tokenizer=tokenizer)
        else:
            self.reward = _reward_source(spec)
        self.value_head = self._add_value(spec) if needs_value else None
        self._activate(POLICY)

    # -- adapters ----------------------------------------------------------------------------

    def _activate(self, name: str) -> None:
        # set_adapter also flips requires_grad to "only the active adapter"; the optimisers hold
        # both trainable adapters, so they stay trainable and the reward adapter stays frozen.
        self.peft.set_adapter(name, inference_mode=name not in self._trainable)
        self.peft.set_requires_grad(self._trainable, True)

    @contextlib.contextmanager
    def _active(self, name: str):
        self._activate(name)
        try:
            yield
        finally:
            self._activate(POLICY)

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if "lora_" in n and f".{name}." in n]

    def _copy_adapter(self, src: str, dst: str) -> None:
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                if "lora_" in n and f".{dst}." in n:
                    p.copy_(params[n.replace(f".{dst}.", f".{src}.")])

    def _add_value(self, spec: RoleSpec) -> torch.nn.Linear:
        """The value adapter and its head: copies of the reward model's (``value_init=reward``),
        or a fresh adapter (LoRA's B = 0: the base itself) with a fresh head."""
        from_reward = spec.value_init == "reward"
        if from_reward and self.reward_head is None:
            _reward_path(spec)  # raises: no reward model to start from
        config = copy.deepcopy(self.peft.peft_config[REWARD if from_reward else POLICY])
        config.inference_mode = False
        self.peft.add_adapter(VALUE, config)
        self._trainable.append(VALUE)
        if from_reward:
            self._copy_adapter(REWARD, VALUE)
            return copy.deepcopy(self.reward_head).requires_grad_(True)
        head = torch.nn.Linear(self.policy.config.hidden_size, 1, bias=False)
        torch.nn.init.normal_(head.weight, std=self.policy.config.initializer_range)
        return head

    def _add_reward_adapter(self, path: Path, base_path: str) -> torch.nn.Linear:
        """Load an ``alignkit rm ... save_adapter=true`` adapter as ``reward``; return its head."""
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        if not _is_adapter(str(path)):
            raise ConfigError(f"roles=shared serves the reward model from the shared base: "
                              f"{path} must be a LoRA adapter folder (train it with `alignkit rm "
                              f"model={base_path} lora.enabled=true save_adapter=true` and pass "
                              f"model:<rm out_dir>/adapter)")
        config = LoraConfig.from_pretrained(str(path))
        trained_on = config.base_model_name_or_path
        if trained_on and Path(trained_on).resolve() != Path(base_path).resolve():
            print(f"alignkit ppo: warning: the reward adapter was trained on {trained_on}, the "
                  f"shared base is {base_path}", flush=True)
        # The head is ours (below), not a PEFT modules_to_save copy inside a causal LM.
        config.modules_to_save, config.task_type, config.inference_mode = None, "CAUSAL_LM", True
        self.peft.add_adapter(REWARD, config)
        weights = load_file(str(path / "adapter_model.safetensors"))
        head_keys = {k.rsplit(".", 1)[-1]: k for k in weights if "lora_" not in k}
        if "weight" not in head_keys:
            raise ConfigError(f"{path}: no score head in the adapter (expected a SEQ_CLS adapter)")
        result = set_peft_model_state_dict(
            self.peft, {k: v for k, v in weights.items() if "lora_" in k}, adapter_name=REWARD)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{path}: adapter weights do not fit the base: "
                              f"{result.unexpected_keys[:3]}")
        w = weights[head_keys["weight"]]
        head = torch.nn.Linear(w.size(1), w.size(0), bias="bias" in head_keys)
        head.load_state_dict({"weight": w, **({"bias": weights[head_keys["bias"]]}
                                             if "bias" in head_keys else {})})
        head.requires_grad_(False)
        return head

    # -- the interface the loop uses -----------------------------------------------------------

    @property
    def value(self):
        return self.value_head

    @property
    def value_model(self):   # what the value loss backpropagates through (one process only)
        return self.value_head

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"peft": self.peft}
        if self.value_head is not None:
            out["value_head"] = self.value_head
        return out

    def held(self) -> list[torch.nn.Module]:
        return [m for m in (self.peft, self.value_head, self.reward_head) if m is not None]

    def rollout_models(self) -> list[torch.nn.Module]:
        """The models whose forwards read rollouts: the one base, under each adapter."""
        return [self.policy]

    def one_model_params(self) -> int:
        return sum(p.numel() for n, p in self.peft.named_parameters() if "lora_" not in n)

    def to(self, device) -> SharedRoles:
        for m in self.held():
            m.to(device)
        return self

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return self.adapter_parameters(POLICY)

    def value_parameters(self) -> list[torch.nn.Parameter]:
        return self.adapter_parameters(VALUE) + list(self.value_head.parameters())

    def values(self, rollout: Rollout, pack: bool | str = False) -> torch.Tensor:
        with self._active(VALUE):
            return token_values(backbone(self.policy), self.value_head, rollout, pack)

    def train(self, mode: bool = True) -> None:
        self.peft.train(mode)
        if self.value_head is not None:
            self.value_head.train(mode)

    def save_policy(self, out_dir, tokenizer) -> Path:
        """Merge the policy adapter into the base and save it. Call last: the base is changed."""
        from alignkit.engine.models import save_model

        merged = self.peft.merge_and_unload(adapter_names=[POLICY])
        return save_model(merged, tokenizer, out_dir, merge_lora=False)


PLACEMENTS = {"separate": SeparateRoles, "shared": SharedRoles}


def build_roles(placement: str, spec: RoleSpec, tokenizer, needs_value: bool, strategy=None):
    """The roles of ``placement``; ``strategy``: the run's training strategy, which builds the
    separate placement's models (the shared placement runs in one process)."""
    try:
        cls = PLACEMENTS[placement]
    except KeyError:
        raise ConfigError(f"unknown roles placement {placement!r}; known: {sorted(PLACEMENTS)}") from None
    return cls(spec, tokenizer, needs_value, strategy)


def memory_report(roles) -> dict[str, float]:
    """Parameters held for all roles, against one copy of the policy's base model, and the
    process's peak resident memory."""
    import resource

    held = params_in_memory(roles.held())
    without_adapters = params_in_memory(roles.held(), adapters=False)
    one_model = roles.one_model_params()
    trainable = params_in_memory([torch.nn.ParameterList(
        roles.policy_parameters() + (roles.value_parameters() if roles.value is not None else []))])
    return {"params_in_memory": held, "params_trainable": trainable,
            "params_one_model": one_model, "params_ratio_vs_one_model": held / one_model,
            # The yardstick: models held, adapters aside (shared ~1.0, separate ~4.0).
            "params_ratio_without_adapters": without_adapters / one_model,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
