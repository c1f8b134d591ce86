"""The OpenAI request bodies the server takes, checked field by field, and the text of a token stream.

Each check failure is an :class:`ApiError` with one sentence naming the field, so a client sees what
to fix and the server stays up. Fields the server does not know are ignored (clients send their own
extensions); a known field of the wrong type or out of range is refused. Only what the engine does is
accepted: one choice (``n`` = 1), no log-probabilities, no echo, no penalties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .scheduler import Sampling


class ApiError(Exception):
    """An error response: HTTP ``status``, OpenAI's error ``type``, the offending ``param``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.headers = message, status, param, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Job:
    """A checked request: prompt ids, limits, sampling, streaming options, stop strings."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    chat: bool = False


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be true or false, got {v!r}", param=name)
    return v


def _int(body, name, default=None, *, low=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer, got {v!r}", param=name)
    if low is not None and v < low:
        raise ApiError(f"'{name}' must be at least {low}, got {v}", param=name)
    return v


def _number(body, name, default, low, high, *, open_low=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"'{name}' must be a number, got {v!r}", param=name)
    if v < low or v > high or (open_low and v == low):
        raise ApiError(f"'{name}' must be in {'(' if open_low else '['}{low}, {high}], got {v}", param=name)
    return float(v)


def _unsupported(body, name, ok) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        raise ApiError(f"'{name}'={body[name]!r} is not supported by this server", param=name)


def _token_ids(v, name: str, vocab: int) -> list[int]:
    if not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise ApiError(f"'{name}' must be a string or a non-empty list of token ids", param=name)
    bad = [t for t in v if not 0 <= t < vocab]
    if bad:
        raise ApiError(f"'{name}' holds token id {bad[0]}, outside the vocabulary of {vocab}", param=name)
    return list(v)


class Protocol:
    """Turns request bodies into :class:`Job` objects for one served model."""

    def __init__(self, model_name: str, tokenizer, vocab: int, max_len: int, default_max_tokens: int = 16):
        self.model_name, self.tok, self.vocab, self.max_len = model_name, tokenizer, vocab, max_len
        self.default_max_tokens = default_max_tokens

    def _common(self, body) -> None:
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(f"'model' must be a string, got {model!r}", param="model")
        if model not in (None, self.model_name):
            raise ApiError(f"the model '{model}' does not exist (this server serves '{self.model_name}')", status=404,
                           param="model", kind="not_found_error")
        _unsupported(body, "n", lambda v: v == 1)
        _unsupported(body, "best_of", lambda v: v == 1)
        _unsupported(body, "echo", lambda v: v is False)
        _unsupported(body, "logprobs", lambda v: v is False)
        _unsupported(body, "top_logprobs", lambda v: v == 0)
        _unsupported(body, "presence_penalty", lambda v: v == 0)
        _unsupported(body, "frequency_penalty", lambda v: v == 0)
        _unsupported(body, "tools", lambda v: v == [])

    def _job(self, body, prompt: list[int], limit_name: str, chat: bool) -> Job:
        if len(prompt) >= self.max_len:
            raise ApiError(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_len} tokens "
                           "(the prompt must leave room for at least one new token)", param="prompt" if not chat else "messages")
        room = self.max_len - len(prompt)
        max_tokens = _int(body, limit_name, low=1)
        if limit_name != "max_tokens" and max_tokens is None:
            max_tokens = _int(body, "max_tokens", low=1)
        if max_tokens is None:
            max_tokens = room if chat else min(room, self.default_max_tokens)
        if max_tokens > room:
            raise ApiError(f"the prompt ({len(prompt)} tokens) plus {limit_name} ({max_tokens}) exceeds this model's context "
                           f"of {self.max_len} tokens", param=limit_name)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
        top_k = _int(body, "top_k", 0, low=-1)
        seed = _int(body, "seed")
        stream = _bool(body, "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(f"'stream_options' must be an object, got {opts!r}", param="stream_options")
        include_usage = _bool(opts or {}, "include_usage")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4):
            raise ApiError(f"'stop' must be a string or a list of up to 4 non-empty strings, got {stop!r}", param="stop")
        if stop and self.tok is None:
            raise ApiError("'stop' strings need a tokenizer, and this model has none", param="stop")
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=max(0, top_k), seed=seed)
        return Job(prompt, max_tokens, sampling, stream, include_usage, stop, _bool(body, "ignore_eos"), chat)

    def completion(self, body) -> Job:
        self._common(body)
        if "prompt" not in body:
            raise ApiError("'prompt' is required", param="prompt")
        p = body["prompt"]
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if self.tok is None:
                raise ApiError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
            if not p:
                raise ApiError("'prompt' is empty", param="prompt")
            ids = self.tok(p).input_ids
        elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            raise ApiError("one prompt per request: 'prompt' must be a string or a list of token ids", param="prompt")
        elif isinstance(p, list):
            ids = _token_ids(p, "prompt", self.vocab)
        else:
            raise ApiError(f"'prompt' must be a string or a list of token ids, got {type(p).__name__}", param="prompt")
        if not ids:
            raise ApiError("'prompt' encodes to no tokens", param="prompt")
        return self._job(body, ids, "max_tokens", chat=False)

    def chat(self, body) -> Job:
        self._common(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError("'messages' must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(f"messages[{i}] must be an object with a string 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                    raise ApiError(f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise ApiError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
            clean.append({"role": m["role"], "content": content})
        if self.tok is None:
            raise ApiError("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                           param="messages")
        if not getattr(self.tok, "chat_template", None):
            raise ApiError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        try:
            text = self.tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (roles out of order, ...)
            raise ApiError(f"the chat template rejected the messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           param="messages") from None
        ids = self.tok(text, add_special_tokens=False).input_ids
        return self._job(body, ids, "max_completion_tokens", chat=True)


class TextStream:
    """Incremental text of generated tokens: each :meth:`push` returns the new text that is safe to send
    (no half-decoded character, nothing that may still turn into a stop string); :attr:`stopped` is
    set once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True) if self.tok is not None else ""

    def push(self, tokens: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        text = self._text()
        for s in self.stop:
            i = text.find(s, max(0, len(self.sent) - len(s)))
            if i >= 0:
                text, self.stopped, final = text[:i], True, True
        if not final:
            if text.endswith("\ufffd"):  # a character whose bytes are not all there yet
                text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        out = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return out
