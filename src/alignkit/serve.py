"""``alignkit serve``: an OpenAI-compatible HTTP server for any causal LM alignkit can load.

  alignkit serve --model PATH [--port 8000] [--host 127.0.0.1] [--name NAME]
                 [--api-key-env VAR] [--max-top-logprobs 20] [--max-sequences 256]
                 [--max-tokens 4096] [--max-body-bytes 4194304] [--max-queue 16]
                 [--batch-size 64] [--chunk-tokens 32]

Endpoints: ``GET /v1/models`` and ``/v1/models/NAME``; ``POST /v1/completions`` (``prompt`` as
text, token ids or lists of either; ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``seed``, ``logprobs``, ``echo``, ``stream``) and ``POST /v1/chat/completions`` (``messages``
rendered with the model's chat template; ``logprobs``, ``top_logprobs``, ``max_tokens`` /
``max_completion_tokens``, ``stream``, ``stream_options.include_usage``). ``stream: true`` answers
with server-sent events (``data: {...}`` chunks, then ``data: [DONE]``). ``echo`` with
``logprobs`` and ``max_tokens: 0`` scores a prompt (lm-eval's ``local-completions``
log-likelihood): the prompt's tokens come back with their log-probs, the first one ``null``.

Prompts are tokenised by :func:`alignkit.data.formats.encode_prompt`, exactly as training and the
local judge backend encode them, and sampled through :func:`alignkit.engine.sampling.sample`.
Reported log-probs are those of the model's own next-token distribution (temperature 1), from a
forward pass over prompt + completion: what a judge reads its soft labels from.

What one request may cost is bounded (:class:`Limits`, each a flag): prompts x ``n`` per request,
``max_tokens``, the body's size (413 before it is read) and the requests admitted at once (503
with ``Retry-After`` beyond). The model runs one chunk of work at a time (``--batch-size``
sequences, ``--chunk-tokens`` new tokens each), and requests take turns in arrival order between
chunks: a short request waits for one chunk of a long one, not all of it. Before each chunk the
server checks that the client is still connected, and drops the work of one that went away.
Every error, the HTTP layer's included, is an OpenAI-style JSON body, never HTML.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

LOGPROB_FLOOR = -9999.0   # JSON has no -inf; OpenAI reports impossible tokens like this
# Scoring runs over the logits of every scored position ([rows, positions, vocabulary]); echo
# scores whole prompts, so the rows of one forward are bounded by their positions as well.
SCORE_POSITIONS = 8192
INT64 = (-(1 << 63), (1 << 63) - 1)   # OpenAI's seed is an int64; torch takes this range too
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server; each field is the flag ``--max-sequences`` etc."""

    max_sequences: int = 256      # prompts x n of one request
    max_tokens: int = 4096        # the most new tokens per sequence a request may ask for
    max_body_bytes: int = 4 << 20  # lm-eval batches of 2k-token prompts as ids fit
    max_queue: int = 16           # requests admitted at once, running or waiting for the model
    batch_size: int = 64          # sequences per forward pass
    chunk_tokens: int = 32        # new tokens per sequence per turn at the model

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(f.name)} must be an integer >= 1, got {value!r}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


class Cancelled(Exception):
    """The client closed its connection: the rest of its request's work is dropped."""


class _Turns:
    """A lock that serves waiters in arrival order. Requests take it per chunk of work and queue
    again behind whoever arrived meanwhile; a plain ``threading.Lock`` promises no order, and the
    thread that has just released it usually wins it straight back, starving the others."""

    def __init__(self):
        self._cond = threading.Condition()
        self._issued = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._issued
            self._issued += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


