"""Direct alignment from preferences on a batch: DPO, cDPO, IPO, hinge, KTO, SimPO, ORPO, and
any loss registered with ``dap=`` in :mod:`alignkit.math.losses`.

Chosen and rejected sequences (or, unpaired, completions and KTO's mismatched pairs) go through
one forward pass; each sequence's completion log-probs are summed (:func:`completion_logps`).
The reference's are computed once before training and cached in the examples
(:func:`cache_reference`); a training step never calls the reference. The registered loss is
called with keyword arguments by name from what the batch provides (see
:class:`alignkit.math.losses.DAPNeeds`) plus the hyperparameters of :class:`LossConfig` that it
declares, so a new DAP loss is one registered function and its tests.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from alignkit.config import require
from alignkit.engine.forward import causal_logits, target_logps
from alignkit.engine.training import LossOutput
from alignkit.math.logprobs import IGNORE_INDEX, next_token_logps, sum_per_sequence
from alignkit.math.losses import DAP_LOSSES, dpo_implicit_rewards, get_loss, kto_reference_point


@dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"               # a loss registered with dap= (dpo, cdpo, ipo, hinge, kto, ...)
    beta: float = 0.1               # DPO/cDPO/hinge/KTO/SimPO beta; IPO tau
    label_smoothing: float = 0.1    # cDPO epsilon
    gamma: float = 0.5              # SimPO target margin (in units of beta-scaled reward)
    orpo_lambda: float = 0.1        # ORPO weight of the odds-ratio term
    desirable_weight: float = 1.0   # KTO lambda_D
    undesirable_weight: float = 1.0 # KTO lambda_U

    def __post_init__(self):
        require(self.name in DAP_LOSSES, f"loss.name {self.name!r} is not one of "
                f"{sorted(DAP_LOSSES)}")
        require(self.beta > 0, "loss.beta must be > 0")
        require(0 <= self.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)")

    @property
    def paired(self) -> bool:
        return DAP_LOSSES[self.name].paired

    @property
    def needs_reference(self) -> bool:
        return DAP_LOSSES[self.name].reference


# ----------------------------------------------------------------------------------------------
# Sequence log-probs: one forward pass over a padded or packed batch, summed over completion tokens.


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labelled tokens and their count: ``([N], [N])``, for a
    padded or a packed batch (one that lists its targets: ``collate_shared``)."""
    if "target_positions" in batch:
        return target_logps(model, batch)
    per_token, targets = next_token_logps(causal_logits(model, batch), batch["labels"])
    return (sum_per_sequence(per_token, batch),
            sum_per_sequence((targets != IGNORE_INDEX).float(), batch))


