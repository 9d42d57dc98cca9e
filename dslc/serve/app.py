"""The ASGI app of `dslc serve` (FastAPI): OpenAI's /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /v1/models, /health, and the chat page at /.

Every request is checked before it is queued (pydantic ranges, the model name, prompt + max_tokens within
the context, the body size, the queue bound): a 4xx with OpenAI's error body `{"error": {"message", ...}}`.
A streamed response whose client disconnects cancels its request, which frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dslc.chat_template import ChatTemplate, ChatTemplateError
from dslc.serve.scheduler import QueueFull, Sampling, Scheduler, ShuttingDown
from dslc.serve.scheduler import Request as Job
from dslc.serve.schemas import ChatCompletionRequest, CompletionRequest
from dslc.serve.text import TextStream

PAGE = Path(__file__).parent / "page" / "index.html"


@dataclass
class Limits:
    max_body: int = 1 << 20  # bytes of a request body
    default_max_tokens: int = 256  # a chat request that names no max_tokens
    poll_s: float = 0.25  # how often a non-streamed request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    where = ".".join(loc)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{where}: {msg}" if where else msg), where or None


class BodyLimit:
    """ASGI middleware: a body past `limit` bytes (by Content-Length, or counted as it arrives) is a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "")
            return message

        try:
            await self.app(scope, counted, send)
        except ApiError as e:
            if e.status != 413:
                raise
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(_error_body(413, f"the request body is larger than {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def create_app(runtime, scheduler: Scheduler, limits: Limits | None = None, template: ChatTemplate | None = None):
    """The FastAPI app serving `runtime` (dslc.runtime.Runtime) through `scheduler`; stops it on shutdown."""
    limits = limits or Limits()
    template = template or ChatTemplate.from_folder(runtime.weights)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="dslc serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(_error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(_error_body(400, message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return JSONResponse(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(runtime.name)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": runtime.name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": runtime.name,
            "object": "model",
            "created": 0,
            "owned_by": "dslc",
            "max_model_len": runtime.max_len,
        }
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != runtime.name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {runtime.name!r}",
                "model",
                "model_not_found",
            )

    def prepare(ids: list[int], max_tokens: int | None, body) -> Sampling:
        if not ids:
            if not runtime.bos:
                raise ApiError(400, "the prompt encodes to no tokens and the model names no bos_token_id", "prompt")
            ids.append(runtime.bos[0])
        if runtime.vocab is not None and any(not 0 <= i < runtime.vocab for i in ids):
            raise ApiError(400, f"prompt token ids must be in 0 .. {runtime.vocab - 1}", "prompt")
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, runtime.max_len - len(ids))
        problem = runtime.context_error(len(ids), max_tokens)
        if problem or max_tokens < 1:
            raise ApiError(400, problem or f"the prompt ({len(ids)} tokens) fills the context", "max_tokens")
        return Sampling(max_tokens, body.temperature, body.top_p, body.top_k or None, body.seed)

    async def run(request: Request, ids: list[int], sampling: Sampling, stops: list[str], counts: dict):
        """Submit the job; yield (text, finish_reason or None) as tokens arrive; counts["tokens"]: how many."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value) -> None:  # from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
                pass

        job = Job(ids, sampling, emit)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e)) from None
        stream = TextStream(runtime.decode, stops)
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), limits.poll_s)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "token":
                    counts["tokens"] += 1
                    text, stopped = stream.push(value)
                    if stopped:
                        scheduler.cancel(job)
                        yield text, "stop"
                        return
                    if text:
                        yield text, None
                elif kind == "done":
                    yield stream.flush(), value
                    return
                else:
                    raise ApiError(500, str(value))
        finally:
            scheduler.cancel(job)  # a no-op once finished; frees the slot when the client went away

    def completion_ids(body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, list):
            return list(body.prompt)
        return runtime.encode(body.prompt)

    def chat_ids(body: ChatCompletionRequest) -> list[int]:
        try:
            text = template.render(body.conversation())
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        return runtime.encode(text, special=template.source is None)

    async def respond(request: Request, body, ids: list[int], max_tokens: int | None, chat: bool):
        check_model(body.model)
        sampling = prepare(ids, max_tokens, body)
        stops = body.stops() + ([template.stop_text] if chat and template.stop_text else [])
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": runtime.name}
        counts = {"tokens": 0}
        events = run(request, ids, sampling, stops, counts)

        def usage() -> dict:
            n = counts["tokens"]
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if body.stream:
            try:
                first = await anext(events)  # errors before the first token (429, 503) are still a status code
            except StopAsyncIteration:  # the client went away before the first token
                return JSONResponse({}, status_code=499)

            async def sse():
                kind = "chat.completion.chunk" if chat else "text_completion"
                if chat:
                    yield _sse({**base, "object": kind, "choices": [_delta({"role": "assistant", "content": ""})]})
                try:
                    item = first
                    while True:
                        text, reason = item
                        if reason == "cancelled":
                            return
                        if chat:
                            delta = {"content": text} if text else {}
                            choice = _delta(delta, "length" if reason == "length" else reason)
                        else:
                            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
                        yield _sse({**base, "object": kind, "choices": [choice]})
                        if reason is not None:
                            break
                        item = await anext(events)
                except ApiError as e:
                    yield _sse(_error_body(e.status, e.message))
                finally:
                    await events.aclose()
                if body.include_usage():
                    yield _sse({**base, "object": kind, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, reason = [], None
        async for text, finish in events:
            parts.append(text)
            reason = finish
        if reason == "cancelled":
            return JSONResponse({}, status_code=499)
        text = "".join(parts)
        if chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": usage()}
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {**base, "object": "text_completion", "choices": [choice], "usage": usage()}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await respond(request, body, completion_ids(body), body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await respond(request, body, chat_ids(body), body.limit(), chat=True)

    return BodyLimit(app, limits.max_body)


def _delta(delta: dict, reason: str | None = None) -> dict:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