@dataclass
class _Seq:
    """One choice as it is generated, and how much of it a stream has sent."""

    prompt: list[int]
    budget: int                        # the most new tokens
    ids: list[int] = field(default_factory=list)     # sampled tokens, an ending EOS included
    pieces: list[str] = field(default_factory=list)  # each token decoded on its own
    eos: bool = False
    stopped: bool = False              # a stop string ended it
    text: str = ""                     # the completion's text, cut before a stop string
    keep: int = 0                      # tokens reported: all, or those that start before the stop
    logps: list[float] = field(default_factory=list)       # of ids[:len(logps)], when asked for
    top: list[list[tuple[str, float]]] = field(default_factory=list)
    prompt_logps: list[float | None] | None = None         # echo: of the prompt, first None
    prompt_top: list[list[tuple[str, float]] | None] | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False

    @property
    def done(self) -> bool:
        return self.eos or self.stopped or len(self.ids) >= self.budget

    @property
    def finish_reason(self) -> str:
        return "stop" if self.eos or self.stopped else "length"


class Engine:
    """A loaded model served in turns: prompt ids in, completions with log-probs out."""

    def __init__(self, model, tokenizer, name: str, max_top_logprobs: int = 20,
                 limits: Limits = Limits()):
        from alignkit.engine.forward import forward_parameters

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_top_logprobs, self.limits = max_top_logprobs, limits
        self.context = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.vocab = model.get_input_embeddings().num_embeddings
        self.special = set(tokenizer.all_special_ids)
        self.keeps_logits = "logits_to_keep" in forward_parameters(model)
        self.turns = _Turns()
        self._count = threading.Lock()
        self._pieces: dict[int, str] = {}
        # in_flight: requests admitted now; chunks: turns at the model; cancelled: requests
        # dropped because their client went away. Tests and operators read them.
        self.in_flight = self.chunks = self.cancelled = 0

    # -- admission and turns --------------------------------------------------------------

    def admit(self) -> Callable[[], None]:
        """Admit a request, or refuse it with 503 when ``max_queue`` are in already; returns
        the function that lets it out (safe to call more than once)."""
        with self._count:
            if self.in_flight >= self.limits.max_queue:
                raise ApiError(503, f"the server is busy: {self.in_flight} requests are running or "
                                    f"waiting (--max-queue {self.limits.max_queue}); retry later",
                               headers={"Retry-After": "1"})
            self.in_flight += 1
        released = False

        def release():
            nonlocal released
            with self._count:
                if not released:
                    released, self.in_flight = True, self.in_flight - 1
        return release

    @contextlib.contextmanager
    def turn(self, alive: Callable[[], bool]):
        """Hold the model for one chunk of work, if the client is still there before and after
        the wait for it."""
        import torch

        if not alive():
            self._cancel()
        with self.turns:
            if not alive():
                self._cancel()
            with torch.no_grad():
                yield
            self.chunks += 1

    def _cancel(self):
        self.note_cancelled()
        raise Cancelled

    def note_cancelled(self) -> None:
        with self._count:
            self.cancelled += 1

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, prompt: Any) -> list[int]:
        """Token ids of a text prompt or a chat (a list of messages); ids pass through."""
        from alignkit.data.formats import encode_prompt

        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt
        if isinstance(prompt, list) and not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            ids = encode_prompt(prompt, self.tokenizer)
        except Exception as exc:  # a template that rejects a role, text the tokenizer refuses
            raise ApiError(400, f"cannot encode the prompt: {exc}") from None
        if not ids:  # a tokenizer without BOS and an empty text: nothing to continue from
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    # -- sampling and scoring ----------------------------------------------------------------

    def generate(self, seqs: list[_Seq], p: dict, alive: Callable[[], bool]) -> Iterator[None]:
        """Sample every unfinished sequence up to ``chunk_tokens`` tokens further per round,
        ``batch_size`` sequences per turn at the model, and yield after each round.

        A round continues a sequence from its prompt and the tokens sampled so far (its
        prefill recomputes their keys and values): the price of being able to stop between
        chunks, for another request's turn or for a client that went away. Position ids are
        those of one uninterrupted decode; one generator seeded by ``seed`` draws every round,
        so a seed repeats its completions.
        """
        import torch

        from alignkit.engine.sampling import SamplingConfig, sample

        generator = torch.Generator().manual_seed(p["seed"])
        tok = self.tokenizer
        while todo := [s for s in seqs if not s.done]:
            steps = min(self.limits.chunk_tokens, min(s.budget - len(s.ids) for s in todo))
            cfg = SamplingConfig(max_new_tokens=steps, temperature=p["temperature"],
                                 top_p=p["top_p"])
            for i in range(0, len(todo), self.limits.batch_size):
                chunk = todo[i:i + self.limits.batch_size]
                with self.turn(alive):
                    rollout = sample(self.model, [s.prompt + s.ids for s in chunk], cfg,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     generator=generator)
                lengths = rollout.response_lengths().tolist()
                for s, ids, n, eos in zip(chunk, rollout.response_ids.tolist(), lengths,
                                          rollout.finished.tolist()):
                    self._extend(s, ids[:n], eos, p["stop"])
            yield

    def _extend(self, s: _Seq, ids: list[int], eos: bool, stop: list[str]) -> None:
        """The EOS that ended a completion is not part of its text but keeps its token and
        log-prob entry: it carries the distribution at that position (a judge that answered
        with EOS first still shows how likely "1" and "2" were)."""
        s.ids += ids
        s.pieces += [self.piece(t) for t in ids]
        s.eos = eos
        text = self.tokenizer.decode(s.ids[:-1] if eos else s.ids, skip_special_tokens=True)
        cut = min((text.find(x) for x in stop if x and x in text), default=-1)
        if cut >= 0:
            text, s.stopped = text[:cut], True
        s.text = text
        s.keep = self.tokens_before(s.ids, s.pieces, cut) if cut >= 0 else len(s.ids)

    def tokens_before(self, ids: list[int], pieces: list[str], end: int) -> int:
        """How many tokens start before character ``end`` of the text."""
        keep = offset = 0
        while keep < len(pieces) and offset < end:
            offset += self.width(ids[keep], pieces[keep])
            keep += 1
        return keep

    def width(self, token: int, piece: str) -> int:
        """Characters a token takes in the text: special tokens (BOS, EOS) are not in it."""
        return 0 if token in self.special else len(piece)

    def score(self, rows: list[list[int]], starts: list[int], k: int,
              alive: Callable[[], bool]) -> list[tuple[list[float], list | None]]:
        """Per row, the log-probs of ``row[start:]`` (``start >= 1``) under the model's
        next-token distribution at temperature 1, and the top-``k`` alternatives ``(piece,
        logprob)`` at each of those positions (``None`` when ``k == 0``); floored at
        :data:`LOGPROB_FLOOR`. Rows are left-padded with generation's position ids."""
        import torch

        out: list[tuple[list[float], list | None]] = [([], [] if k else None) for _ in rows]
        todo = [i for i, (r, s) in enumerate(zip(rows, starts)) if s < len(r)]
        widest = max((len(rows[i]) - starts[i] for i in todo), default=0) + 1
        per = max(1, min(self.limits.batch_size, SCORE_POSITIONS // widest))
        for c in range(0, len(todo), per):
            chunk = todo[c:c + per]
            with self.turn(alive):
                ids, mask = self._left_padded([rows[i] for i in chunk])
                keep = max(len(rows[i]) - starts[i] for i in chunk) + 1
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    use_cache=False,
                                    **({"logits_to_keep": keep} if self.keeps_logits else {})
                                    ).logits[:, -keep:]
                for row, i in enumerate(chunk):
                    # logits[:, q] is at padded position width - keep + q, and predicts the
                    # token after it: row token j is predicted at q = keep - len + j - 1.
                    n, start = len(rows[i]), starts[i]
                    logps = torch.log_softmax(logits[row, keep - n + start - 1:-1].float(), -1)
                    targets = torch.tensor(rows[i][start:], device=logps.device)
                    chosen = logps.gather(-1, targets[:, None]).squeeze(-1).clamp_min(LOGPROB_FLOOR)
                    top = None
                    if k:
                        values, indices = logps.topk(min(k, logps.size(-1)), dim=-1)
                        top = [[(self.piece(t), max(v, LOGPROB_FLOOR)) for t, v in zip(ti, tv)]
                               for ti, tv in zip(indices.tolist(), values.tolist())]
                    out[i] = (chosen.tolist(), top)
        return out

    def _left_padded(self, rows: list[list[int]]):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# Request parsing (OpenAI semantics; unknown fields are ignored, unsupported ones refused).


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        value = default
    # isfinite() of a huge int overflows converting to float: ints are finite, test floats only
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"{key} must be a{'n integer' if kind is int else ' number'}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{key} must be {bounds}, got {value}", key)
    return kind(value)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return bool(value)


