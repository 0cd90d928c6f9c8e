"""Tools, thinking and structured output through the server, driven by the official openai client, raw HTTP and
LangChain: a tiny model trained to make calls (conftest.tool_model), and a random one whose output only the
grammars keep in shape."""
import json
import subprocess
import sys
import time

import jsonschema
import pytest

from openai import OpenAI

from conftest import ADD_TOOL, GARBLED, ROOT, tiny_model
from test_server import client, free_port

ADD_SCHEMA = ADD_TOOL["function"]["parameters"]
ASK = [{"role": "user", "content": "add 2 and 3"}]
UNTOOLED = [{"role": "user", "content": "add 4 and 5"}]  # asked without tools, the model writes a call anyway


@pytest.fixture(scope="module")
def tool_server(tool_model, demo_data):
    """The tool model served over HTTP by uvicorn in a thread of this process (no second interpreter to start)."""
    import threading

    import uvicorn

    from model.loading import load_model
    from model.server import create_app
    from model.tokenizer import load_tokenizer

    port = free_port()
    app = create_app(load_model(tool_model), load_tokenizer(demo_data / "tokenizer"), context_length=512)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def random_server(demo_data):
    """A random-weight model served in-process: the clients talk to it through TestClient, an httpx client."""
    from fastapi.testclient import TestClient

    from model.server import create_app
    from model.tokenizer import load_tokenizer

    app = create_app(tiny_model(dim=64, n_layers=2, vocab_size=1000, max_seq_len=512),
                     load_tokenizer(demo_data / "tokenizer"))
    with TestClient(app, base_url="http://minimind") as http:
        yield http


def random_client(http):
    return OpenAI(base_url="http://minimind/v1", api_key="none", http_client=http, max_retries=0)


