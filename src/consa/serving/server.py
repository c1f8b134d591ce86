"""The HTTP face of the engine: OpenAI's completions and chat completions over a Starlette app.

The engine steps in its own thread (:class:`~consa.serving.scheduler.EngineThread`); each HTTP request
becomes a :class:`~consa.serving.scheduler.Request` whose tokens the engine hands to the request's
asyncio queue. Streaming answers are server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``. A client that goes away cancels its request (the slot is free at the next step);
a full queue answers 429 with ``Retry-After``; bad input answers 4xx with one sentence. Routes:
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .metrics import ServerMetrics
from .protocol import ApiError, Job, Protocol, TextStream
from .scheduler import EngineStopped, EngineThread, QueueFull, Request

RETRY_AFTER_S = 1


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class App:
    """The routes over one engine. ``eos``: the model's end tokens; ``tokenizer``: None for id-only serving."""

    def __init__(self, engine: EngineThread, *, model_name: str, tokenizer, eos: tuple[int, ...], max_len: int,
                 default_max_tokens: int = 16):
        self.engine, self.tok, self.eos, self.model_name = engine, tokenizer, tuple(eos), model_name
        self.max_len = max_len
        vocab = engine.sched.vocab
        self.protocol = Protocol(model_name, tokenizer, vocab, max_len, default_max_tokens)
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())
        engine.on_step = self.metrics.on_step

    def starlette(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.engine.stop()  # cancels whatever uvicorn's graceful shutdown left running

        async def http_error(request, exc: HTTPException):
            return _error(ApiError(exc.detail or "error", status=exc.status_code, kind="invalid_request_error"))

        async def server_error(request, exc: Exception):
            return _error(ApiError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error"))

        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error, 500: server_error})

    # ---- plain routes ---------------------------------------------------------------------------------
    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                         "owned_by": "consa", "max_model_len": self.max_len}]})

    async def health(self, request: HttpRequest) -> Response:
        alive = self.engine.alive()
        body = {"status": "ok" if alive else "engine stopped", "running": self.engine.sched.slots_used(),
                "waiting": self.engine.queue_depth(), "slots": self.engine.sched.pool.num_slots}
        return JSONResponse(body, status_code=200 if alive else 503)

    async def prometheus(self, request: HttpRequest) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- generation -------------------------------------------------------------------------------
    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: HttpRequest, chat: bool) -> Response:
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(f"the request body is not valid JSON ({e})") from None
            job = self.protocol.chat(body) if chat else self.protocol.completion(body)
            req, events = self._submit(job)
        except ApiError as e:
            self.metrics.rejected.labels(reason=str(e.status)).inc()
            return _error(e)
        self.metrics.prompt.inc(len(job.prompt))
        run = _Run(self, request, job, req, events, chat)
        if job.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.whole()

    def _submit(self, job: Job) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(tokens, reason):  # engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, (tokens, reason))

        req = Request(job.prompt, job.max_tokens, eos=() if job.ignore_eos else self.eos, sampling=job.sampling,
                      on_event=on_event)
        try:
            self.engine.submit(req)
        except EngineStopped as e:
            raise ApiError(str(e), status=503, kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except QueueFull as e:
            raise ApiError(f"the server is busy: {e}; retry in {RETRY_AFTER_S} s", status=429, kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            raise ApiError(str(e)) from None
        return req, events


class _Run:
    """One request in flight: its events turned into an answer, its cancellation on disconnect."""

    def __init__(self, app: App, http: HttpRequest, job: Job, req: Request, events: asyncio.Queue, chat: bool):
        self.app, self.http, self.job, self.req, self.events, self.chat = app, http, job, req, events, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = TextStream(app.tok, job.stop)
        self.tokens: list[int] = []
        self.outcome: str | None = None

    async def _watch_disconnect(self) -> None:
        while (await self.http.receive())["type"] != "http.disconnect":
            pass
        self.app.engine.cancel(self.req)

    async def _next(self) -> tuple[list[int], str, str | None]:
        """(new tokens, new text, finish reason or None) from the engine."""
        tokens, reason = await self.events.get()
        self.tokens.extend(tokens)
        delta = self.text.push(tokens, final=reason is not None)
        if self.text.stopped and reason in (None, "length"):
            self.app.engine.cancel(self.req)  # a stop string: the engine may be a step ahead
            reason = "stop"
        return tokens, delta, reason

    def _finish(self, reason: str) -> None:
        self.outcome = reason
        end = self.req.finished_at or time.perf_counter()
        if self.req.finished_at is None:
            self.req.finished_at = end
        self.app.metrics.finished(self.req, reason.split(":")[0])

    def _usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": len(self.job.prompt), "completion_tokens": n, "total_tokens": len(self.job.prompt) + n}

    def _failure(self, reason: str) -> ApiError:
        if reason == "cancelled":
            return ApiError("the request was cancelled (the server is shutting down)", status=503, kind="server_error")
        return ApiError(f"generation failed: {reason[len('error: '):]}", status=500, kind="server_error")

    async def whole(self) -> Response:
        watcher = asyncio.create_task(self._watch_disconnect())
        try:
            text = []
            while True:
                _, delta, reason = await self._next()
                text.append(delta)
                if reason is not None:
                    break
        finally:
            watcher.cancel()
            if self.req.finish_reason is None and self.outcome is None:
                self.app.engine.cancel(self.req)
        self._finish(reason)
        if reason not in ("stop", "length"):
            return _error(self._failure(reason))
        choice = {"index": 0, "finish_reason": reason, "logprobs": None, "token_ids": self.tokens}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.app.model_name, "choices": [choice],
                             "usage": self._usage()})

    def _chunk(self, delta: str | None, tokens: list[int], reason: str | None, role: bool = False) -> str:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None, "token_ids": tokens}
        if self.chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice["delta"] = d
        else:
            choice["text"] = delta or ""
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.app.model_name, "choices": [choice]}
        if self.job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self):
        watcher = asyncio.create_task(self._watch_disconnect())
        reason = None
        try:
            if self.chat:
                yield self._chunk(None, [], None, role=True)
            while reason is None:
                tokens, delta, reason = await self._next()
                if reason is not None and reason not in ("stop", "length"):
                    yield f"data: {json.dumps(self._failure(reason).body())}\n\n"
                    break
                if delta or tokens or reason:
                    yield self._chunk(delta, tokens, reason)
            if self.job.include_usage and reason in ("stop", "length"):
                body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created, "model": self.app.model_name, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the response's task is cancelled)
            watcher.cancel()
            if self.req.finish_reason is None and self.outcome is None:
                self.app.engine.cancel(self.req)
            self._finish(reason or "cancelled")


class BackgroundServer:
    """uvicorn serving an app from a background thread, on a loopback port of its own (0 = any free one):
    for tests and benchmarks that talk to a real server in the same process. A context manager."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=timeout_s))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self.sock.close()