def _common(engine: Engine, body: dict, max_tokens_default: int, min_tokens: int) -> dict:
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise ApiError(400, f"{key} is not supported", key)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not INT64[0] <= seed <= INT64[1]):
        raise ApiError(400, "seed must be an integer in [-2^63, 2^63 - 1]", "seed")
    cap = engine.limits.max_tokens
    max_tokens = _number(body, "max_tokens", min(max_tokens_default, cap), int, min_tokens)
    if max_tokens > cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {cap} "
                            f"(--max-tokens)", "max_tokens")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise ApiError(400, "stream_options must be an object, with stream=true", "stream_options")
    return {"max_tokens": max_tokens,
            "temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, float, 1e-9, 1.0),
            "n": _number(body, "n", 1, int, 1), "stop": stop,
            "seed": seed if seed is not None else secrets.randbits(63), "stream": stream,
            "include_usage": _flag(options or {}, "include_usage")}


def _check_sequences(engine: Engine, prompts: int, n: int) -> None:
    limit = engine.limits.max_sequences
    if prompts * n > limit:
        raise ApiError(400, f"this request asks for {prompts * n} sequences ({prompts} prompts x "
                            f"n={n}); this server's limit is {limit} per request "
                            f"(--max-sequences)", "n" if n > 1 else "prompt")