@torch.no_grad()
def cache_reference(reference, examples: list[dict], pad_id: int, batch_size: int = 32,
                    pack: str | None = None, rank: int = 0, world: int = 1) -> None:
    """Store ``ref_chosen_logps``/``ref_rejected_logps`` (or ``ref_logps``, ``ref_kl_logps``
    for unpaired data) in each example, computed once with the reference in eval mode (fp32),
    on padded or (given a layout: ``collate_rows``) packed batches of ``batch_size`` examples.

    On ``world`` processes (call it on every one, with the same examples): process ``rank``
    computes every ``world``-th batch and the values are all-gathered, so each process ends with
    all of them, those of one process's run to the bit (the same batches). Every process makes
    the same number of forward calls (one repeats a batch where the count is uneven): a sharded
    reference (``Strategy.prepare_frozen``) gathers its parameters from all of them in each."""
    from alignkit.data.collate import collate_rows, to_device

    reference.eval()
    device = next(reference.parameters()).device
    fields = _sequence_fields(examples[0])
    starts = list(range(0, len(examples), batch_size))
    mine = starts[rank::world]
    values: dict[int, list[float]] = {}
    for r in range(-(-len(starts) // world)):
        s = mine[r] if r < len(mine) else starts[0]
        chunk = examples[s:s + batch_size]
        # All of a chunk's sequences in one batch, in collate_dap's order (the shared layout
        # pairs sequence i with i + len(chunk)).
        rows = [{"input_ids": e[f"{key}input_ids"], "labels": e[f"{key}labels"]}
                for key in fields for e in chunk]
        logps = completion_logps(reference, to_device(collate_rows(rows, pad_id, pack), device))
        if r < len(mine):
            values[s] = logps[0].tolist()
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, values)
        values = {s: v for part in parts for s, v in part.items()}
    for s, logps in values.items():
        chunk = examples[s:s + batch_size]
        for j, key in enumerate(fields):
            for e, v in zip(chunk, logps[j * len(chunk):(j + 1) * len(chunk)]):
                e[f"ref_{key}logps"] = v


def _sequence_fields(example: dict) -> list[str]:
    """Key prefixes of the sequences an example holds: chosen_/rejected_, or ''/kl_."""
    if "chosen_input_ids" in example:
        return ["chosen_", "rejected_"]
    return ["", "kl_"]


def unpair(examples: list[dict]) -> list[dict]:
    """Tokenised preference pairs as KTO's unpaired examples, as TRL's
    ``unpair_preference_dataset`` makes them: each pair gives its chosen completion as a desirable
    example and its rejected one as an undesirable example, after the same prompt tokens."""
    return [{"input_ids": e[f"{key}_input_ids"], "labels": e[f"{key}_labels"], "label": label}
            for e in examples for key, label in (("chosen", True), ("rejected", False))]


def add_kto_mismatch(examples: list[dict]) -> None:
    """KTO's reference point uses mismatched (prompt, completion) pairs (Ethayarajh et al. 2024,
    §4.1): example ``i`` is paired with the completion of the next example whose prompt differs
    (``i + 1`` unless that shares the prompt, as the two halves of an :func:`unpair`-ed pair do;
    when every prompt is the same, ``i + 1``), fixed up front so the cached reference log-probs
    match what the policy sees."""
    n = len(examples)
    starts = [next(j for j, t in enumerate(e["labels"]) if t != IGNORE_INDEX) for e in examples]
    prompts = [tuple(e["input_ids"][:s]) for e, s in zip(examples, starts)]
    # after[i] over the list written twice: the first index past i whose prompt differs from i's.
    after: list[int | None] = [None] * (2 * n)
    for i in range(2 * n - 2, -1, -1):
        nxt = (i + 1) % n
        after[i] = nxt if prompts[nxt] != prompts[i % n] else after[i + 1]
    for i, e in enumerate(examples):
        j = after[i] if after[i] is not None else (i + 1) % n
        completion = examples[j]["input_ids"][starts[j]:]
        e["kl_input_ids"] = e["input_ids"][:starts[i]] + completion
        e["kl_labels"] = [IGNORE_INDEX] * starts[i] + completion


def collate_dap(examples: list[dict], pad_id: int, pack: str | None = None) -> dict:
    """All sequences of the batch in one right-padded block (chosen rows, then rejected rows;
    or completions then KTO mismatched pairs), or packed in that order given a layout
    (``pack``: ``collate_packed``), plus the cached reference values."""
    from alignkit.data.collate import collate_rows

    fields = _sequence_fields(examples[0])
    rows = [{"input_ids": e[f"{k}input_ids"], "labels": e[f"{k}labels"]}
            for k in fields for e in examples]
    batch = collate_rows(rows, pad_id, pack)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float64)
    if "label" in examples[0]:
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


# ----------------------------------------------------------------------------------------------
# The loss of a batch: the registered function, called by the names it declares.


