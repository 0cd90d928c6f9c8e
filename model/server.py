"""An OpenAI-compatible chat server (FastAPI): /v1/models, /v1/chat/completions (streaming or not), /health.

Requests are scheduled per decode step by model/scheduler.py: a request joins the running batch at the next
step and leaves it the moment it finishes, each row with its own sampling settings, stops and KV-cache row, so
no request shares state with another or waits for another to finish. Every field is checked before a request
reaches the scheduler (a 400 with OpenAI's error body); past `--max_queue` waiting requests the answer is a 429.
A client that disconnects frees its row at the next step.

Tools (OpenAI's `tools`, `tool_choice`, `role: "tool"` messages) go through the chat template's plain-text tags; what
the model writes is split by model/tool_calls.py into `reasoning_content`, `content` and `tool_calls`. tool_choice
"auto" lets the model choose and parses what it wrote (a garbled call stays plain content); "none" shows it no tools
and parses nothing; "required" or a named function constrains the output to calls whose arguments match the tool's
schema, and `response_format` (json_object, json_schema) to JSON, both by grammars (model/grammar.py, xgrammar).
"""
import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generate import SamplingParams, TextDelta
from .openapi import INT64, document
from .scheduler import QueueFull, Request as Job, Scheduler
from .tool_calls import OutputParser, ToolError, normalize_calls, normalize_tools, openai_call

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def integral(value):
    """JSON Schema's integer: 12 and 12.0 are one number (a float with no fraction); "12" stays a string."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 64 else value


Integer = Annotated[int, BeforeValidator(integral)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    # Fields we do not use are ignored (OpenAI clients send many); the ones we use keep their JSON types, as
    # OpenAI checks them: "stream": "yes" or "max_tokens": "12" is a 400, not a guess.
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = "minimind"
    messages: list
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: Integer | None = None
    max_completion_tokens: Integer | None = None
    stop: str | list[str] | None = None
    seed: Integer | None = Field(default=None, ge=-INT64, lt=INT64)
    n: Integer = Field(default=1, ge=1)
    stream_options: StreamOptions | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None


def check_text(text: str, where: str) -> str:
    """Text that is valid Unicode: a lone surrogate (JSON's "\\ud800") has no UTF-8 form and no tokens."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} is not valid Unicode ({e.reason} at position {e.start})", where) from e
    return text


def message_text(content, where: str, optional: bool = False) -> str:
    """A message's text: a string or OpenAI's text parts (an assistant's may be null, as when it made calls)."""
    if content is None and optional:
        return ""
    if isinstance(content, list):  # content parts: keep the text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}: only text parts are supported", where)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where} must be a string", where)
    return check_text(content, where)


def tool_fields(check, *args):
    """A model/tool_calls.py check; its ToolError is a 400 that names the field."""
    try:
        return check(*args)
    except ToolError as e:
        raise APIError(400, str(e), e.param) from e


def normalize_messages(messages) -> list[dict]:
    """OpenAI's messages as the chat template's turns. System messages stay where they are (the first one is the
    prompt's head, later ones are turns of their own); assistant turns keep their calls and reasoning."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = ROLE_ALIASES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise APIError(400, f"{where}.role {m.get('role')!r} is not one of system, developer, user, assistant, "
                                f"tool", f"{where}.role")
        turn = {"role": role, "content": message_text(m.get("content"), f"{where}.content", role == "assistant")}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                raise APIError(400, f"{where}.{key} must be a string", f"{where}.{key}")
        if role == "tool" and "tool_call_id" not in m:
            raise APIError(400, f"{where}.tool_call_id is required in a tool message (the id of the call it answers)",
                           f"{where}.tool_call_id")
        if role == "assistant" and m.get("tool_calls"):
            turn["tool_calls"] = tool_fields(normalize_calls, m["tool_calls"], None, f"{where}.tool_calls")
            check_text(json.dumps(turn["tool_calls"], ensure_ascii=False), f"{where}.tool_calls")
        if role == "assistant" and m.get("reasoning_content"):
            turn["reasoning_content"] = message_text(m["reasoning_content"], f"{where}.reasoning_content")
        out.append(turn)
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "'messages' needs at least one user message", "messages")
    return out


def tool_mode(choice, names: list[str]) -> tuple[str, str | None]:
    """tool_choice as (auto | none | required | named, the named function)."""
    if choice is None:
        return ("auto" if names else "none"), None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise APIError(400, "tool_choice 'required' needs tools", "tool_choice")
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", "tool_choice")
    if function["name"] not in names:
        raise APIError(400, f"tool_choice names the function {function['name']!r}, which is not in tools",
                       "tool_choice")
    return "named", function["name"]


def json_format(response_format) -> tuple[bool, dict | None]:
    """response_format as (constrained to JSON?, the schema or None for any JSON object)."""
    kind = response_format.get("type") if response_format is not None else "text"
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    spec = response_format.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict) \
            or not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), bool):
        raise APIError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                            "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}", "response_format")
    return True, spec.get("schema")


class Answer:
    """One choice's generated text as it arrives, in OpenAI's fields: reasoning_content, content, tool_calls."""

    def __init__(self, tool_names):
        self.parser, self.text = OutputParser(tool_names), {"content": "", "reasoning_content": ""}
        self.tool_calls, self.finish_reason = None, None

    def push(self, delta) -> list[dict]:
        """The message deltas this TextDelta adds (the calls and the finish reason come with the last)."""
        pieces = self.parser.push(delta.text)
        if delta.finish_reason:
            tail, calls = self.parser.finish()
            pieces += tail
            self.tool_calls = [openai_call(c) for c in calls] if calls else None
            self.finish_reason = "tool_calls" if calls else delta.finish_reason
        out = []
        for kind, text in pieces:
            if text:
                field = "reasoning_content" if kind == "reasoning" else "content"
                self.text[field] += text
                out.append({field: text})
        if self.tool_calls:
            out.append({"tool_calls": [{"index": k, **call} for k, call in enumerate(self.tool_calls)]})
        return out

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.text["content"] or (None if self.tool_calls else "")}
        if self.text["reasoning_content"]:
            message["reasoning_content"] = self.text["reasoning_content"]
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def create_app(model, tokenizer, model_name: str = "minimind", api_key: str | None = None, max_batch: int = 16,
               context_length: int | None = None, defaults: SamplingParams | None = None, max_queue: int = 64,
               prefill_chunk: int = 512, scheduler_in_thread: bool = True, gather_ms: float = 0.0) -> FastAPI:
    """`model`: a model or an Engine (model/engine.py). `defaults` sample what a request leaves out (top_k and
    repetition_penalty, which OpenAI's API lacks, always; max_tokens capped by the context); without them, OpenAI's:
    temperature 1, top_p 1, up to the context."""
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    context = context_length or model.config.max_seq_len
    scheduler = Scheduler(model, tokenizer, max_batch, max_queue, prefill_chunk, capacity=context,
                          in_thread=scheduler_in_thread, gather_ms=gather_ms)  # else the caller runs app.state.scheduler.run()
    defaults = defaults or SamplingParams(max_new_tokens=context, temperature=1.0)  # OpenAI's
    created = int(time.time())
    app.state.scheduler = scheduler

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = document(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                          max_batch, context, api_key is not None)
        return app.openapi_schema

    app.openapi = openapi
    compiled_for = {}  # the grammar compiler, made on the first request that needs one

    def grammars():
        if "grammars" not in compiled_for:
            from .grammar import Grammars

            compiled_for["grammars"] = Grammars(tokenizer, model.config.vocab_size)
        return compiled_for["grammars"]

    def constraint(tools, mode, name, parallel, response_format, max_tokens, room):
        """The grammar a request's output must follow (None: free text), checked to fit in max_tokens."""
        constrained, schema = json_format(response_format)
        forced = mode in ("required", "named")
        if not (forced or constrained):
            return None
        try:
            if forced:
                chosen = [t for t in tools if mode == "required" or t["name"] == name]
                compiled = grammars().tool_calls(chosen, parallel=mode == "required" and parallel is not False)
            else:
                compiled = grammars().json(schema)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's word on a schema it cannot follow
            where = "tools" if forced else "response_format"
            raise APIError(400, f"{where}: not a JSON schema this server can follow ({e})", where) from e
        need = grammars().closing_length(compiled, room)
        if need > max_tokens:
            shortest = f"{need} tokens" if need <= room else f"more than the {room} tokens the context has left"
            raise APIError(400, f"max_tokens {max_tokens} is too few for the required output: its shortest form "
                                f"takes {shortest}", "max_tokens")
        return lambda: grammars().matcher(compiled)

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
                            status_code=e.status_code, headers=e.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):  # a bug: still OpenAI's error body, never a bare text page
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("Incorrect API key provided", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "worker_alive": scheduler.running,
                "active_requests": len({id(c.request) for c in scheduler.rows}), "active_rows": len(scheduler.rows),
                "queued_requests": scheduler.queued, "served_requests": scheduler.served,
                "cancelled_requests": scheduler.cancelled, "failed_rows": scheduler.failed,
                "tokens_of_cancelled_requests": scheduler.cancelled_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = normalize_messages(body.messages)
        if body.n > max_batch:
            raise APIError(400, f"n must be at most {max_batch} (the server's --max_batch)", "n")
        tools = tool_fields(normalize_tools, body.tools) if body.tools else []
        check_text(json.dumps(tools, ensure_ascii=False), "tools")
        mode, name = tool_mode(body.tool_choice, [t["name"] for t in tools])
        shown = tools if mode != "none" else None  # "none": the model is not shown tools it may not call
        prompt = tokenizer.apply_chat_template(messages, tools=shown or None, tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
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
        for i, s in enumerate(stop):
            check_text(s, f"stop[{i}]")
        grammar = constraint(tools, mode, name, body.parallel_tool_calls, body.response_format, max_tokens, room)
        given = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        params = replace(defaults, max_new_tokens=max_tokens, stop=tuple(stop),
                         **{name: value for name, value in given.items() if value is not None})
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(prompt, params, lambda index, item: loop.call_soon_threadsafe(events.put_nowait, (index, item)),
                  n=body.n, grammar=grammar)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", kind="rate_limit_error",
                           code="rate_limit_exceeded") from e
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        answers = [Answer([t["name"] for t in shown or []]) for _ in range(body.n)]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream_chunks(job, events, rid, model_name, len(prompt), usage, answers),
                                     media_type="text/event-stream")
        completion = 0
        async for index, d in next_events(job, events, request):
            if isinstance(d, Exception):
                raise APIError(500, f"generation failed: {d}", kind="server_error")
            answers[index].push(d)
            completion += len(d.token_ids)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "message": a.message(), "finish_reason": a.finish_reason}
                            for i, a in enumerate(answers)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}

    return app