def _check_model(engine: Engine, body: dict) -> None:
    name = body.get("model")
    if name is not None and name != engine.name:
        raise ApiError(404, f"model {name!r} is not served here (serving {engine.name!r})", "model")


def _token_ids(engine: Engine, value) -> bool:
    """Whether ``value`` is a prompt of token ids; refuses ids outside the vocabulary."""
    if not isinstance(value, list) or not value or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return False
    if not all(0 <= t < engine.vocab for t in value):
        raise ApiError(400, f"token ids must be in [0, {engine.vocab})", "prompt")
    return True


def _prompts(engine: Engine, value) -> list:
    """A completions ``prompt``: a text, token ids, or a non-empty list of either."""
    if isinstance(value, str) or _token_ids(engine, value):
        return [value]
    if isinstance(value, list) and value and \
            all(isinstance(x, str) or _token_ids(engine, x) for x in value):
        return value
    raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of "
                        "strings or of token-id lists", "prompt")


@dataclass
class Request:
    """A validated request: its sequences (``n`` per prompt) and how to answer."""

    chat: bool
    seqs: list[_Seq]
    p: dict
    logprobs: bool
    top: int
    prompt_tokens: int
    echo: list[str] | None = None      # per sequence, the prompt text echoed before it
    id: str = ""
    created: int = 0


def _sequences(engine: Engine, prompts: list[list[int]], p: dict) -> list[_Seq]:
    longest = max(len(ids) for ids in prompts)
    # A prompt may fill the context when nothing is generated (echo scoring).
    if longest > engine.context or (p["max_tokens"] and longest >= engine.context):
        raise ApiError(400, f"prompt of {longest} tokens exceeds the context of "
                            f"{engine.context}", "prompt")
    budget = min(p["max_tokens"], engine.context - longest)
    return [_Seq(prompt=list(ids), budget=budget) for ids in prompts for _ in range(p["n"])]


