"""The OpenAI-compatible server as a real process, driven by the official openai client and raw HTTP."""
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, tiny_model
from model.checkpoint import save_weights
from model.generate import SamplingParams
from model.loading import load_model
from model.server import create_app
from model.tokenizer import load_tokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(demo_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    model = tiny_model(dim=128, n_layers=4, vocab_size=1000, max_seq_len=256)
    save_weights(path, model.state_dict(), model.config)
    return path


def start_server(ckpt, tokenizer, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "my_openai_api.py", "--ckpt", str(ckpt), "--tokenizer", str(tokenizer),
                             "--device", "cpu", "--port", str(port), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)


@contextlib.contextmanager
def serving(ckpt, tokenizer, *extra):
    """A server process for the with-block: its URL."""
    proc, url = start_server(ckpt, tokenizer, *extra)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served_model, demo_data):
    with serving(served_model, demo_data / "tokenizer", "--context_length", "256") as url:
        yield url


def client(url, key="none"):
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["minimind"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_completion_through_the_openai_client(server):
    reply = client(server).chat.completions.create(
        model="minimind", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=12, temperature=0, seed=1)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_streaming_matches_the_whole_reply(server):
    c = client(server)
    kwargs = dict(model="minimind", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20,
                  temperature=0)
    whole = c.chat.completions.create(**kwargs)
    chunks = list(c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(server + "/v1/chat/completions", json={**kwargs, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.startswith("data: {")


def test_sampling_with_a_seed_is_repeatable_and_stop_strings_cut(server):
    c = client(server)
    kw = dict(model="minimind", messages=[{"role": "user", "content": "Say something"}], max_tokens=16,
              temperature=1.0, top_p=0.9)
    a = c.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = c.chat.completions.create(**kw, seed=7).choices[0].message.content
    assert a == b
    greedy = c.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    assert len(greedy) > 4
    stop = greedy[2:4]
    cut = c.chat.completions.create(**{**kw, "temperature": 0}, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[:greedy.index(stop)]


BAD_REQUESTS = [
    ("not json", b"{'messages': oops", None),
    ("empty messages", {"model": "m", "messages": []}, "messages"),
    ("messages not a list", {"model": "m", "messages": "hello"}, "messages"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ("oversized max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ("prompt too long", {"messages": [{"role": "user", "content": "capital " * 400}]}, "messages"),
    ("temperature out of range", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7},
     "temperature"),
    ("n beyond the rows", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ("n zero", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("seed beyond 64 bits", {"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, "seed"),
    ("lone surrogate", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ("lone surrogate in stop", {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]}, "stop[0]"),
    ("max_tokens wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ("body not an object", [{"role": "user", "content": "hi"}], None),
    ("stream not a boolean", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("max_tokens a numeric string", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "12"},
     "max_tokens"),
]


@pytest.mark.parametrize("name,body,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, name, body, param):
    # JSON's own \\u escapes (json.dumps' default) carry a lone surrogate, which UTF-8 cannot.
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
    if name == "prompt too long":
        assert error["code"] == "context_length_exceeded"
    if name == "body not an object":
        assert error["message"].startswith("the request body: ") and error["param"] is None


def test_the_servers_sampling_flags_fill_in_what_a_request_leaves_out(served_model, demo_data):
    """my_openai_api.py --temperature/--top_p/--top_k/--repetition_penalty/--max_new_tokens/--seed, in-process."""
    from fastapi.testclient import TestClient

    app = create_app(load_model(served_model), load_tokenizer(demo_data / "tokenizer"),
                     defaults=SamplingParams(max_new_tokens=3, temperature=0.0))
    ask = {"messages": [{"role": "user", "content": "Tell me a story"}]}
    with TestClient(app) as http:
        left_out = http.post("/v1/chat/completions", json=ask).json()
        given = http.post("/v1/chat/completions", json={**ask, "max_tokens": 3, "temperature": 0}).json()
        longer = http.post("/v1/chat/completions", json={**ask, "max_tokens": 6, "temperature": 0}).json()
    assert left_out["usage"]["completion_tokens"] == 3 and left_out["choices"][0]["finish_reason"] == "length"
    assert left_out["choices"] == given["choices"]
    assert longer["usage"]["completion_tokens"] == 6  # a request's own max_tokens wins


def test_unknown_path_is_a_404_with_an_error_body(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_16_concurrent_streams_equal_the_same_requests_one_by_one(server):
    c = client(server)
    questions = [f"Question number {i}: " + "what is the capital? " * (i % 5) for i in range(16)]

    def stream(q):
        chunks = c.chat.completions.create(model="minimind", messages=[{"role": "user", "content": q}],
                                           max_tokens=24, temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    alone = [stream(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, questions))
    assert together == alone
    assert len(set(alone)) > 1
    assert httpx.get(server + "/health").json()["worker_alive"]
    assert client(server).chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": "still there?"}], max_tokens=4).choices


def test_a_disconnected_client_stops_its_generation(server):
    body = {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 230, "temperature": 0,
            "stream": True}
    before = httpx.get(server + "/health").json()
    with httpx.stream("POST", server + "/v1/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    start = time.time()
    while httpx.get(server + "/health").json()["active_requests"] > 0:
        assert time.time() - start < 20, "the abandoned generation kept running"
        time.sleep(0.05)
    stats = httpx.get(server + "/health").json()
    assert stats["cancelled_requests"] == before["cancelled_requests"] + 1
    assert stats["tokens_of_cancelled_requests"] - before["tokens_of_cancelled_requests"] < 150


def test_api_key_is_enforced(served_model, demo_data):
    proc, url = start_server(served_model, demo_data / "tokenizer", "--api-key", "s3cret")
    try:
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert [m.id for m in client(url, "s3cret").models.list().data] == ["minimind"]
        assert httpx.get(url + "/health").status_code == 200  # health checks need no key
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "MINIMIND_API_KEY")}
        ask = [sys.executable, "chat_openai_api.py", "--base_url", url + "/v1", "--prompt", "Hi", "--max_tokens", "4"]
        refused = subprocess.run(ask, cwd=ROOT, capture_output=True, text=True, env=env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.strip() == f"{url}/v1 refused the API key: pass --api_key or set OPENAI_API_KEY"
        served = subprocess.run(ask, cwd=ROOT, capture_output=True, text=True, env={**env, "MINIMIND_API_KEY": "s3cret"})
        assert served.returncode == 0 and served.stdout.startswith("👶: Hi\n🤖: "), served.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_binds_loopback_by_default():
    from conftest import load_script

    args = load_script("my_openai_api.py").build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.api_key is None


def test_terminal_client_talks_to_the_server(server):
    done = subprocess.run([sys.executable, "chat_openai_api.py", "--base_url", server + "/v1", "--prompt", "Hello",
                           "--prompt", "And again", "--max_tokens", "6", "--temperature", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("👶: ") == 2 and done.stdout.count("🤖: ") == 2
    down = subprocess.run([sys.executable, "chat_openai_api.py", "--base_url", "http://127.0.0.1:9/v1", "--prompt",
                           "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode != 0 and "cannot reach" in down.stderr


def test_poisoned_requests_get_a_4xx_and_the_requests_beside_them_all_succeed(server):
    """Requests that once broke the batch they were in (a 2^64 seed overflowed the sampler's generator, a lone
    surrogate broke the tokenizer) are refused before they reach the scheduler; concurrent ones are unharmed."""
    good = {"messages": [{"role": "user", "content": "Tell me about rivers"}], "max_tokens": 16, "temperature": 0.9,
            "seed": 4}
    poisons = [{**good, "seed": 2 ** 64}, {**good, "messages": [{"role": "user", "content": "\ud800"}]}]
    def post(body):
        return httpx.post(server + "/v1/chat/completions", content=json.dumps(body).encode(), timeout=60,
                          headers={"content-type": "application/json"})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(post, good) for _ in range(10)]
        bads = [pool.submit(post, p) for p in poisons]
        answers = [f.result() for f in goods]
        refused = [f.result() for f in bads]
    assert all(r.status_code == 400 for r in refused), [r.text for r in refused]
    assert all(r.status_code == 200 for r in answers)
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1  # same seed, same text


def test_n_choices_streaming_and_not(server):
    c = client(server)
    kw = dict(model="minimind", messages=[{"role": "user", "content": "Say something"}], max_tokens=10,
              temperature=1.0, seed=9, n=3)
    whole = c.chat.completions.create(**kw)
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    assert all(ch.finish_reason in ("stop", "length") for ch in whole.choices)
    texts, finish = ["", "", ""], [None] * 3
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert texts == [ch.message.content for ch in whole.choices] and None not in finish
    assert len(set(texts)) > 1


def test_beyond_the_queue_bound_requests_get_a_429(served_model, demo_data):
    from fastapi.testclient import TestClient

    app = create_app(load_model(served_model), load_tokenizer(demo_data / "tokenizer"), max_batch=1, max_queue=1)
    long = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "temperature": 1.0}
    with TestClient(app) as http, concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: http.post("/v1/chat/completions", json=long), range(4)))
    codes = sorted(r.status_code for r in replies)
    assert 429 in codes and 200 in codes, codes
    busy = next(r for r in replies if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "--max_queue" in busy["message"]


def test_the_client_fits_the_context_by_default_and_keeps_chatting_after_an_error(served_model, demo_data):
    """A server with a short context (the demo model's is 128): the terminal client's default leaves max_tokens to
    the server, which fits it to the context; a request the server refuses is reported and the chat goes on."""
    proc, url = start_server(served_model, demo_data / "tokenizer", "--context_length", "64")
    try:
        chat = subprocess.run([sys.executable, "chat_openai_api.py", "--base_url", url + "/v1", "--temperature", "0"],
                              cwd=ROOT, input="capital " * 80 + "\nHello\n", capture_output=True, text=True,
                              timeout=120)
        assert chat.returncode == 0, chat.stderr[-2000:]
        refused, _, answered = chat.stdout.partition("🤖: ")
        assert "error: this model's maximum context length is 64 tokens" in refused
        assert answered.strip() and "error" not in answered  # the next question got its answer
        reply = client(url).chat.completions.create(model="minimind", messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.total_tokens <= 64 and reply.choices[0].message.content is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_port_in_use_is_one_line_and_nothing_says_serving(served_model, demo_data):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "my_openai_api.py", "--ckpt", str(served_model), "--tokenizer",
                               str(demo_data / "tokenizer"), "--device", "cpu", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "serving" not in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_the_chat_page_listens_on_this_machine_only():
    shown = subprocess.run([sys.executable, "-m", "streamlit", "config", "show"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert 'address = "127.0.0.1"' in shown.stdout
