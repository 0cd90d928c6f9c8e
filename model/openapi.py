"""The server's OpenAPI description (GET /openapi.json): the request and response bodies as OpenAI documents them,
so that a client generator or a fuzzer (schemathesis) sees what model/server.py really accepts and answers.

FastAPI would describe the request from its loose pydantic model (messages as an array of anything) and a 422 that
this server never sends; `document` replaces both. What a schema cannot say (the prompt fits the context, a named
tool is among `tools`, a JSON schema is one xgrammar can follow) stays a 400 with OpenAI's error body.
"""
INT64 = 2 ** 63  # OpenAI's integer fields are 64-bit signed
NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}  # OpenAI's rule for function names


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
             "required": ["type", "text"]}
CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}],
           "description": "text, or OpenAI's content parts (text parts only)"}
TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"},
        "arguments": {"type": "string", "description": "the arguments, a JSON object as text"}}}}}


def message(roles: list[str], required: list[str], content: dict = CONTENT, **fields) -> dict:
    return {"type": "object", "required": ["role", *required],
            "properties": {"role": {"enum": roles}, "content": content, "name": {"type": "string"}, **fields}}


MESSAGE = {"oneOf": [
    message(["system", "developer"], ["content"]),
    message(["user"], ["content"]),
    message(["assistant"], [], nullable(CONTENT), reasoning_content={"type": "string"},  # content: null with calls
            tool_calls={"type": "array", "minItems": 1, "items": TOOL_CALL}),
    message(["tool"], ["content", "tool_call_id"], tool_call_id={"type": "string"}),
]}
TOOL = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": NAME, "description": {"type": "string"},
        "parameters": {"type": "object", "description": "a JSON schema"}}}}}
TOOL_CHOICE = {"anyOf": [{"enum": ["auto", "none", "required"]}, {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
RESPONSE_FORMAT = {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "strict": {"type": "boolean"},
                                                          "schema": {"type": "object"}}}}}]}


def chat_request(max_batch: int, context: int) -> dict:
    tokens = nullable({"type": "integer", "minimum": 1, "maximum": context})
    return {"type": "object", "title": "ChatRequest", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE,
                     "contains": {"type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}},
                     "description": "at least one user message"},
        "stream": {"type": "boolean"},
        "stream_options": nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "stop": nullable({"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]}),
        "seed": nullable({"type": "integer", "minimum": -INT64, "maximum": INT64 - 1}),
        "n": {"type": "integer", "minimum": 1, "maximum": max_batch},
        "tools": nullable({"type": "array", "items": TOOL}),
        "tool_choice": nullable(TOOL_CHOICE),
        "parallel_tool_calls": nullable({"type": "boolean"}),
        "response_format": nullable(RESPONSE_FORMAT)}}


ERROR = {"type": "object", "title": "Error", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": nullable({"type": "string"}), "code": nullable({"type": "string"})}}}}
ANSWER = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"const": "assistant"}, "content": nullable({"type": "string"}),
    "reasoning_content": {"type": "string"}, "tool_calls": {"type": "array", "items": TOOL_CALL}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
FINISH = {"enum": ["stop", "length", "tool_calls"]}
DELTA = {"type": "object", "properties": {
    "role": {"const": "assistant"}, "content": {"type": "string"}, "reasoning_content": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"allOf": [TOOL_CALL, {"type": "object", "required": ["index"]}]}}}}


def completion(title: str, kind: str, field: str, schema: dict, finish: dict) -> dict:
    """A chat.completion (each choice a `message`) or a chat.completion.chunk (each a `delta`)."""
    return {"type": "object", "title": title, "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
                "model": {"type": "string"}, "usage": USAGE,
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", field, "finish_reason"],
                    "properties": {"index": {"type": "integer"}, field: schema, "finish_reason": finish}}}}}


COMPLETION = completion("ChatCompletion", "chat.completion", "message", ANSWER, FINISH)
CHUNK = completion("ChatCompletionChunk", "chat.completion.chunk", "delta", DELTA, nullable(FINISH))
# One server-sent event (OpenAPI 3.1 reads an event stream's schema as each event's): a chunk, an error (the
# status line is already sent when a row fails), then "[DONE]".
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json",
     "contentSchema": {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
                                 {"$ref": "#/components/schemas/Error"}]}}]}}}
MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}}}}}}


def error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def document(schema: dict, max_batch: int, context: int, api_key: bool) -> dict:
    """FastAPI's generated OpenAPI `schema`, with the bodies above in place of its guesses."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for generated in ("ChatRequest", "StreamOptions", "HTTPValidationError", "ValidationError"):
        components.pop(generated, None)
    components.update(ChatRequest=chat_request(max_batch, context), Error=ERROR, ChatCompletion=COMPLETION,
                      ChatCompletionChunk=CHUNK)
    paths = schema["paths"]
    chat = paths["/v1/chat/completions"]["post"]
    chat["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatRequest"}}}}
    chat["responses"] = {
        "200": {"description": "the completion; with stream: true, server-sent chat.completion.chunk events",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                            "text/event-stream": {"schema": EVENT}}},
        "400": error("a field the server cannot use: OpenAI's error body names it in `param`"),
        "429": error("more requests are waiting than --max_queue"),
        "500": error("generation failed"),
    }
    paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = MODELS
    if api_key:
        for path in ("/v1/chat/completions", "/v1/models"):
            for operation in paths[path].values():
                operation["responses"]["401"] = error("a missing or wrong API key")
    return schema