def completion_request(engine: Engine, body: dict) -> Request:
    _check_model(engine, body)
    p = _common(engine, body, 16, 0)   # max_tokens 0: echo scoring, as OpenAI's legacy API
    echo = _flag(body, "echo")
    logprobs = body.get("logprobs") is not None
    top = _number(body, "logprobs", 0, int, 0, engine.max_top_logprobs) if logprobs else 0
    prompts = _prompts(engine, body.get("prompt"))
    _check_sequences(engine, len(prompts), p["n"])
    encoded = [engine.encode(x) for x in prompts]
    # Echo returns a text prompt as it was sent, token ids as they decode.
    texts = [x if isinstance(x, str) else engine.tokenizer.decode(x, skip_special_tokens=True)
             for x in prompts] if echo else None
    return Request(chat=False, seqs=_sequences(engine, encoded, p), p=p, logprobs=logprobs,
                   top=top, prompt_tokens=sum(len(x) for x in encoded),
                   echo=[t for t in texts for _ in range(p["n"])] if texts else None,
                   id=f"cmpl-{secrets.token_hex(12)}", created=int(time.time()))


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text"
                       and isinstance(c.get("text", ""), str) for c in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            content = "".join(c.get("text", "") for c in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, "each message needs a role and text content", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def chat_request(engine: Engine, body: dict) -> Request:
    _check_model(engine, body)
    if body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    p = _common(engine, body, 256, 1)
    logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", 0, int, 0, engine.max_top_logprobs)
    if top and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    _check_sequences(engine, 1, p["n"])
    ids = engine.encode(_messages(body))
    return Request(chat=True, seqs=_sequences(engine, [ids], p), p=p, logprobs=logprobs, top=top,
                   prompt_tokens=len(ids), id=f"chatcmpl-{secrets.token_hex(12)}",
                   created=int(time.time()))


# ----------------------------------------------------------------------------------------------
# Running a request: all at once, or as a stream of chunks.


def _score_new(engine: Engine, req: Request, alive: Callable[[], bool]) -> None:
    """Log-probs of the tokens not scored yet (and of the prompt, for echo), in one forward
    pass per batch of sequences."""
    rows, starts = [], []
    for s in req.seqs:
        rows.append(s.prompt + s.ids)
        starts.append(1 if req.echo is not None and s.prompt_logps is None
                      else len(s.prompt) + len(s.logps))
    for s, start, (logps, top) in zip(req.seqs, starts, engine.score(rows, starts, req.top, alive)):
        if start < len(s.prompt):   # the prompt's part first: its first token has no log-prob
            m = len(s.prompt) - start
            s.prompt_logps = [None] + logps[:m]
            s.prompt_top = [None] + top[:m] if top is not None else None
            logps, top = logps[m:], top[m:] if top is not None else None
        elif req.echo is not None and s.prompt_logps is None:   # a one-token prompt
            s.prompt_logps, s.prompt_top = [None], [None] if req.top else None
        s.logps += logps
        if top is not None:
            s.top += top


def _text_logprobs(engine: Engine, s: _Seq, tokens: range, offset: int, prompt: bool,
                   top: bool) -> dict:
    """The legacy completions ``logprobs`` object of ``tokens`` of a sequence (of its prompt
    with ``prompt``; with the alternatives when ``top``); ``offset``: the character of the text
    where the first of them starts."""
    ids, pieces, logps, alts = (s.prompt, [engine.piece(t) for t in s.prompt], s.prompt_logps,
                                s.prompt_top) if prompt else (s.ids, s.pieces, s.logps, s.top)
    offsets = []
    for j in tokens:
        offsets.append(offset)
        offset += engine.width(ids[j], pieces[j])
    return {"tokens": [pieces[j] for j in tokens], "token_logprobs": [logps[j] for j in tokens],
            # a dict per token; two ids that decode alike keep the likelier one
            "top_logprobs": [None if alts[j] is None else dict(reversed(alts[j])) for j in tokens]
            if top else None,
            "text_offset": offsets}


def _merge(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: (a[k] + b[k]) if a[k] is not None else None for k in a}


def _chat_logprobs(s: _Seq, tokens: range) -> dict:
    return {"content": [
        {"token": s.pieces[j], "logprob": s.logps[j], "bytes": list(s.pieces[j].encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                          for t, v in (s.top[j] if s.top else [])]}
        for j in tokens]}


def _usage(req: Request) -> dict:
    completion = sum(len(s.ids) for s in req.seqs)
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion,
            "total_tokens": req.prompt_tokens + completion}


