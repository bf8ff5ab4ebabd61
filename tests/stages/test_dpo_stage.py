"""Offline ``alignkit dpo`` end to end on a tiny model: KTO on preference pairs (split as TRL
splits them) and its metrics."""

import json

import pytest
import torch

from alignkit.config import build
from alignkit.data.io import DataError
from alignkit.stages import dpo
from alignkit.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n=8):
    return [{"prompt": p, "chosen": " a warm and lovely film.", "rejected": " dull, dull and slow."}
            for p in get_task("sentiment").prompts("train", n)]


def _cfg(model, out, train, **extra):
    return build(dpo.Config, {
        "model": str(model), "out_dir": str(out), "data": {"train": str(train), "max_length": 64},
        "loss": {"name": "kto", "beta": 0.5},
        "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "mixed_precision": "no",
                  "log_every": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 0}, **extra})


def _weights(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_kto_on_preference_pairs_equals_kto_on_their_unpaired_split(tiny_base, tmp_path):
    pairs = _pairs()
    paired = dpo.main(_cfg(tiny_base, tmp_path / "paired", _write(tmp_path / "prefs.jsonl", pairs)))
    assert (paired["desirable"], paired["undesirable"]) == (8, 8)
    # TRL's unpair_preference_dataset, written out: the chosen completion desirable, the rejected not
    unpaired_rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                     for r in pairs for key in ("chosen", "rejected")]
    unpaired = dpo.main(_cfg(tiny_base, tmp_path / "unpaired",
                             _write(tmp_path / "kto.jsonl", unpaired_rows)))
    assert paired["train_loss"] == pytest.approx(unpaired["train_loss"], abs=1e-7)
    assert torch.equal(_weights(tmp_path / "paired" / "model"), _weights(tmp_path / "unpaired" / "model"))
    assert not torch.equal(_weights(tmp_path / "paired" / "model"), _weights(tiny_base))

    steps = [json.loads(x) for x in (tmp_path / "paired" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 3
    # each step's 8 examples (totals, not means); an epoch's two steps see all 16, 8 of a kind
    assert [s["count/chosen"] + s["count/rejected"] for s in steps] == [8, 8, 8]
    assert steps[0]["count/chosen"] + steps[1]["count/chosen"] == 8
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6) and steps[-1]["kl"] > 0
    # the first step's policy is the reference: every implicit reward is 0
    assert (steps[0]["rewards/chosen"], steps[0]["rewards/rejected"]) == (pytest.approx(0, abs=1e-5),) * 2
    # KTO pushes the desirable completions up and the undesirable ones down
    assert steps[-1]["rewards/chosen"] > 0 > steps[-1]["rewards/rejected"]
    assert paired["rewards/chosen"] == steps[-1]["rewards/chosen"] and paired["kl"] == steps[-1]["kl"]


def test_kto_refuses_demonstrations_naming_file_and_line(tiny_base, tmp_path):
    demos = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"sft.jsonl:1: prompt_completion records \(prompt, completion\), "
                                        r"but this stage trains on unpaired or preference records"):
        dpo.main(_cfg(tiny_base, tmp_path / "out", demos))
