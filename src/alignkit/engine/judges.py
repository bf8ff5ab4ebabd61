"""AI labelers: a language model judges pairs (RLAIF) or scores responses (d-RLAIF).

Pairwise (Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback with AI
Feedback", Sec. 2.1; Zheng et al. 2023, "Judging LLM-as-a-Judge", Sec. 3): a versioned template
(preamble, optional few-shot examples, the pair, a question) is sent to a judge model. Where the
backend exposes log-probs, the soft label is read from the first answer token (Lee et al. Sec. 2.1)

    q = exp(lp("1")) / (exp(lp("1")) + exp(lp("2")))          P(the response in slot 1 wins)

otherwise the answer text is parsed; an answer that is neither is counted as unparseable, never
dropped silently. With chain-of-thought (Lee et al. Sec. 2.1.2) the judge first writes a rationale,
then the verdict is asked for with the rationale in context. Position bias (Zheng et al. Sec. 3.3,
Lee et al. Sec. 2.1.3): each pair is judged in both orders and the two estimates averaged,

    P(a > b) = (q(a, b) + 1 - q(b, a)) / 2;

the position-bias rate is the share of pairs where the same slot wins in both orders.

Pointwise (d-RLAIF, Lee et al. 2023 Sec. 2.3 / 4.5): a 1-10 score whose expected value under the
token probabilities, ``s = sum_k k p(k)``, is rescaled to ``r = (s - 5.5) / 4.5`` in [-1, 1];
:func:`make_judge_reward` makes that a reward source (``judge:CONFIG``) for PPO, ReST, BoN.

Backends: a local causal LM (:class:`LocalBackend`: one forward pass for the verdict log-probs,
:func:`alignkit.engine.generation.generate` for rationales) and any OpenAI-compatible endpoint
(:class:`HttpBackend`: stdlib ``urllib``, a concurrency limit, timeouts, retries with exponential
backoff on 429 / 5xx / connection errors). Either runs where its ``workers`` say (a stage's
``workers`` section, :mod:`alignkit.engine.workers`): in this process, or on Ray actors, the local
model's batches (the same batches, so the same answers) or the endpoint's requests in chunks.
Every request is cached in the preference store
(:meth:`~alignkit.data.store.PreferenceStore.request_key`), so a re-run or a resumed run never
pays twice, and every pairwise judgement is recorded there with source ``ai``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from alignkit.config import require

if TYPE_CHECKING:
    from alignkit.data.store import PreferenceStore

PAIRWISE_LABELS = ("1", "2")
POINTWISE_LABELS = tuple(str(k) for k in range(1, 11))
Messages = list[dict[str, str]]

# ----------------------------------------------------------------------------------------------
# Configuration.


@dataclass(frozen=True)
class TemplateConfig:
    """A judging prompt. ``item`` holds ``{prompt}`` and ``{response_a}``/``{response_b}``
    (pairwise) or ``{response}`` (pointwise); ``version`` is recorded with every label.

    ``few_shot`` examples are dicts with the item's fields plus ``answer`` ("1"/"2", or "1".."10")
    and, with ``chain_of_thought``, a ``rationale``. In the ``text`` format each assistant turn is
    written after ``answer_prefix`` and the prompt ends with it."""

    kind: Literal["pairwise", "pointwise"] = "pairwise"
    version: str = "pairwise-v1"
    preamble: str = ("You are a careful judge. A good response follows the prompt and is "
                     "helpful, accurate and well written.")
    item: str = "Prompt: {prompt}\nResponse 1: {response_a}\nResponse 2: {response_b}"
    question: str = "Which response is better? Answer 1 or 2."
    few_shot: list[dict] = field(default_factory=list)
    chain_of_thought: bool = False
    rationale_request: str = "Explain briefly which response is better and why."
    verdict_request: str = "Which response is better? Answer 1 or 2."
    rationale_max_tokens: int = 128
    answer_prefix: str = "Answer:"
    # The question before the item: the answer then follows the responses directly, which small
    # judges learn to read far more easily than text a question-length away.
    question_first: bool = False

    def __post_init__(self):
        fields = {"prompt", "response_a", "response_b"} if self.kind == "pairwise" \
            else {"prompt", "response"}
        used = set(re.findall(r"{(\w+)}", self.item))
        require(used <= fields and used - {"prompt"},
                f"template.item may use {sorted(fields)} (got {sorted(used)})")
        require(self.rationale_max_tokens >= 1, "template.rationale_max_tokens must be >= 1")
        labels = PAIRWISE_LABELS if self.kind == "pairwise" else POINTWISE_LABELS
        for i, ex in enumerate(self.few_shot):
            require(set(fields) <= set(ex) and str(ex.get("answer")) in labels,
                    f"template.few_shot[{i}] needs {sorted(fields)} and an answer in {labels}")
            require(not self.chain_of_thought or bool(ex.get("rationale")),
                    f"template.few_shot[{i}] needs a rationale when chain_of_thought is on")

    @property
    def labels(self) -> tuple[str, ...]:
        return PAIRWISE_LABELS if self.kind == "pairwise" else POINTWISE_LABELS


def _pointwise_template() -> TemplateConfig:
    return TemplateConfig(
        kind="pointwise", version="pointwise-v1",
        item="Prompt: {prompt}\nResponse: {response}",
        question="Rate the response from 1 (worst) to 10 (best). Answer with the number only.",
        rationale_request="Explain briefly how good the response is.",
        verdict_request="Rate the response from 1 to 10. Answer with the number only.")


@dataclass(frozen=True)
class HttpConfig:
    """An OpenAI-compatible endpoint (``base_url`` ends in ``/v1``)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api: Literal["chat", "completions"] = "chat"    # /chat/completions or /completions
    api_key_env: str | None = "OPENAI_API_KEY"      # read at run time; never stored in a config
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0          # first retry waits ~backoff_s, then doubling
    backoff_max_s: float = 60.0

    def __post_init__(self):
        require(self.base_url.startswith(("http://", "https://")), "http.base_url must be http(s)")
        require(self.concurrency >= 1, "http.concurrency must be >= 1")
        require(self.timeout_s > 0 and self.max_retries >= 0 and self.backoff_s >= 0,
                "http.timeout_s must be > 0, max_retries and backoff_s >= 0")