def respond(engine: Engine, req: Request, alive: Callable[[], bool]) -> dict:
    """The whole answer of a request, as one JSON object."""
    for _ in engine.generate(req.seqs, req.p, alive):
        pass
    if req.logprobs:
        _score_new(engine, req, alive)
    choices = []
    for i, s in enumerate(req.seqs):
        if req.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": s.text},
                            "logprobs": _chat_logprobs(s, range(s.keep)) if req.logprobs else None,
                            "finish_reason": s.finish_reason})
            continue
        echo = req.echo[i] if req.echo is not None else ""
        logprobs = None
        if req.logprobs:
            if req.echo is not None:
                logprobs = _text_logprobs(engine, s, range(len(s.prompt)), 0, True, req.top > 0)
            logprobs = _merge(logprobs, _text_logprobs(engine, s, range(s.keep), len(echo), False,
                                                       req.top > 0))
        choices.append({"index": i, "text": echo + s.text, "logprobs": logprobs,
                        "finish_reason": s.finish_reason})
    return {"id": req.id, "object": "chat.completion" if req.chat else "text_completion",
            "created": req.created, "model": engine.name, "choices": choices,
            "usage": _usage(req)}


def _held_back(text: str, stop: list[str]) -> int:
    """Characters at the end of ``text`` a stream must not send yet: the start of a stop string
    (which must not be sent if it completes) or of a character still being decoded."""
    hold = max((k for x in stop for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


def stream(engine: Engine, req: Request, alive: Callable[[], bool]) -> Iterator[str]:
    """The answer as server-sent events: one chunk per sequence per round that has something
    new, then ``data: [DONE]``."""
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    usage_field = {"usage": None} if req.p["include_usage"] else {}

    def event(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({"id": req.id, "object": kind, "created": req.created,
                                      "model": engine.name, "choices": choices,
                                      **usage_field, **extra}) + "\n\n"

    if req.chat:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(req.seqs))])
    elif req.echo is not None:   # the prompt first, as its own chunk
        if req.logprobs:
            _score_new(engine, req, alive)
        yield event([{"index": i, "text": req.echo[i], "finish_reason": None,
                      "logprobs": _text_logprobs(engine, s, range(len(s.prompt)), 0, True,
                                                 req.top > 0) if req.logprobs else None}
                     for i, s in enumerate(req.seqs)])
    rounds, end = engine.generate(req.seqs, req.p, alive), object()
    while True:
        more = next(rounds, end) is not end
        if req.logprobs:
            _score_new(engine, req, alive)
        choices = [c for i, s in enumerate(req.seqs) if (c := _delta(engine, req, i, s))]
        if choices:
            yield event(choices)
        if not more:
            break
    if req.p["include_usage"]:
        yield "data: " + json.dumps({"id": req.id, "object": kind, "created": req.created,
                                     "model": engine.name, "choices": [],
                                     "usage": _usage(req)}) + "\n\n"
    yield "data: [DONE]\n\n"