async def next_events(job: Job, events: asyncio.Queue, request: Request | None = None):
    """(choice index, TextDelta or Exception) as the scheduler sends them; stops the job if the client leaves.

    Deltas of one choice that queued up while this stream was waiting for its turn (a busy server) come as one:
    one chunk to encode and send instead of several, and the text is the same."""
    held = None
    while True:
        if held is not None:
            index, item, held = *held, None
        else:
            try:
                index, item = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancelled = True
                    return
                continue
        if index is None:
            return
        while isinstance(item, TextDelta) and item.finish_reason is None and not events.empty():
            following = events.get_nowait()
            if following[0] != index or not isinstance(following[1], TextDelta):
                held = following
                break
            more = following[1]
            item = TextDelta(item.row, item.text + more.text, more.finish_reason, item.token_ids + more.token_ids)
        yield index, item


async def stream_chunks(job: Job, events: asyncio.Queue, rid: str, name: str, prompt_tokens: int,
                        include_usage: bool, answers: list[Answer]):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; a row that fails gets an error
    event (the status line is already sent) and the other choices go on."""
    def chunk(index, delta, finish=None, usage=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    completion, done = 0, False
    try:
        for index in range(job.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, d in next_events(job, events):
            if isinstance(d, Exception):
                yield f"data: {json.dumps(error_body(f'generation failed: {d}', 'server_error'))}\n\n"
                continue
            completion += len(d.token_ids)
            for delta in answers[index].push(d):
                yield chunk(index, delta)
            if d.finish_reason:
                yield chunk(index, {}, answers[index].finish_reason)
        if include_usage:
            yield chunk(0, None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                        "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:  # the client went away and closed this generator: its rows stop at the next step
            job.cancelled = True