@dataclass(frozen=True)
class PriceConfig:
    """Dollars per million tokens (0 for a local model)."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def __post_init__(self):
        require(self.input_per_million >= 0 and self.output_per_million >= 0,
                "price per million tokens must be >= 0")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million
                + completion_tokens * self.output_per_million) / 1e6


@dataclass(frozen=True)
class JudgeConfig:
    """One judge: a model behind a backend, with a pairwise and a pointwise template."""

    model: str = ""                  # local: path of a causal LM; http: the endpoint's model name
    backend: Literal["local", "http"] = "local"
    id: str = ""                     # recorded as the annotator; default derived from the model
    format: Literal["chat", "text"] = "chat"   # chat messages, or one text prompt
    swap: bool = True                # judge both orders and average (position-bias mitigation)
    top_logprobs: int = 20           # http: alternatives asked for at the verdict token
    batch_size: int = 32             # local: rows per forward pass
    # local: the sampling backend (sampling.engine's registry, BACKENDS) of answers the judge
    # generates (rationales, free-form verdicts); scored verdicts are one forward pass either way
    engine: str = "hf"
    pairwise: TemplateConfig = field(default_factory=TemplateConfig)
    pointwise: TemplateConfig = field(default_factory=_pointwise_template)
    http: HttpConfig = field(default_factory=HttpConfig)
    price: PriceConfig = field(default_factory=PriceConfig)
    store: str | None = None         # preference store for the request cache (reward-source use)

    def __post_init__(self):
        require(bool(self.model), "judge.model is required (a local path or the endpoint's model)")
        require(self.pairwise.kind == "pairwise", "judge.pairwise.kind must be 'pairwise'")
        require(self.pointwise.kind == "pointwise", "judge.pointwise.kind must be 'pointwise'")
        require(self.backend != "http" or self.format == "chat" or self.http.api == "completions",
                "judge.format=text needs http.api=completions")
        require(self.top_logprobs >= 2 and self.batch_size >= 1,
                "judge.top_logprobs must be >= 2 and judge.batch_size >= 1")
        from alignkit.engine.sampling import BACKENDS

        require(self.engine in BACKENDS,
                f"judge.engine {self.engine!r} is not one of {sorted(BACKENDS)}")


def template_version(t: TemplateConfig) -> str:
    """``version`` plus a digest of the whole template: an edited template never reuses the
    cached answers of the old one, even if nobody bumped ``version``."""
    digest = hashlib.sha256(json.dumps(asdict(t), sort_keys=True).encode()).hexdigest()
    return f"{t.version}#{digest[:8]}"


def judge_id(cfg: JudgeConfig) -> str:
    if cfg.id:
        return cfg.id
    if cfg.backend == "http":
        return f"http:{cfg.http.base_url}#{cfg.model}"
    return f"local:{cfg.model}@{_weights_fingerprint(cfg.model)}"


def _weights_fingerprint(path: str) -> str:
    """Cheap identity of a local model folder (names, sizes, first and last MiB of each weight
    file), so that a retrained model at the same path does not hit the old model's cache."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:8]


# ----------------------------------------------------------------------------------------------
# Rendering and parsing.


def _turn(t: TemplateConfig, fields: dict[str, str], ask: str) -> str:
    item = t.item.format(**fields)
    return f"{ask}\n{item}" if t.question_first else f"{item}\n{ask}"