def _delta(engine: Engine, req: Request, i: int, s: _Seq) -> dict | None:
    """What sequence ``i`` has to send since its last chunk, or ``None``."""
    if s.sent_finish:
        return None
    done = s.done
    end = len(s.text) if done else len(s.text) - _held_back(s.text, req.p["stop"])
    text = s.text[s.sent_text:end] if end > s.sent_text else ""
    upto = s.keep if done else engine.tokens_before(s.ids, s.pieces, end)
    tokens = range(s.sent_tokens, max(upto, s.sent_tokens))
    if not text and not tokens and not done:
        return None
    logprobs = None
    if req.logprobs and req.chat:
        logprobs = _chat_logprobs(s, tokens)
    elif req.logprobs:
        echo = len(req.echo[i]) if req.echo is not None else 0
        start = sum(engine.width(s.ids[j], s.pieces[j]) for j in range(s.sent_tokens))
        logprobs = _text_logprobs(engine, s, tokens, echo + start, False, req.top > 0)
    s.sent_text, s.sent_tokens, s.sent_finish = max(end, s.sent_text), tokens.stop, done
    finish = s.finish_reason if done else None
    if req.chat:
        return {"index": i, "delta": {"content": text} if text or tokens else {},
                "logprobs": logprobs, "finish_reason": finish}
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}


# ----------------------------------------------------------------------------------------------
# HTTP.


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def client_alive(environ: dict) -> Callable[[], bool]:
    """Whether the client of a request is still connected: its socket (werkzeug's server puts
    it in the WSGI environ) peeked without blocking. Readable with nothing to read means the
    client closed it. Without a socket (another server, a test client) it cannot be told."""
    sock = environ.get("werkzeug.socket")
    if sock is None:
        return lambda: True

    def alive() -> bool:
        try:
            if not select.select([sock], [], [], 0)[0]:
                return True
            return bool(sock.recv(1, socket.MSG_PEEK))
        except ConnectionError:
            return False
        except (OSError, ValueError):   # a TLS socket, a descriptor select() cannot watch
            return True
    return alive


def create_app(engine: Engine, api_key: str | None = None):
    """The Flask app; ``api_key`` set: every request needs ``Authorization: Bearer <key>``."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import RequestEntityTooLarge

    app = Flask("alignkit.serve")
    # Flask refuses a larger body with 413 from its declared length, before reading it.
    app.config["MAX_CONTENT_LENGTH"] = engine.limits.max_body_bytes
    # Compared as bytes: compare_digest refuses str with non-ASCII characters. A client sends
    # the key as UTF-8 (surrogatepass: a key given in code may hold any str).
    expected = f"Bearer {api_key}".encode("utf-8", "surrogatepass") if api_key else None

    error = _json_errors(app, engine)

    @app.before_request
    def authenticate():
        if expected is None:
            return None
        given = _header_bytes(request.headers.get("Authorization", ""))
        if given is None or not secrets.compare_digest(given, expected):
            return error(401, "invalid or missing API key")
        return None

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [_model_card(engine)]})

    @app.get("/v1/models/<path:name>")
    def model(name: str):
        if name != engine.name:
            raise ApiError(404, f"model {name!r} is not served here (serving {engine.name!r})",
                           "model")
        return jsonify(_model_card(engine))

    def endpoint(parse: Callable[[Engine, dict], Request]):
        data = request.get_data(cache=False)
        if request.content_length is None and len(data) >= engine.limits.max_body_bytes:
            # A chunked body declares no length; werkzeug stops reading it at the limit and
            # hands over what it read, which must not pass for the whole body.
            raise RequestEntityTooLarge()
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):   # not JSON, not UTF-8, nested too deep
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        req = parse(engine, body)
        release = engine.admit()
        alive = client_alive(request.environ)
        if req.p["stream"]:
            response = Response(_events(engine, req, alive, release), mimetype="text/event-stream",
                                headers={"Cache-Control": "no-cache"})
            response.call_on_close(release)   # a stream never started still lets its slot go
            return response
        try:
            return jsonify(respond(engine, req, alive))
        except Cancelled:
            return error(499, "the client closed the connection")
        finally:
            release()

    app.add_url_rule("/v1/completions", "completions",
                     lambda: endpoint(completion_request), methods=["POST"])
    app.add_url_rule("/v1/chat/completions", "chat_completions",
                     lambda: endpoint(chat_request), methods=["POST"])
    return app


def _json_errors(app, engine: Engine):
    """Every error of ``app`` as an OpenAI-style JSON body, never HTML; returns ``error(status,
    message, param=None, headers=None)`` for the routes' own refusals."""
    from flask import jsonify, request
    from werkzeug.exceptions import HTTPException

    def error(status: int, message: str, param: str | None = None, headers=None):
        return jsonify(error_body(status, message, param)), status, headers or {}

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return error(413, f"the request body is larger than this server's limit of "
                              f"{engine.limits.max_body_bytes} bytes (--max-body-bytes)")
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}.get(exc.code)
        allow = getattr(exc, "valid_methods", None)
        return error(exc.code or 500, message or exc.description or exc.name,
                     headers={"Allow": ", ".join(allow)} if allow else None)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("alignkit serve: %s %s failed", request.method, request.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    return error


def _header_bytes(value: str) -> bytes | None:
    """A header's bytes: WSGI hands header values over as latin-1 text (PEP 3333); ``None`` for
    text no HTTP request can carry (a WSGI caller other than a server)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return None


def _events(engine: Engine, req: Request, alive, release) -> Iterator[bytes]:
    """A stream's bytes; its status (200) is sent before the work, so a failure midway is an
    ``error`` event (what OpenAI's clients raise from), never a broken response."""
    try:
        for text in stream(engine, req, alive):
            yield text.encode()
    except Cancelled:
        return
    except GeneratorExit:   # the server failed to write a chunk: the client went away
        engine.note_cancelled()
        raise
    except Exception as exc:
        log.exception("alignkit serve: a stream failed")
        yield ("data: " + json.dumps(error_body(500, f"internal error ({type(exc).__name__})"))
               + "\n\n").encode()
    finally:
        release()


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "alignkit"}


def request_handler():
    """werkzeug's request handler, with the errors it answers itself before the app sees a
    request (a malformed request line, too many headers) as JSON rather than HTML."""
    from werkzeug.serving import WSGIRequestHandler

    class JsonErrors(WSGIRequestHandler):
        def send_error(self, code, message=None, explain=None):
            self.log_error("code %d, message %s", code, message)
            body = json.dumps(error_body(code, message or self.responses.get(code, ("error",))[0]))
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body.encode())

    return JsonErrors


