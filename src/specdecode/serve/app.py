"""The HTTP layer: OpenAI's routes on FastAPI, streaming over server-sent events.

    POST /v1/completions, POST /v1/chat/completions   (stream or not)
    GET /v1/models, GET /health, GET /metrics

Errors are OpenAI's error objects: 400 for a bad body or parameter (a prompt that does not fit
the context included), 401 for a missing or wrong API key, 404 for another model's name, 429
when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from specdecode.api import SpecDecoder
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError
from specdecode.serve import protocol
from specdecode.serve.metrics import ServerMetrics
from specdecode.serve.protocol import ChatRequest, CompletionRequest, error_body
from specdecode.serve.scheduler import (
    DEFAULT_MAX_BATCH,
    Job,
    QueueFull,
    Scheduler,
    ShuttingDown,
)

#: How often a waiting non-streaming request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.25

#: max_tokens of a completion that names none (OpenAI's default for /v1/completions).
COMPLETION_MAX_TOKENS = 16


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def make_app(
    llm: SpecDecoder,
    spec: SpecConfig,
    model_name: str,
    api_key: str | None = None,
    max_waiting: int = 64,
    shutdown_grace: float = 60.0,
    max_batch: int = DEFAULT_MAX_BATCH,
    forward_seconds: Callable[[int], float] | None = None,
    scheduler_thread: bool = True,
) -> FastAPI:
    """The server's app; its scheduler (`max_batch` sequences at once; see `Scheduler` for
    `forward_seconds`, `app.state.scheduler`) stops with the app's lifespan, and starts with it
    on a thread of its own unless `scheduler_thread` is False (the caller then runs it). On
    SIGTERM, streams get `shutdown_grace` seconds to finish before they are cut."""
    metrics = ServerMetrics(model_name)
    scheduler = Scheduler(llm, metrics, max_waiting, max_batch, forward_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if scheduler_thread:
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="specdecode", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPError(
                401,
                "a valid API key is needed: send Authorization: Bearer KEY",
                "authentication_error",
            )

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = str(first.get("msg", "bad request")).removeprefix("Value error, ")
        param = ".".join(where) or None
        text = f"{param}: {message}" if param else message
        return JSONResponse(error_body(text, param=param), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": protocol.now(),
            "owned_by": "specdecode",
            "max_model_len": llm.target.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def checked(body: CompletionRequest | ChatRequest, ids: list[int]) -> SamplingParams:
        if body.model not in (None, model_name):
            raise HTTPError(
                404,
                f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                "not_found_error",
                "model",
            )
        room = llm.target.max_context - len(ids)
        default = COMPLETION_MAX_TOKENS if isinstance(body, CompletionRequest) else room
        try:
            sampling = body.sampling(max(1, default))
        except SpecDecodeError as exc:
            raise HTTPError(400, str(exc), "invalid_request_error") from None
        if len(ids) + sampling.max_new_tokens > llm.target.max_context:
            raise HTTPError(
                400,
                f"this model's context holds {llm.target.max_context} tokens; the prompt has "
                f"{len(ids)} and max_tokens asks for {sampling.max_new_tokens} more: shorten "
                "the prompt or lower max_tokens",
                "invalid_request_error",
                "max_tokens",
            )
        return sampling

    def encoded(make) -> list[int]:
        try:
            return make()
        except SpecDecodeError as exc:
            raise HTTPError(400, str(exc), "invalid_request_error") from None

    def submit(ids: list[int], sampling: SamplingParams) -> tuple[Job, asyncio.Queue]:
        job, outputs = Job.for_loop(ids, sampling, spec)
        try:
            scheduler.submit(job)
        except QueueFull as exc:
            raise HTTPError(429, str(exc), "rate_limit_error") from None
        except ShuttingDown as exc:
            raise HTTPError(503, str(exc), "server_error") from None
        return job, outputs

    async def collect(
        request: Request, job: Job, outputs: asyncio.Queue
    ) -> tuple[str, GenerationStats]:
        text, stats = [], GenerationStats()
        while True:
            try:
                item = await asyncio.wait_for(outputs.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise HTTPError(499, "the client went away", "cancelled") from None
                continue
            if item is None:
                return "".join(text), stats
            if isinstance(item, ShuttingDown):
                raise HTTPError(503, str(item), "server_error")
            if isinstance(item, BaseException):
                raise HTTPError(500, f"generation failed: {item}", "server_error")
            text.append(item.text)
            stats = item.stats

    async def events(job: Job, outputs: asyncio.Queue, chunk) -> AsyncIterator[str]:
        """The stream's data lines; a client that goes away cancels the job (the generator is
        closed, which runs `finally`)."""
        try:
            while True:
                item = await outputs.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    yield json.dumps(error_body(f"generation failed: {item}", "server_error"))
                    break
                step: StepOutput = item
                if step.text or step.finished:
                    reason = protocol.finish_reason(step.stats) if step.finished else None
                    body = chunk(step.text, reason)
                    if step.finished:
                        body["usage"] = protocol.usage(step.stats)
                        body["speculative_decoding"] = protocol.speculative_stats(step.stats)
                    yield json.dumps(body)
            yield "[DONE]"
        finally:
            job.cancelled.set()  # a no-op once the job finished

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if any(not 0 <= t < llm.tokenizer.vocab_size for t in prompt):
                raise HTTPError(
                    400,
                    "prompt token ids must be in the model's vocabulary",
                    "invalid_request_error",
                    "prompt",
                )
            ids = list(prompt)
        else:
            ids = encoded(lambda: llm.encode_prompt(prompt, chat=False))
        sampling = checked(body, ids)
        job, outputs = submit(ids, sampling)
        rid, created = protocol.new_id("cmpl"), protocol.now()

        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            }

        if body.stream:
            return EventSourceResponse(
                events(job, outputs, chunk), shutdown_grace_period=shutdown_grace
            )
        text, stats = await collect(request, job, outputs)
        if body.echo and isinstance(prompt, str):
            text = prompt + text
        out = chunk(text, protocol.finish_reason(stats))
        out["usage"] = protocol.usage(stats)
        out["speculative_decoding"] = protocol.speculative_stats(stats)
        return out

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        ids = encoded(lambda: llm.encode_chat(body.turns()))
        sampling = checked(body, ids)
        job, outputs = submit(ids, sampling)
        rid, created = protocol.new_id("chatcmpl"), protocol.now()
        started = [False]

        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text}
            if not started[0]:
                delta["role"] = "assistant"
                started[0] = True
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        if body.stream:
            return EventSourceResponse(
                events(job, outputs, chunk), shutdown_grace_period=shutdown_grace
            )
        text, stats = await collect(request, job, outputs)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": protocol.finish_reason(stats),
                }
            ],
            "usage": protocol.usage(stats),
            "speculative_decoding": protocol.speculative_stats(stats),
        }

    return app