def render_messages(t: TemplateConfig, fields: dict[str, str],
                    rationale: str | None = None) -> Messages:
    """Chat messages of one request: the rationale request (chain-of-thought step 1, when
    ``t.chain_of_thought`` and ``rationale`` is None) or the verdict request."""
    messages: Messages = [{"role": "system", "content": t.preamble}] if t.preamble else []
    for ex in t.few_shot:
        ex_fields = {k: str(v) for k, v in ex.items() if k not in ("answer", "rationale")}
        if t.chain_of_thought:
            messages += [{"role": "user", "content": _turn(t, ex_fields, t.rationale_request)},
                         {"role": "assistant", "content": ex["rationale"]},
                         {"role": "user", "content": t.verdict_request},
                         {"role": "assistant", "content": str(ex["answer"])}]
        else:
            messages += [{"role": "user", "content": _turn(t, ex_fields, t.question)},
                         {"role": "assistant", "content": str(ex["answer"])}]
    if not t.chain_of_thought:
        return messages + [{"role": "user", "content": _turn(t, fields, t.question)}]
    messages.append({"role": "user", "content": _turn(t, fields, t.rationale_request)})
    if rationale is None:
        return messages
    return messages + [{"role": "assistant", "content": rationale},
                       {"role": "user", "content": t.verdict_request}]


def render_text(messages: Messages, answer_prefix: str) -> str:
    """One text prompt for completion models: turns separated by blank lines, each assistant
    turn after ``answer_prefix``; ends with ``answer_prefix`` for the model to continue."""
    parts = []
    for m in messages:
        parts.append(f"{answer_prefix} {m['content']}" if m["role"] == "assistant" else m["content"])
    return "\n\n".join(parts + [answer_prefix])


def render(t: TemplateConfig, fields: dict[str, str], fmt: str,
           rationale: str | None = None) -> str | Messages:
    messages = render_messages(t, fields, rationale)
    return messages if fmt == "chat" else render_text(messages, t.answer_prefix)


def parse_verdict(text: str, labels: tuple[str, ...]) -> str | None:
    """The first stand-alone number in ``text`` that is one of ``labels``, else None."""
    for m in re.finditer(r"(?<![\d.])(\d+)(?!\.?\d)", text):
        if m.group(1) in labels:
            return m.group(1)
    return None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def soft_preference(logp_first: float, logp_second: float) -> float | None:
    """P(slot 1 wins) = exp(lp1) / (exp(lp1) + exp(lp2)) (Lee et al. 2023 Sec. 2.1), computed as
    sigmoid(lp1 - lp2); a label missing from the alternatives has lp = -inf. None if both are."""
    if logp_first == -math.inf and logp_second == -math.inf:
        return None
    if logp_second == -math.inf:
        return 1.0
    if logp_first == -math.inf:
        return 0.0
    return 0.5 * (1.0 + math.tanh((logp_first - logp_second) / 2.0))


def swap_average(q_ab: float | None, q_ba: float | None) -> float | None:
    """P(a wins) from both orders: (q(a, b) + 1 - q(b, a)) / 2, where q is P(slot 1 wins).
    One missing order (unparseable, failed) leaves the other; both missing gives None."""
    estimates = [q for q in (q_ab, None if q_ba is None else 1.0 - q_ba) if q is not None]
    return sum(estimates) / len(estimates) if estimates else None


def expected_score(label_logps: dict[str, float]) -> float | None:
    """``s = sum_k k p(k)`` with p renormalised over the score labels found (d-RLAIF)."""
    finite = {k: v for k, v in label_logps.items() if v > -math.inf}
    if not finite:
        return None
    z = _logsumexp(list(finite.values()))
    return sum(int(k) * math.exp(v - z) for k, v in finite.items())


def drlaif_reward(score: float) -> float:
    """Rescale a 1-10 score to [-1, 1]: r = (s - 5.5) / 4.5 (d-RLAIF)."""
    return (score - 5.5) / 4.5


def position_bias_rate(pairs: list[tuple[float | None, float | None]]) -> float | None:
    """Share of pairs judged in both orders whose two verdicts picked the same slot (a decided
    verdict: q != 0.5). The verdicts then contradict each other: position beat content."""
    decided = [(q1 > 0.5, q2 > 0.5) for q1, q2 in pairs
               if q1 is not None and q2 is not None and q1 != 0.5 and q2 != 0.5]
    return sum(x == y for x, y in decided) / len(decided) if decided else None


# ----------------------------------------------------------------------------------------------
# Backends: a list of requests in, one answer (or failure) per request out.


@dataclass(frozen=True)
class Request:
    prompt: Any                          # chat messages (list of dicts) or a text prompt (str)
    max_tokens: int
    labels: tuple[str, ...] = ()         # answer labels whose log-probs are wanted


@dataclass
class Answer:
    text: str
    label_logps: dict[str, float] | None  # log-probs of the labels at the first answer token
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class RequestFailed(Exception):
    """A request that could not be answered (after retries); counted, never a silent drop."""


