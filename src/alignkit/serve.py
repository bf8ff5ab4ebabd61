"""``alignkit serve``: an OpenAI-compatible HTTP server for any causal LM alignkit can load.

  alignkit serve --model PATH [--port 8000] [--host 127.0.0.1] [--name NAME]
                 [--api-key-env VAR] [--max-top-logprobs 20]

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``) and
``POST /v1/chat/completions`` (``messages`` rendered with the model's chat template; ``logprobs``,
``top_logprobs``, ``max_tokens`` / ``max_completion_tokens``). No streaming.

Prompts are tokenised by :func:`alignkit.data.formats.encode_prompt`, exactly as training and the
local judge backend encode them, and sampled through :func:`alignkit.engine.sampling.sample`. Reported
log-probs are those of the model's own next-token distribution (temperature 1), from one forward
pass over prompt + completion: what a judge reads its soft labels from. One request runs the
model at a time (a lock); Flask's threads only overlap the network I/O.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import threading
import time
from typing import Any

STREAM_UNSUPPORTED = "stream=true is not supported; send stream=false"
LOGPROB_FLOOR = -9999.0   # JSON has no -inf; OpenAI reports impossible tokens like this


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class Engine:
    """A loaded model behind a lock: prompt ids in, completions with log-probs out."""

    def __init__(self, model, tokenizer, name: str, max_top_logprobs: int = 20):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_top_logprobs = max_top_logprobs
        self.context = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.lock = threading.Lock()

    def encode(self, prompt: Any) -> list[int]:
        from alignkit.data.formats import encode_prompt

        if isinstance(prompt, list) and not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            return encode_prompt(prompt, self.tokenizer)
        except Exception as exc:  # a template that rejects a role, ...
            raise ApiError(400, f"cannot encode the prompt: {exc}") from None

    def complete(self, prompt_ids: list[list[int]], p: dict) -> list[dict]:
        """One choice per prompt: ``text``, ``finish_reason``, ``tokens`` (ids, EOS dropped),
        ``logps`` of those tokens and ``top`` alternatives per token when asked for."""
        import torch

        from alignkit.engine.sampling import SamplingConfig, sample

        longest = max(len(ids) for ids in prompt_ids)
        if longest >= self.context:
            raise ApiError(400, f"prompt of {longest} tokens exceeds the context of "
                                f"{self.context}", "prompt")
        max_new = max(1, min(p["max_tokens"], self.context - longest))
        try:
            cfg = SamplingConfig(max_new_tokens=max_new, temperature=p["temperature"],
                                 top_p=p["top_p"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        seed = p["seed"] if p["seed"] is not None else secrets.randbits(63)
        with self.lock, torch.no_grad():
            rollout = sample(self.model, prompt_ids, cfg, eos_token_id=self.tokenizer.eos_token_id,
                             pad_token_id=self.tokenizer.pad_token_id,
                             generator=torch.Generator().manual_seed(seed))
            want = p["top_logprobs"] if p["logprobs"] else None
            scored = self._token_logps(rollout, want) if want is not None else None
        return [self._choice(rollout, i, scored, p["stop"]) for i in range(len(prompt_ids))]

    def _token_logps(self, rollout, k: int):
        """Log-probs of the sampled tokens and the top-``k`` alternatives, ``[B, R]`` and
        ``[B, R, k]``, under one forward pass with generation's position ids."""
        import torch

        input_ids, mask = rollout.sequences()
        logits = self.model(input_ids=input_ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False).logits
        r = rollout.response_ids.size(1)
        logps = torch.log_softmax(logits[:, -(r + 1):-1].float(), dim=-1)
        chosen = logps.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
        top = logps.topk(min(k, logps.size(-1)), dim=-1) if k > 0 else None
        return chosen, top

    def _choice(self, rollout, i: int, scored, stop: list[str]) -> dict:
        """The EOS that ended a completion is not part of its text but keeps its log-prob entry:
        it carries the distribution at that position (a judge that answered with EOS first still
        shows how likely "1" and "2" were)."""
        tok = self.tokenizer
        n = int(rollout.response_lengths()[i])
        ids = rollout.response_ids[i, :n].tolist()
        finished = bool(rollout.finished[i])
        text = tok.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
        pieces = [tok.decode([t]) for t in ids]
        reason = "stop" if finished else "length"
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            keep, offset = 0, 0   # the tokens whose text starts before the stop string
            while keep < len(pieces) and offset < cut:
                offset += len(pieces[keep])
                keep += 1
            pieces = pieces[:keep]
        out = {"text": text, "finish_reason": reason, "pieces": pieces, "completion_tokens": n}
        if scored is not None:
            chosen, top = scored
            m = len(pieces)
            out["logps"] = [max(v, LOGPROB_FLOOR) for v in chosen[i, :m].tolist()]
            out["top"] = None if top is None else [
                [(tok.decode([t]), max(v, LOGPROB_FLOOR))
                 for t, v in zip(top.indices[i, j].tolist(), top.values[i, j].tolist())]
                for j in range(m)]
        return out


