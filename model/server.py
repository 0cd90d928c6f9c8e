"""An OpenAI-compatible chat server (FastAPI): /v1/models, /v1/chat/completions (streaming or not), /health.

Requests are batched: a worker thread takes every request waiting (up to --max_batch) and decodes them
together, each row with its own sampling settings and its own stop conditions. Every batch has its own KV
cache (see model.generate), so requests never share state. A client that disconnects is dropped from its
batch at the next step.
"""
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generate import SamplingParams, stream_text

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ChatRequest(BaseModel):
    # Fields we do not use are ignored (OpenAI clients send many); the ones we use keep their JSON types, as
    # OpenAI checks them: "stream": "yes" or "max_tokens": "12" is a 400, not a guess.
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream_options: dict | None = None


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    deltas: "queue.Queue" = field(default_factory=queue.Queue)  # TextDelta or None (the end)
    cancelled: bool = False
    tokens: int = 0  # generated so far


class BatchEngine:
    """One worker thread; each loop takes all waiting jobs (up to max_batch) and decodes them as one batch."""

    def __init__(self, model, tokenizer, max_batch: int = 16, gather_ms: float = 5.0):
        self.model, self.tokenizer, self.max_batch, self.gather = model, tokenizer, max_batch, gather_ms / 1000
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.alive = True
        self.active = self.cancelled = self.served = self.cancelled_tokens = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="minimind-batcher")
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _take_batch(self):
        batch = [self.jobs.get()]
        deadline = time.monotonic() + self.gather
        while len(batch) < self.max_batch:
            try:
                batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return [j for j in batch if not j.cancelled]

    def _run(self):
        while self.alive:
            batch = self._take_batch()
            if not batch:
                continue
            self.active = len(batch)
            try:
                for deltas in stream_text(self.model, self.tokenizer, [j.prompt for j in batch],
                                          [j.params for j in batch], cancelled=lambda row: batch[row].cancelled):
                    for d in deltas:
                        batch[d.row].tokens += len(d.token_ids)
                        batch[d.row].deltas.put(d)
            except Exception as e:  # report to every waiting client instead of hanging them
                for j in batch:
                    j.deltas.put(e)
            for j in batch:
                j.deltas.put(None)
            self.active = 0
            self.served += len(batch)
            self.cancelled += sum(j.cancelled for j in batch)
            self.cancelled_tokens += sum(j.tokens for j in batch if j.cancelled)


def normalize_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = ROLE_ALIASES.get(m.get("role"))
        if role is None:
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not one of system, developer, user, "
                                f"assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "system":
        systems = [m["content"] for m in out if m["role"] == "system"]
        out = [{"role": "system", "content": "\n".join(systems)}] + [m for m in out if m["role"] != "system"]
    else:
        out = [m for m in out if m["role"] != "system"]
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "'messages' needs at least one user message", "messages")
    return out


def create_app(model, tokenizer, model_name: str = "minimind", api_key: str | None = None, max_batch: int = 16,
               context_length: int | None = None, defaults: SamplingParams | None = None) -> FastAPI:
    """`defaults` sample what a request leaves out (top_k and repetition_penalty, which OpenAI's API lacks, always;
    max_tokens capped by the context); without them, OpenAI's: temperature 1, top_p 1, up to the context."""
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    engine = BatchEngine(model, tokenizer, max_batch)
    context = context_length or model.config.max_seq_len
    defaults = defaults or SamplingParams(max_new_tokens=context, temperature=1.0)  # OpenAI's
    created = int(time.time())
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        message = first.get("msg", "invalid value")
        return JSONResponse(error_body(f"{where}: {message}" if where else f"the request body: {message}",
                                       param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"),
                            status_code=e.status_code)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("Incorrect API key provided", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "worker_alive": engine.thread.is_alive(),
                "active_requests": engine.active, "queued_requests": engine.jobs.qsize(),
                "served_requests": engine.served, "cancelled_requests": engine.cancelled,
                "tokens_of_cancelled_requests": engine.cancelled_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = normalize_messages(body.messages)
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        prompt = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        room = context - len(prompt)
        if room <= 0:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages have "
                                f"{len(prompt)}", "messages", "context_length_exceeded")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = min(room, defaults.max_new_tokens)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {len(prompt)} prompt tokens exceed the context length "
                                f"{context}", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")
        given = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        params = replace(defaults, max_new_tokens=max_tokens, stop=tuple(stop),
                         **{name: value for name, value in given.items() if value is not None})
        job = engine.submit(Job(prompt, params))
        rid, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", model_name
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_chunks(job, rid, name, len(prompt), usage), media_type="text/event-stream")
        text, finish, completion = "", None, 0
        async for d in next_deltas(job, request):
            text += d.text
            completion += len(d.token_ids)
            finish = d.finish_reason or finish
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}

    return app


async def next_deltas(job: Job, request: Request | None = None):
    """The job's deltas as they come, without blocking the event loop; stops the job if the client leaves."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            item = await loop.run_in_executor(None, job.deltas.get, True, 0.5)
        except queue.Empty:
            if request is not None and await request.is_disconnected():
                job.cancelled = True
                return
            continue
        if item is None:
            return
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", kind="server_error")
        yield item


async def stream_chunks(job: Job, rid: str, name: str, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    def chunk(delta, finish=None, usage=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    completion, finish, done = 0, None, False
    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for d in next_deltas(job):
                completion += len(d.token_ids)
                finish = d.finish_reason or finish
                if d.text:
                    yield chunk({"content": d.text})
        except APIError as e:  # the status line is already sent: report the failure in the stream
            yield f"data: {json.dumps(error_body(e.message, e.kind))}\n\n"
            return
        yield chunk({}, finish or "stop")
        if include_usage:
            yield chunk(None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                     "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:  # the client went away and closed this generator: its row stops at the next step
            job.cancelled = True