class LocalBackend:
    """A causal LM on this machine, through the same prompt encoding as training and serving."""

    def __init__(self, path: str, batch_size: int = 32, model=None, tokenizer=None,
                 engine: str = "hf", workers=None):
        from alignkit.engine.models import load_causal_lm, load_tokenizer

        self.tokenizer = tokenizer or load_tokenizer(path)
        self.model = (model or load_causal_lm(path, tokenizer=self.tokenizer)).eval()
        self.batch_size = batch_size
        self.engine = engine             # the sampling backend of generated answers
        self.workers = workers           # WorkersConfig | None: where the batches run
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 10**9

    def complete(self, requests: list[Request]) -> list[Answer | RequestFailed]:
        from alignkit.data.formats import encode_prompt

        out: list[Answer | RequestFailed] = [RequestFailed("not run")] * len(requests)
        ids = [encode_prompt(r.prompt, self.tokenizer) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if len(ids[i]) >= self.context:
                out[i] = RequestFailed(f"prompt of {len(ids[i])} tokens exceeds the model's "
                                       f"context of {self.context}")
            else:
                groups.setdefault((r.labels, 0 if r.labels else r.max_tokens), []).append(i)
        for (labels, max_tokens), idx in groups.items():
            start = time.perf_counter()
            answers = (self._score([ids[i] for i in idx], labels) if labels
                       else self._generate([ids[i] for i in idx], max_tokens))
            per = (time.perf_counter() - start) / len(idx)
            for i, (text, logps, n_out) in zip(idx, answers):
                out[i] = Answer(text, logps, len(ids[i]), n_out, per)
        return out

    def _score(self, prompt_ids: list[list[int]], labels: tuple[str, ...]):
        cand = [self.tokenizer(x, add_special_tokens=False)["input_ids"] for x in labels]
        # Batches of similar lengths (the answers go back in the requests' order): on the demo's
        # judge prompts, padding to each batch's longest took 22% more tokens in request order,
        # 3% sorted.
        from alignkit.engine.workers import map_chunks

        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        chunks = [([prompt_ids[i] for i in idx], cand, self.tokenizer.pad_token_id)
                  for idx in batches]
        rows: list = [None] * len(prompt_ids)
        for idx, (logps, greedy) in zip(batches, map_chunks(candidate_logps, self.model, chunks,
                                                            self.workers)):
            for i, lp, g in zip(idx, logps.tolist(), greedy.tolist()):
                rows[i] = (self.tokenizer.decode([g], skip_special_tokens=True),
                           dict(zip(labels, lp)), 1)
        return rows

    def _generate(self, prompt_ids: list[list[int]], max_tokens: int):
        from alignkit.engine.sampling import SamplingConfig, sample

        room = self.context - max(len(p) for p in prompt_ids)
        cfg = SamplingConfig(max_new_tokens=max(1, min(max_tokens, room)), temperature=0.0,
                             engine=self.engine)
        rollout = sample(self.model, prompt_ids, cfg, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id, batch_size=self.batch_size,
                         workers=self.workers)
        texts = rollout.decode(self.tokenizer)
        return [(t.strip(), None, int(n)) for t, n in zip(texts, rollout.response_lengths())]


def candidate_logps(model, prompt_ids: list[list[int]], candidates: list[list[int]], pad_id: int):
    """Log-probability that the answer to each prompt is each candidate, ``[B, K]``, and the
    greedy first answer token ``[B]`` (CPU tensors).

    Single-token candidates with distinct tokens (the usual "1"/"2"): one forward pass over the
    prompts, the next-token log-probs of the candidates. Otherwise (e.g. "10" tokenised as "1",
    "0"): one row per (prompt, candidate) and ``log P(c) = sum_i log p(c_i | c_<i) + log p(stop | c)``
    where ``p(stop | c) = 1 - sum p(next token of a longer candidate that extends c)``, so that
    "1" does not also count the mass of "10".
    """
    import torch

    firsts = [c[0] for c in candidates]
    if all(len(c) == 1 for c in candidates) and len(set(firsts)) == len(firsts):
        first = torch.cat(_logps_at(model, prompt_ids, [[len(p) - 1] for p in prompt_ids], pad_id))
        return first[:, torch.tensor(firsts)], first.argmax(-1)
    rows = [p + c for p in prompt_ids for c in candidates]
    spans = [list(range(len(p) - 1, len(p) + len(c))) for p in prompt_ids for c in candidates]
    per_row = _logps_at(model, rows, spans, pad_id)     # [len(c) + 1, V] per row
    k = len(candidates)
    out = torch.empty(len(prompt_ids), k)
    for b in range(len(prompt_ids)):
        for j, c in enumerate(candidates):
            lp = per_row[b * k + j]
            path = float(sum(lp[i, t] for i, t in enumerate(c)))
            nxt = sorted({d[len(c)] for d in candidates if len(d) > len(c) and d[:len(c)] == c})
            cont = float(lp[len(c), nxt].exp().sum()) if nxt else 0.0
            out[b, j] = path + math.log(max(1.0 - cont, 1e-12))
    greedy = torch.stack([per_row[b * k][0] for b in range(len(prompt_ids))]).argmax(-1)
    return out, greedy


def _logps_at(model, rows: list[list[int]], positions: list[list[int]], pad_id: int) -> list:
    """Next-token log-probs ``[len(positions[r]), V]`` (fp32) at the given positions of each row;
    one right-padded forward pass."""
    import torch

    from alignkit.data.collate import pad_sequences
    from alignkit.engine.forward import forward_parameters

    ids = pad_sequences(rows, pad_id, "right")
    device = next(model.parameters()).device
    kw = {}
    # The LM head only at the positions asked for (their union over the rows), where the
    # forward takes ``logits_to_keep`` as indices: a verdict reads one position of ~170.
    if "logits_to_keep" in forward_parameters(model):
        keep = sorted({q for pos in positions for q in pos})
        kw["logits_to_keep"] = torch.tensor(keep, device=device)
        column = {q: j for j, q in enumerate(keep)}
        positions = [[column[q] for q in pos] for pos in positions]
    # Right padding and causal attention: a real token attends only to the real tokens before
    # it and sits at its own index, so neither a mask nor position ids are needed (plain causal
    # attention, no mask built); padding's outputs are never read.
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), use_cache=False, **kw).logits
    return [torch.log_softmax(logits[r, pos].float(), dim=-1).cpu()
            for r, pos in enumerate(positions)]