# ----------------------------------------------------------------------------------------------
# Request parsing (OpenAI semantics; unknown fields are ignored, unsupported ones refused).


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a {'integer' if kind is int else 'number'}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{key} must be in [{low}, {high}], got {value}", key)
    return kind(value)


def _common(body: dict, max_tokens_default: int) -> dict:
    if body.get("stream"):
        raise ApiError(400, STREAM_UNSUPPORTED, "stream")
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", "seed")
    return {"max_tokens": _number(body, "max_tokens", max_tokens_default, int, 1, 1 << 20),
            "temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, float, 1e-9, 1.0),
            "n": _number(body, "n", 1, int, 1, 16), "stop": stop, "seed": seed}


def _usage(prompt_tokens: int, choices: list[dict]) -> dict:
    completion = sum(c["completion_tokens"] for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _check_model(engine: Engine, body: dict) -> None:
    name = body.get("model")
    if name is not None and name != engine.name:
        raise ApiError(404, f"model {name!r} is not served here (serving {engine.name!r})", "model")


def completions(engine: Engine, body: dict) -> dict:
    _check_model(engine, body)
    p = _common(body, 16)
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo")
    k = body.get("logprobs")
    p["logprobs"] = k is not None
    p["top_logprobs"] = _number(body, "logprobs", 0, int, 0, engine.max_top_logprobs) if k is not None else 0
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    encoded = [engine.encode(x) for x in prompts]
    ids = [x for x in encoded for _ in range(p["n"])]
    choices = engine.complete(ids, p)
    out = []
    for i, c in enumerate(choices):
        logprobs = None
        if p["logprobs"]:
            offsets = [sum(len(s) for s in c["pieces"][:j]) for j in range(len(c["pieces"]))]
            logprobs = {"tokens": c["pieces"], "token_logprobs": c["logps"],
                        # a dict per token; two ids that decode alike keep the likelier one
                        "top_logprobs": [dict(reversed(alts)) for alts in c["top"]]
                        if c["top"] is not None else None,
                        "text_offset": offsets}
        out.append({"index": i, "text": c["text"], "logprobs": logprobs,
                    "finish_reason": c["finish_reason"]})
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
            "created": int(time.time()), "model": engine.name, "choices": out,
            "usage": _usage(sum(len(x) for x in encoded), choices)}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, "each message needs a role and text content", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def chat_completions(engine: Engine, body: dict) -> dict:
    _check_model(engine, body)
    if body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    p = _common(body, 256)
    p["logprobs"] = bool(body.get("logprobs"))
    p["top_logprobs"] = _number(body, "top_logprobs", 0, int, 0, engine.max_top_logprobs)
    if p["top_logprobs"] and not p["logprobs"]:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    ids = [engine.encode(_messages(body))] * p["n"]
    choices = engine.complete(ids, p)
    out = []
    for i, c in enumerate(choices):
        logprobs = None
        if p["logprobs"]:
            logprobs = {"content": [
                {"token": s, "logprob": lp, "bytes": list(s.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                  for t, v in alts]}
                for s, lp, alts in zip(c["pieces"], c["logps"], c["top"] or [[]] * len(c["logps"]))]}
        out.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": logprobs, "finish_reason": c["finish_reason"]})
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
            "created": int(time.time()), "model": engine.name, "choices": out,
            "usage": _usage(len(ids[0]), choices)}


def create_app(engine: Engine, api_key: str | None = None):
    """The Flask app; ``api_key`` set: every request needs ``Authorization: Bearer <key>``."""
    from flask import Flask, jsonify, request

    app = Flask("alignkit.serve")

    def error(status: int, message: str, param: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return jsonify({"error": {"message": message, "type": kind, "param": param,
                                  "code": None}}), status

    @app.before_request
    def authenticate():
        if api_key and not secrets.compare_digest(request.headers.get("Authorization", ""),
                                                  f"Bearer {api_key}"):
            return error(401, "invalid or missing API key")

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "alignkit"}]})

    def endpoint(fn):
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            return jsonify(fn(engine, body))
        except ApiError as exc:
            return error(exc.status, exc.message, exc.param)

    app.add_url_rule("/v1/completions", "completions",
                     lambda: endpoint(completions), methods=["POST"])
    app.add_url_rule("/v1/chat/completions", "chat_completions",
                     lambda: endpoint(chat_completions), methods=["POST"])
    return app


def load_engine(path: str, name: str | None = None, max_top_logprobs: int = 20) -> Engine:
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tokenizer)
    return Engine(model, tokenizer, name or path, max_top_logprobs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="folder of a causal LM (any alignkit output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--name", help="model name clients send (default: the --model path)")
    parser.add_argument("--api-key-env", help="require the key in this environment variable")
    parser.add_argument("--max-top-logprobs", type=int, default=20,
                        help="most alternatives per token a request may ask for")


def run(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            sys.exit(f"alignkit serve: environment variable {args.api_key_env} is empty")
    engine = load_engine(args.model, args.name, args.max_top_logprobs)
    server = make_server(args.host, args.port, create_app(engine, api_key), threaded=True)
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