def load_engine(path: str, name: str | None = None, max_top_logprobs: int = 20,
                limits: Limits = Limits()) -> Engine:
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tokenizer)
    return Engine(model, tokenizer, name or path, max_top_logprobs, limits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="folder of a causal LM (any alignkit output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--name", help="model name clients send (default: the --model path)")
    parser.add_argument("--api-key-env", help="require the key in this environment variable")
    parser.add_argument("--max-top-logprobs", type=int, default=20,
                        help="most alternatives per token a request may ask for")
    helps = {"max_sequences": "most sequences (prompts x n) per request",
             "max_tokens": "most new tokens per sequence a request may ask for",
             "max_body_bytes": "largest request body (413 beyond)",
             "max_queue": "most requests running or waiting at once (503 + Retry-After beyond)",
             "batch_size": "sequences per forward pass",
             "chunk_tokens": "new tokens per sequence per turn at the model: requests take turns, "
                             "and a request whose client went away stops, between chunks"}
    for f in dataclasses.fields(Limits):
        parser.add_argument(flag(f.name), type=int, default=f.default,
                            help=f"{helps[f.name]} (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            sys.exit(f"alignkit serve: environment variable {args.api_key_env} is empty")
    try:
        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    except ValueError as exc:
        sys.exit(f"alignkit serve: {exc}")
    engine = load_engine(args.model, args.name, args.max_top_logprobs, limits)
    server = make_server(args.host, args.port, create_app(engine, api_key), threaded=True,
                         request_handler=request_handler())
    print(f"alignkit serve: {engine.name} on http://{args.host}:{server.server_port}/v1 "
          f"(Ctrl+C to stop)", flush=True)
    serve_until_interrupted(server)


def serve_until_interrupted(server) -> None:
    """Serve a werkzeug ``server`` until Ctrl+C, then close its socket (``alignkit serve`` and
    ``alignkit annotate``)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