class HttpBackend:
    """An OpenAI-compatible endpoint: ``/chat/completions`` or ``/completions`` with log-probs."""

    def __init__(self, cfg: HttpConfig, model: str, top_logprobs: int = 20, workers=None):
        self.cfg, self.model, self.top_logprobs = cfg, model, top_logprobs
        self.workers = workers           # WorkersConfig | None: where the requests are sent from
        self.retries = 0
        self._lock = threading.Lock()

    def complete(self, requests: list[Request]) -> list[Answer | RequestFailed]:
        """The answers in request order. On Ray workers: chunks of ``4 x http.concurrency``
        requests, each sent by an actor with ``http.concurrency`` in flight (so up to
        ``workers.num x http.concurrency`` in all); a chunk whose actor died is sent again."""
        if self.workers is None or self.workers.backend == "local":
            with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
                return list(pool.map(self._one, requests))
        from alignkit.engine.workers import map_chunks

        step = 4 * self.cfg.concurrency
        chunks = [(self.cfg, self.model, self.top_logprobs, requests[s:s + step])
                  for s in range(0, len(requests), step)]
        out: list[Answer | RequestFailed] = []
        for answers, retries in map_chunks(_http_chunk, None, chunks, self.workers):
            out += answers
            with self._lock:
                self.retries += retries
        return out

    def _one(self, r: Request) -> Answer | RequestFailed:
        chat = self.cfg.api == "chat"
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.max_tokens, "temperature": 0.0}
        if chat:
            body["messages"] = r.prompt
            if r.labels:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["prompt"] = r.prompt
            if r.labels:
                body["logprobs"] = self.top_logprobs
        start = time.perf_counter()
        try:
            reply = self.post("/chat/completions" if chat else "/completions", body)
            choice = reply["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            first = _first_token_alternatives(choice.get("logprobs"), chat) if r.labels else None
        except RequestFailed as exc:
            return exc
        except (KeyError, IndexError, TypeError) as exc:
            return RequestFailed(f"malformed reply from {self.cfg.base_url}: {exc!r}")
        usage = reply.get("usage") or {}
        logps = None
        if first:
            logps = {lab: _logsumexp([lp for tok, lp in first if tok.strip() == lab] or [-math.inf])
                     for lab in r.labels}
        return Answer(text or "", logps, int(usage.get("prompt_tokens", 0)),
                      int(usage.get("completion_tokens", 0)), time.perf_counter() - start)

    def post(self, path: str, body: dict) -> dict:
        """POST JSON with retries: 429, 5xx, timeouts and connection errors back off
        exponentially (honouring Retry-After); other HTTP errors fail at once."""
        url = self.cfg.base_url.rstrip("/") + path
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                last = f"HTTP {exc.code}: {detail}"
                if exc.code != 429 and exc.code < 500:
                    raise RequestFailed(f"{url}: {last}") from None
                wait = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < self.cfg.max_retries:
                with self._lock:
                    self.retries += 1
                backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** attempt)
                # Jitter spreads the retries of concurrent workers that failed together.
                time.sleep(wait if wait is not None else backoff * (0.5 + 0.5 * random.random()))
        raise RequestFailed(f"{url}: gave up after {self.cfg.max_retries + 1} attempts ({last})")