def batch_inputs(logps: torch.Tensor, lengths: torch.Tensor, batch: dict, paired: bool) -> dict:
    """What a batch provides to a DAP loss, by the names of :class:`~alignkit.math.losses.DAPNeeds`:
    the policy's summed log-probs and lengths of the first and second half of the sequences, the
    cached reference values, and (unpaired) the labels and KTO's reference point ``z0``."""
    b = logps.shape[0] // 2
    if paired:
        out = {"policy_chosen_logps": logps[:b], "policy_rejected_logps": logps[b:],
               "chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:]}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in batch:
                out[key] = batch[key].float()
        return out
    # The reference point is not trained (Ethayarajh et al. 2024, §4.1).
    return {"policy_logps": logps[:b], "ref_logps": batch["ref_logps"].float(),
            "is_desirable": batch["label"].bool(),
            "kl_ref_point": kto_reference_point(logps[b:].detach(), batch["ref_kl_logps"].float())}


def make_loss(cfg: LossConfig):
    """``loss_fn(model, batch) -> LossOutput`` of the registered loss ``cfg.name``; paired losses
    also report the implicit rewards (``rewards/chosen``, ``/rejected``, ``/margin``,
    ``/accuracy``): ``beta`` times the log-ratio to the reference, or the length-normalised
    log-prob for reference-free losses (SimPO's reward, Meng et al. 2024, eq. 4); unpaired
    (KTO) ones report what TRL's KTO logs (:func:`kto_metrics`)."""
    fn = get_loss(cfg.name)
    declared = inspect.signature(fn).parameters
    hyper = {k: v for k, v in dataclasses.asdict(cfg).items() if k in declared}

    def loss_fn(model, batch) -> LossOutput:
        given = batch_inputs(*completion_logps(model, batch), batch, cfg.paired)
        values = fn(**{k: v for k, v in given.items() if k in declared}, **hyper)
        if cfg.paired:
            metrics = implicit_reward_metrics(given, cfg.beta, cfg.needs_reference)
        else:
            metrics = kto_metrics(given, cfg.beta)
        return LossOutput(values=values, weights=torch.ones_like(values), metrics=metrics)

    return loss_fn


def implicit_reward_metrics(given: dict, beta: float, reference: bool) -> dict:
    """Summed implicit rewards of a batch's pairs and their count, as ``LossOutput.metrics``."""
    if reference:
        chosen, rejected = dpo_implicit_rewards(
            given["policy_chosen_logps"], given["policy_rejected_logps"],
            given["ref_chosen_logps"], given["ref_rejected_logps"], beta)
    else:
        chosen = beta * given["policy_chosen_logps"] / given["chosen_lengths"]
        rejected = beta * given["policy_rejected_logps"] / given["rejected_lengths"]
    b = chosen.shape[0]
    return {"rewards/chosen": (chosen.detach().sum(), b),
            "rewards/rejected": (rejected.detach().sum(), b),
            "rewards/margin": ((chosen - rejected).detach().sum(), b),
            "rewards/accuracy": ((chosen > rejected).float().sum(), b)}


def kto_metrics(given: dict, beta: float) -> dict:
    """KTO's metrics as TRL logs them, as ``LossOutput.metrics``: the mean implicit reward
    ``beta * (log pi(y|x) - log ref(y|x))`` and policy log-prob of the desirable (``chosen``) and
    undesirable (``rejected``) examples, the reference point ``kl`` (``z0``, the mean of the
    micro-batches' estimates) and the step's ``count/chosen`` / ``count/rejected`` (totals). A
    step without examples of one kind logs 0 for its means."""
    desirable = given["is_desirable"].bool()
    logps = given["policy_logps"].detach()
    rewards = beta * (logps - given["ref_logps"])
    n_d = int(desirable.sum())
    n_u = desirable.numel() - n_d
    return {"rewards/chosen": (rewards[desirable].sum(), n_d),
            "rewards/rejected": (rewards[~desirable].sum(), n_u),
            "logps/chosen": (logps[desirable].sum(), n_d),
            "logps/rejected": (logps[~desirable].sum(), n_u),
            "kl": (torch.as_tensor(given["kl_ref_point"]).detach(), 1),
            "count/chosen": (torch.tensor(float(n_d)), None),
            "count/rejected": (torch.tensor(float(n_u)), None)}
