"""The server's OpenAPI description (model/openapi.py) says what the server really accepts and answers: requests it
documents as valid reach the model, ones it documents as invalid get a 400 with OpenAI's error body, responses
match their schemas; and schemathesis, fuzzing from that description, finds nothing (when it is installed:
requirements-eval.txt)."""
import importlib.util
import json
import subprocess
import sys

import httpx
import jsonschema
import pytest

from conftest import ADD_TOOL
from test_server import BAD_REQUESTS, served_model, serving  # noqa: F401 (served_model: a fixture)


@pytest.fixture(scope="module")
def api(served_model, demo_data):
    with serving(served_model, demo_data / "tokenizer", "--context_length", "256", "--max_batch", "8") as url:
        schema = httpx.get(url + "/openapi.json").json()
        yield url, schema


def validator(schema, name):
    """A validator for one component, resolving its references within the document."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:api", Resource.from_contents(schema, DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": f"urn:api#/components/schemas/{name}"}, registry=registry)


ASK = [{"role": "user", "content": "add 2 and 3"}]
CALLED = ASK + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
GOOD = [
    {"messages": ASK, "max_tokens": 4},
    {"model": "minimind", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                       *ASK], "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "seed": -3,
     "stop": ["\n"], "n": 2, "stream": False},
    {"messages": CALLED, "tools": [ADD_TOOL], "tool_choice": "auto", "max_tokens": 4},
    {"messages": ASK, "tools": [ADD_TOOL], "tool_choice": {"type": "function", "function": {"name": "add"}},
     "parallel_tool_calls": False, "max_tokens": 40},
    {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "sum", "schema": {"type": "object", "properties": {"sum": {"type": "integer"}}}}}, "max_tokens": 20},
    {"messages": ASK, "response_format": {"type": "json_object"}, "max_tokens": 12.0, "stream": True,
     "stream_options": {"include_usage": True}},
]
# Shapes the schema itself refuses: these must get the 400 without the model, and the schema must say so.
SHAPELESS = [b for b in BAD_REQUESTS if b[0] not in ("not json", "prompt too long",
                                                     "lone surrogate", "lone surrogate in stop")] + [
    ("no user message", {"messages": [{"role": "system", "content": "hi"}]}, "messages"),
    ("a tool message answering no call", {"messages": ASK + [{"role": "tool", "content": "5"}]},
     "messages[1].tool_call_id"),
    ("a role that is no string", {"messages": [{"role": {}, "content": "hi"}]}, "messages[0].role"),
    ("five stop strings", {"messages": ASK, "stop": list("abcde")}, "stop"),
    ("usage asked as a string", {"messages": ASK, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("a message name that is no string", {"messages": [{"role": "user", "content": "hi", "name": 5}]},
     "messages[0].name"),
]


def test_documented_requests_are_accepted_and_their_answers_match_the_schema(api):
    url, schema = api
    request, completion = validator(schema, "ChatRequest"), validator(schema, "ChatCompletion")
    chunk = validator(schema, "ChatCompletionChunk")
    for body in GOOD:
        request.validate(body)
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, (body, r.text)
        if body.get("stream"):
            events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                chunk.validate(json.loads(event))
        else:
            completion.validate(r.json())


@pytest.mark.parametrize("name,body,param", SHAPELESS, ids=[b[0] for b in SHAPELESS])
def test_what_the_schema_refuses_gets_a_400_naming_the_field(api, name, body, param):
    url, schema = api
    assert not validator(schema, "ChatRequest").is_valid(body)
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    validator(schema, "Error").validate(r.json())
    if param:
        assert r.json()["error"]["param"] == param


def test_the_schema_documents_400_not_422_and_a_wrong_method_says_what_is_allowed(api):
    url, schema = api
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and responses["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert schema["components"]["schemas"]["ChatRequest"]["properties"]["n"]["maximum"] == 8
    r = httpx.request("TRACE", url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["message"]


@pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None,
                    reason="schemathesis is not installed (pip install -r requirements-eval.txt)")
def test_schemathesis_finds_nothing_and_its_requests_reach_the_model(api, tmp_path):
    """Its positive and negative phases, every check. A schema-valid request may still be refused where no schema
    can say why (a tool_choice naming a function not in tools, arguments that are not JSON, a prompt longer than
    the context): OpenAI answers those 400 too, so 400 counts as an answer to valid data here; the served count
    shows how many generated requests the model answered."""
    url, _ = api
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.positive_data_acceptance]\nexpected-statuses = ["2xx", "400", "429"]\n')
    served = httpx.get(url + "/health").json()["served_requests"]
    run = subprocess.run([sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; "
                          "sys.exit(schemathesis())", "--config-file", str(config), "run", url + "/openapi.json",
                          "--checks", "all", "--max-examples", "40", "--seed", "1", "--generation-codec", "utf-8",
                          "--request-timeout", "60"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert httpx.get(url + "/health").json()["served_requests"] - served >= 20