def _http_chunk(_model, cfg: HttpConfig, model: str, top_logprobs: int,
                requests: list[Request]) -> tuple[list[Answer | RequestFailed], int]:
    """One chunk of an endpoint's requests, sent from a worker: the answers and the retries."""
    backend = HttpBackend(cfg, model, top_logprobs)
    return backend.complete(requests), backend.retries


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _first_token_alternatives(logprobs: dict | None, chat: bool) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` alternatives at the first answer token of an OpenAI reply."""
    if not logprobs:
        return None
    if chat:
        content = logprobs.get("content") or []
        return [(a["token"], a["logprob"]) for a in content[0].get("top_logprobs", [])] \
            if content else None
    tops = logprobs.get("top_logprobs") or []
    return list(tops[0].items()) if tops and tops[0] else None


def make_backend(cfg: JudgeConfig, workers=None):
    """The judge's backend; ``workers`` (a ``WorkersConfig``, None: this process): where it runs."""
    if cfg.backend == "http":
        return HttpBackend(cfg.http, cfg.model, cfg.top_logprobs, workers=workers)
    return LocalBackend(cfg.model, cfg.batch_size, engine=cfg.engine, workers=workers)


# ----------------------------------------------------------------------------------------------
# Judges.


@dataclass
class Outcome:
    """One request (both chain-of-thought steps) for one order of one pair, or one response."""

    raw: dict | None                 # {"answer", "rationale", "label_logps"}; None if it failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    cached: bool = False
    error: str | None = None


@dataclass
class Judgement:
    """A pair's verdict: ``prob_a`` = P(a preferred), ``label`` a/b/tie; None when no order gave
    a usable answer. ``slot_probs`` are P(slot 1 wins) per order, (a, b) first."""

    prob_a: float | None
    label: str | None
    slot_probs: list[float | None]
    outcomes: list[Outcome]

    @property
    def cost(self) -> float:
        return sum(o.cost for o in self.outcomes)

    @property
    def rationale(self) -> str | None:
        parts = [o.raw["rationale"] for o in self.outcomes if o.raw and o.raw.get("rationale")]
        return "\n---\n".join(parts) if parts else None


class _Judge:
    def __init__(self, cfg: JudgeConfig, template: TemplateConfig, backend=None,
                 store: PreferenceStore | None = None):
        self.cfg, self.template = cfg, template
        self.backend = backend if backend is not None else make_backend(cfg)
        self.store = store
        self.id = judge_id(cfg)
        self.template_version = template_version(template)
        self.counts = {"requests": 0, "cache_hits": 0, "failed": 0, "unparseable": 0,
                       "prompt_tokens": 0, "completion_tokens": 0, "cost_spent": 0.0}

    def _run(self, fields: list[tuple[str, str, str]]) -> list[Outcome]:
        """Outcomes of ``(prompt, first, second)`` requests (second is "" for pointwise), from
        the store's cache where an identical request was answered before."""
        keys = [self.store.request_key(self.id, self.template_version, *f) if self.store else None
                for f in fields]
        outcomes: list[Outcome | None] = [self._cached(k) for k in keys]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        for i, fresh in zip(todo, self._ask([fields[i] for i in todo])):
            outcomes[i] = fresh
            if fresh.raw is not None and self.store is not None:
                self.store.put_cached(keys[i], judge=self.id, template_version=self.template_version,
                                      answer=json.dumps(fresh.raw, sort_keys=True),
                                      prompt_tokens=fresh.prompt_tokens,
                                      completion_tokens=fresh.completion_tokens, cost=fresh.cost)
        self.counts["requests"] += len(fields)
        self.counts["cache_hits"] += len(fields) - len(todo)
        for i in todo:
            o = outcomes[i]
            self.counts["failed"] += o.raw is None
            self.counts["prompt_tokens"] += o.prompt_tokens
            self.counts["completion_tokens"] += o.completion_tokens
            self.counts["cost_spent"] += o.cost
        return outcomes  # type: ignore[return-value]

    def _cached(self, key: str | None) -> Outcome | None:
        row = self.store.get_cached(key) if key else None
        if row is None:
            return None
        return Outcome(json.loads(row["answer"]), row["prompt_tokens"] or 0,
                       row["completion_tokens"] or 0, row["cost"] or 0.0, cached=True)

    def _fields(self, prompt: str, first: str, second: str) -> dict[str, str]:
        if self.template.kind == "pairwise":
            return {"prompt": prompt, "response_a": first, "response_b": second}
        return {"prompt": prompt, "response": first}

    def _ask(self, fields: list[tuple[str, str, str]]) -> list[Outcome]:
        """Send the requests (rationale first with chain-of-thought, then the verdict)."""
        t, fmt = self.template, self.cfg.format
        kw = [self._fields(*f) for f in fields]
        rationales: list[str | None] = [None] * len(kw)
        step1: list[Answer | RequestFailed | None] = [None] * len(kw)
        if t.chain_of_thought:
            step1 = self.backend.complete([Request(render(t, k, fmt), t.rationale_max_tokens)
                                           for k in kw])
            rationales = [a.text.strip() if isinstance(a, Answer) else None for a in step1]
        verdict_tokens = 1 if t.kind == "pairwise" else 3   # "10" may be two tokens
        todo = [i for i in range(len(kw)) if not isinstance(step1[i], RequestFailed)]
        step2: list[Answer | RequestFailed] = list(step1)  # type: ignore[arg-type]
        answers = self.backend.complete([Request(render(t, kw[i], fmt, rationales[i]),
                                                 verdict_tokens, t.labels) for i in todo])
        for i, a in zip(todo, answers):
            step2[i] = a
        return [self._outcome(s1, s2, r) for s1, s2, r in zip(step1, step2, rationales)]

    def _outcome(self, step1, step2, rationale) -> Outcome:
        steps = [a for a in (step1, step2) if isinstance(a, Answer)]
        p_tok = sum(a.prompt_tokens for a in steps)
        c_tok = sum(a.completion_tokens for a in steps)
        failed = next((a for a in (step1, step2) if isinstance(a, RequestFailed)), None)
        raw = None if failed else {"answer": step2.text, "rationale": rationale,
                                   "label_logps": step2.label_logps}
        return Outcome(raw, p_tok, c_tok, self.cfg.price.cost(p_tok, c_tok),
                       sum(a.latency_s for a in steps), error=str(failed) if failed else None)


class PairwiseJudge(_Judge):
    """Which of two responses is better: soft labels, both orders, the store's cache."""

    def __init__(self, cfg: JudgeConfig, backend=None, store: PreferenceStore | None = None):
        super().__init__(cfg, cfg.pairwise, backend, store)

    def slot_probability(self, raw: dict | None) -> float | None:
        """P(slot 1 wins) from a raw answer: soft from log-probs, else the parsed verdict."""
        if raw is None:
            return None
        lps = raw.get("label_logps")
        if lps:
            q = soft_preference(lps.get("1", -math.inf), lps.get("2", -math.inf))
            if q is not None:
                return q
        verdict = parse_verdict(raw.get("answer", ""), PAIRWISE_LABELS)
        return None if verdict is None else (1.0 if verdict == "1" else 0.0)

    def judge(self, prompts: list[str], responses_a: list[str],
              responses_b: list[str]) -> list[Judgement]:
        n = len(prompts)
        require(len(responses_a) == n and len(responses_b) == n, "prompts and responses differ in length")
        orders = [(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
        if self.cfg.swap:
            orders += [(p, b, a) for p, a, b in zip(prompts, responses_a, responses_b)]
        outcomes = self._run(orders)
        out = []
        for i in range(n):
            mine = [outcomes[i]] + ([outcomes[n + i]] if self.cfg.swap else [])
            qs = [self.slot_probability(o.raw) for o in mine]
            self.counts["unparseable"] += sum(q is None and o.raw is not None for q, o in zip(qs, mine))
            p = swap_average(qs[0], qs[1] if self.cfg.swap else None)
            label = None if p is None else ("a" if p > 0.5 else "b" if p < 0.5 else "tie")
            out.append(Judgement(p, label, qs, mine))
        return out

    def label(self, prompts: list[str], responses_a: list[str],
              responses_b: list[str]) -> list[Judgement]:
        """Judge the pairs and record each verdict in the store (source ``ai``); a pair this judge
        and template already labelled is not recorded twice."""
        require(self.store is not None, "PairwiseJudge.label needs a preference store")
        judgements = self.judge(prompts, responses_a, responses_b)
        store = self.store
        done = {c["pair_id"] for c in store.comparisons(source="ai", annotator=self.id)
                if c["template_version"] == self.template_version}
        with store.transaction():
            for p, a, b, j in zip(prompts, responses_a, responses_b, judgements):
                if j.label is None or a == b:   # no verdict, or no pair to record it on
                    continue
                pair_id = store.add_pair_from_texts(p, a, b)
                if pair_id in done:
                    continue
                done.add(pair_id)
                flipped = store.pair(pair_id).response_a != a
                label = {"a": "b", "b": "a"}.get(j.label, j.label) if flipped else j.label
                store.add_comparison(
                    pair_id, label, source="ai", annotator=self.id,
                    prob_a=1.0 - j.prob_a if flipped else j.prob_a,
                    template_version=self.template_version, rationale=j.rationale, cost=j.cost,
                    latency_s=sum(o.latency_s for o in j.outcomes),
                    comment=json.dumps({"prompt_tokens": sum(o.prompt_tokens for o in j.outcomes),
                                        "completion_tokens": sum(o.completion_tokens for o in j.outcomes),
                                        "slot_probs": j.slot_probs}))
        return judgements


class PointwiseJudge(_Judge):
    """A 1-10 score per response; called as a reward source it returns the d-RLAIF reward."""

    def __init__(self, cfg: JudgeConfig, backend=None, store: PreferenceStore | None = None):
        super().__init__(cfg, cfg.pointwise, backend, store)
        self.name = f"judge:{self.id}"

    def expected(self, raw: dict | None) -> float | None:
        if raw is None:
            return None
        if raw.get("label_logps"):
            s = expected_score(raw["label_logps"])
            if s is not None:
                return s
        verdict = parse_verdict(raw.get("answer", ""), POINTWISE_LABELS)
        return None if verdict is None else float(verdict)

    def scores(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        require(len(prompts) == len(responses), "prompts and responses differ in length")
        outcomes = self._run([(p, r, "") for p, r in zip(prompts, responses)])
        scores = [self.expected(o.raw) for o in outcomes]
        self.counts["unparseable"] += sum(s is None and o.raw is not None
                                          for s, o in zip(scores, outcomes))
        return scores

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """d-RLAIF rewards in [-1, 1]; an unanswerable response gets 0 (the scale's middle),
        counted in ``counts['unparseable']`` / ``counts['failed']``."""
        return [0.0 if s is None else drlaif_reward(s) for s in self.scores(prompts, responses)]


def preference_record(prompt: str, response_a: str, response_b: str,
                      j: Judgement) -> dict | None:
    """A ``{prompt, chosen, rejected, label, label_prob}`` training record of a decided pair
    (``label_prob``: the soft label of the chosen response); None for a tie or no verdict."""
    if j.label not in ("a", "b"):
        return None
    a_wins = j.label == "a"
    return {"prompt": prompt, "chosen": response_a if a_wins else response_b,
            "rejected": response_b if a_wins else response_a, "label": j.label,
            "label_prob": j.prob_a if a_wins else 1.0 - j.prob_a}


def agreement(store: PreferenceStore, annotator: str, template_version: str,
              source: str) -> dict:
    """This judge's labels against ``source`` labels (majority per pair) on the pairs both
    labelled: ``n``, ``agreement`` (share of equal labels, a tie counts as its own label) and
    Cohen's ``kappa``."""
    from collections import defaultdict

    from alignkit.data.store import cohen_kappa, majority

    mine: dict[int, str] = {}
    theirs: dict[int, list[str]] = defaultdict(list)
    for c in store.comparisons():
        if c["source"] == "ai" and c["annotator"] == annotator \
                and c["template_version"] == template_version:
            mine[c["pair_id"]] = c["label"]
        elif c["source"] == source:
            theirs[c["pair_id"]].append(c["label"])
    both = [(mine[p], majority(theirs[p])[0]) for p in mine if p in theirs]
    return {"n": len(both),
            "agreement": sum(x == y for x, y in both) / len(both) if both else None,
            "kappa": cohen_kappa(both)}


def load_judge_config(spec: str) -> JudgeConfig:
    """``PATH`` of a YAML file holding a judge config, at the top level or under ``judge:``."""
    from alignkit.config import build, load_yaml

    data = load_yaml(spec, what="judge config")
    return build(JudgeConfig, data.get("judge", data))


def load_stage_config(cls: type, path: str, section: str, overrides: list[str]):
    """A judge stage's config from a YAML file that may hold several stages around one judge:
    ``judge:`` (shared) plus one section per stage (``label_ai:``, ``judge_model:``), whose own
    ``judge`` keys override the shared ones. A file without ``section`` is the stage's config."""
    from alignkit.config import apply_overrides, build, load_yaml

    raw = load_yaml(path)
    data = raw
    if section in raw:
        data = dict(raw[section] or {})
        data["judge"] = _merged(raw.get("judge") or {}, data.get("judge") or {})
    return build(cls, apply_overrides(data, overrides))


def _merged(base: dict, given: dict) -> dict:
    out = dict(base)
    for k, v in given.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def make_judge_labeler(spec: str, workers=None):
    """``fn(prompts, a, b) -> preference records`` with the pairwise judge of the judge config at
    ``spec`` (both orders, soft labels; recorded in the config's ``store`` when one is set): the
    AI labeler of iterative RLAIF (``online.labeler`` of ``alignkit dpo``); ``workers``: where
    the judge runs."""
    from alignkit.data.store import PreferenceStore

    cfg = load_judge_config(spec)
    judge = PairwiseJudge(cfg, backend=make_backend(cfg, workers),
                          store=PreferenceStore(cfg.store) if cfg.store else None)

    def label(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[dict]:
        run = judge.label if judge.store is not None else judge.judge
        records = [preference_record(p, a, b, j) for p, a, b, j in
                   zip(prompts, responses_a, responses_b, run(prompts, responses_a, responses_b))]
        return [r for r in records if r is not None]

    label.judge = judge
    return label


def make_judge_reward(spec: str, workers=None, **kwargs) -> PointwiseJudge:
    """The reward source ``judge:CONFIG``: the pointwise judge of a judge config (d-RLAIF), run
    where ``workers`` say. Reward-source keywords of other kinds (``chat``, ``batch_size``) are
    accepted and unused: the judge renders its own prompt. The config's ``store`` caches every
    request."""
    from alignkit.data.store import PreferenceStore

    cfg = load_judge_config(spec)
    store = PreferenceStore(cfg.store) if cfg.store else None
    return PointwiseJudge(cfg, backend=make_backend(cfg, workers), store=store)