def streamed(chunks):
    """A stream's deltas put together: content, reasoning, calls (by index), finish reason."""
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            out["content"] += delta.content or ""
            out["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            for part in delta.tool_calls or []:
                call = out["calls"].setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def test_a_call_then_its_result_then_the_answer_through_the_openai_client(tool_server):
    c = client(tool_server)
    first = c.chat.completions.create(model="minimind", messages=ASK, tools=[ADD_TOOL], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "I add."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    followup = ASK + [choice.message.model_dump(exclude_none=True, exclude={"reasoning_content"}),  # content null
                      {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    answer = c.chat.completions.create(model="minimind", messages=followup, tools=[ADD_TOOL], temperature=0)
    assert answer.choices[0].message.content == "2 plus 3 is 5." and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None


def test_calls_and_thinking_stream_as_their_own_deltas(tool_server):
    c = client(tool_server)
    first = streamed(c.chat.completions.create(model="minimind", messages=ASK, tools=[ADD_TOOL], temperature=0,
                                               stream=True))
    assert first["reasoning"] == "I add." and first["content"] == "" and first["finish"] == "tool_calls"
    [call] = first["calls"].values()
    assert call["name"] == "add" and json.loads(call["arguments"]) == {"a": 2, "b": 3}
    assert call["id"].startswith("call_")
    followup = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "add", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
    answer = streamed(c.chat.completions.create(model="minimind", messages=followup, tools=[ADD_TOOL], temperature=0,
                                                stream=True))
    assert answer["content"] == "2 plus 3 is 5." and answer["calls"] == {} and answer["finish"] == "stop"


def test_tool_choice_none_never_returns_calls(tool_server):
    """Shown no tools, this model still writes a well-formed call (it learned to): it comes back as text."""
    c = client(tool_server)
    kw = dict(model="minimind", messages=UNTOOLED, tools=[ADD_TOOL], tool_choice="none", temperature=0)
    reply = c.chat.completions.create(**kw).choices[0]
    assert reply.message.tool_calls is None and reply.finish_reason == "stop"
    assert reply.message.content == '<tool_call>{"name":"add","arguments":{"a":4,"b":5}}</tool_call>'
    stream = streamed(c.chat.completions.create(**kw, stream=True))
    assert stream["calls"] == {} and stream["content"] == reply.message.content and stream["finish"] == "stop"


@pytest.mark.parametrize("question,said", GARBLED.items())
def test_a_garbled_call_comes_back_as_plain_content(tool_server, question, said):
    c = client(tool_server)
    kw = dict(model="minimind", messages=[{"role": "user", "content": question}], tools=[ADD_TOOL], temperature=0)
    reply = c.chat.completions.create(**kw).choices[0]
    assert reply.message.content == said and reply.message.tool_calls is None and reply.finish_reason == "stop"
    stream = streamed(c.chat.completions.create(**kw, stream=True))
    assert stream["content"] == said and stream["calls"] == {} and stream["finish"] == "stop"


def test_forced_calls_on_a_random_model_match_the_tool_schema(random_server):
    c = random_client(random_server)
    calc = {"type": "function", "function": {"name": "calc", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
    kw = dict(model="minimind", messages=ASK, tools=[ADD_TOOL, calc], temperature=1.0, max_tokens=60, seed=3)
    required = c.chat.completions.create(**kw, tool_choice="required", n=3)
    named = c.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "calc"}})
    stream = streamed(c.chat.completions.create(**kw, tool_choice="required", parallel_tool_calls=False, stream=True))
    schemas = {"add": ADD_SCHEMA, "calc": calc["function"]["parameters"]}
    for choice in [*required.choices, *named.choices]:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert {call.function.name for call in named.choices[0].message.tool_calls} == {"calc"}
    [call] = stream["calls"].values()  # parallel_tool_calls false: exactly one
    jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    assert stream["finish"] == "tool_calls"


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                           "coast": {"type": "boolean"}}, "required": ["city", "population", "coast"]}


def test_response_format_json_on_a_random_model_always_parses(random_server):
    c = random_client(random_server)
    kw = dict(model="minimind", messages=[{"role": "user", "content": "A city, as JSON"}], temperature=1.0)
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for max_tokens in (30, 60):
        for seed in range(3):
            whole = c.chat.completions.create(**kw, response_format=schema, max_tokens=max_tokens, seed=seed)
            jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
            assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens <= max_tokens
            anything = c.chat.completions.create(**kw, response_format={"type": "json_object"}, max_tokens=max_tokens,
                                                 seed=seed)
            assert isinstance(json.loads(anything.choices[0].message.content), dict)
    stream = streamed(c.chat.completions.create(**kw, response_format=schema, max_tokens=30, seed=1, stream=True))
    jsonschema.validate(json.loads(stream["content"]), SCHEMA)


BAD_TOOL_REQUESTS = [
    ("tools not a list", {"tools": {"name": "add"}}, "tools"),
    ("a tool without a name", {"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("an unknown tool_choice", {"tools": [ADD_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ("a named function not in tools", {"tools": [ADD_TOOL], "tool_choice": {"type": "function", "function":
                                                                           {"name": "sub"}}}, "tool_choice"),
    ("a response_format of another type", {"response_format": {"type": "yaml"}}, "response_format"),
    ("a schema the grammar cannot follow", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
    ("too few max_tokens for a forced call", {"tools": [ADD_TOOL], "tool_choice": "required", "max_tokens": 5},
     "max_tokens"),
    ("call arguments that are not JSON", {"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 2"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("a tool message without text", {"messages": ASK + [{"role": "tool", "tool_call_id": "c", "content": 5}]},
     "messages[1].content"),
    ("a lone surrogate in a tool", {"tools": [{"type": "function", "function": {"name": "add", "description":
                                                                                "\ud800"}}]}, "tools"),
]


@pytest.mark.parametrize("name,extra,param", BAD_TOOL_REQUESTS, ids=[b[0] for b in BAD_TOOL_REQUESTS])
def test_bad_tool_requests_get_a_400_that_names_the_field(random_server, name, extra, param):
    body = {"model": "minimind", "messages": ASK, "max_tokens": 8, **extra}
    r = random_server.post("/v1/chat/completions", content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_system_messages_anywhere_are_kept(random_server, demo_data):
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_data / "tokenizer")
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Again"}]
    reply = random_client(random_server).chat.completions.create(model="minimind", messages=messages, max_tokens=1)
    rendered = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(rendered)
    assert "<s>system\nAnswer in French.</s>" in tok.decode(rendered)


def test_langchain_bind_tools_round_trip(tool_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    assert convert_to_openai_tool(add) == ADD_TOOL  # what the model was trained on is what LangChain sends
    llm = ChatOpenAI(base_url=tool_server + "/v1", api_key="none", model="minimind", temperature=0, max_retries=0)
    bound = llm.bind_tools([add])
    question = HumanMessage("add 2 and 3")
    called = bound.invoke([question])
    [call] = called.tool_calls
    assert call["name"] == "add" and call["args"] == {"a": 2, "b": 3}
    result = ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"])
    assert bound.invoke([question, called, result]).content == "2 plus 3 is 5."
    streamed_call = None
    for chunk in bound.stream([question]):
        streamed_call = chunk if streamed_call is None else streamed_call + chunk
    assert streamed_call.tool_calls[0]["args"] == {"a": 2, "b": 3}


def test_langchain_structured_output_and_forced_tools_on_a_random_model(random_server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=40)
        population: int
        coastal: bool

    llm = ChatOpenAI(base_url="http://minimind/v1", api_key="none", model="minimind", temperature=1.0,
                     max_tokens=80, max_retries=0, http_client=random_server)
    for seed in range(3):
        city = llm.bind(seed=seed).with_structured_output(City, method="json_schema").invoke("A city, please")
        assert isinstance(city, City)  # LangChain parsed and validated it
        called = llm.bind(seed=seed).bind_tools([ADD_TOOL], tool_choice="add").invoke("add 2 and 3")
        [call] = called.tool_calls
        assert call["name"] == "add"
        jsonschema.validate(call["args"], ADD_SCHEMA)


def test_the_terminal_client_shows_and_runs_calls(tool_server):
    done = subprocess.run([sys.executable, "chat_openai_api.py", "--base_url", tool_server + "/v1", "--tools", "demo",
                           "--temperature", "0", "--prompt", "What is 123*45?"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:5] == ["👶: What is 123*45?", "💭: I calculate.",
                                            '🔧: calculator({"expression": "123*45"})', "   -> 5535",
                                            "🤖: 123*45 is 5535."], done.stdout
