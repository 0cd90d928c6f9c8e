"""Continuous batching (model/scheduler.py): requests join and leave the running batch at every step, each with
its own settings, and get exactly what they get alone."""
import queue
import threading
import time

import pytest

from conftest import tiny_model
from model.generate import SamplingParams, generate_text, stream_text
from model.scheduler import QueueFull, Request, Scheduler
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return load_tokenizer(demo_data / "tokenizer")


@pytest.fixture(scope="module")
def model():
    return tiny_model(dim=64, n_layers=2, vocab_size=1000, max_seq_len=256)


class Client:
    """A request's events as a client sees them: text per choice, finish reasons, errors, the order of events."""

    def __init__(self, prompt, params, n=1, log=None, name=None):
        self.events, self.log, self.name = queue.Queue(), log, name
        self.request = Request(prompt, params, self._emit, n=n)
        self.texts, self.finish, self.errors = [""] * n, [None] * n, []
        self.done = threading.Event()

    def _emit(self, index, item):
        if index is None:
            if self.log is not None:
                self.log.append(self.name)
            self.done.set()
        elif isinstance(item, Exception):
            self.errors.append(item)
        else:
            self.texts[index] += item.text
            self.finish[index] = item.finish_reason or self.finish[index]

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "the request never finished"
        return self


def prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True)["input_ids"]


def test_staggered_requests_equal_the_same_requests_one_by_one(model, tokenizer):
    """Requests of different lengths and settings (greedy, seeded sampling, a stop string, a penalty) arrive while
    others are mid-answer, one with a prompt long enough to be prefilled in chunks; each gets its text alone."""
    scheduler = Scheduler(model, tokenizer, max_batch=4, prefill_chunk=16)
    asks = [("Tell me a long story about rivers", SamplingParams(max_new_tokens=40)),
            ("Hi", SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=5)),
            ("capital " * 12, SamplingParams(max_new_tokens=12)),  # over the chunk: prefilled in pieces
            ("What is two plus two?", SamplingParams(max_new_tokens=20, repetition_penalty=1.3)),
            ("Count", SamplingParams(max_new_tokens=15, temperature=0.8, seed=11)),
            ("Name a city", SamplingParams(max_new_tokens=25))]
    alone = [generate_text(model, tokenizer, [prompt(tokenizer, q)], p)[0]["text"] for q, p in asks]
    stop = alone[0][3:5]  # a stop string cuts the first answer early
    asks[0] = (asks[0][0], SamplingParams(max_new_tokens=40, stop=(stop,)))
    alone[0] = alone[0][:alone[0].index(stop)]
    clients = []
    for q, p in asks:
        clients.append(Client(prompt(tokenizer, q), p))
        scheduler.submit(clients[-1].request)
        time.sleep(0.01)  # arrivals spread over the first steps
    together = [c.wait().texts[0] for c in clients]
    scheduler.stop()
    assert together == alone
    assert clients[0].finish == ["stop"] and len(set(alone)) > 2


def test_a_short_request_sent_during_a_long_one_finishes_first(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=4)
    order = []
    long = Client(prompt(tokenizer, "go on"), SamplingParams(max_new_tokens=200, temperature=1.0, seed=1), log=order,
                  name="long")
    scheduler.submit(long.request)
    while long.request.generated < 5:
        time.sleep(0.001)
    short = Client(prompt(tokenizer, "hi"), SamplingParams(max_new_tokens=3, temperature=1.0, seed=2), log=order,
                   name="short")
    scheduler.submit(short.request)
    short.wait()
    assert order == ["short"] and long.request.generated < 200
    long.wait()
    scheduler.stop()
    assert order == ["short", "long"]


def test_a_cancelled_request_frees_its_row_for_the_next(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=1)
    first = Client(prompt(tokenizer, "go on"), SamplingParams(max_new_tokens=250, temperature=1.0, seed=1))
    scheduler.submit(first.request)
    while first.request.generated < 3:
        time.sleep(0.001)
    second = Client(prompt(tokenizer, "hi"), SamplingParams(max_new_tokens=4))
    scheduler.submit(second.request)
    time.sleep(0.05)
    assert not second.done.is_set()  # one row, taken
    first.request.cancelled = True  # the client went away
    second.wait(timeout=20)
    scheduler.stop()
    assert first.request.generated < 250 and scheduler.cancelled == 1 and second.finish[0] in ("stop", "length")


def test_n_choices_share_the_prefill_and_each_has_its_own_stream(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=4)
    ids = prompt(tokenizer, "Say something")
    three = Client(ids, SamplingParams(max_new_tokens=10, temperature=1.0, seed=3), n=3)
    scheduler.submit(three.request)
    three.wait()
    scheduler.stop()
    assert len(set(three.texts)) > 1 and all(f in ("stop", "length") for f in three.finish)
    # choice i samples with seed + i: the first choice is what the same request with n=1 gets
    assert three.texts[0] == generate_text(model, tokenizer, [ids], SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                                  seed=3))[0]["text"]


def test_the_queue_is_bounded(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=1, max_queue=2)
    busy = Client(prompt(tokenizer, "go on"), SamplingParams(max_new_tokens=250))
    scheduler.submit(busy.request)
    while busy.request.generated < 1:
        time.sleep(0.001)
    waiting = [Client(prompt(tokenizer, "hi"), SamplingParams(max_new_tokens=2)) for _ in range(2)]
    for c in waiting:
        scheduler.submit(c.request)
    with pytest.raises(QueueFull):
        scheduler.submit(Client(prompt(tokenizer, "hi"), SamplingParams(max_new_tokens=2)).request)
    busy.request.cancelled = True
    for c in waiting:
        c.wait()
    scheduler.stop()


def test_a_row_that_fails_ends_alone(model, tokenizer):
    """A failure in one row's text (here the tokenizer breaks on one request's tokens) ends that row with an error
    to its client; the rows beside it finish normally."""
    class Fragile:
        def __init__(self, inner):
            self.inner, self.eos_token_id = inner, inner.eos_token_id

        def decode(self, ids, **kw):
            if ids and ids[0] == poison:
                raise RuntimeError("cannot decode")
            return self.inner.decode(ids, **kw)

    ids = prompt(tokenizer, "Hello there")
    poison = next(stream_text(model, tokenizer, [ids], SamplingParams(max_new_tokens=4)))[0].token_ids[0]
    scheduler = Scheduler(model, Fragile(tokenizer), max_batch=4)
    bad = Client(ids, SamplingParams(max_new_tokens=4))
    good = [Client(prompt(tokenizer, q), SamplingParams(max_new_tokens=6, temperature=1.0, seed=i))
            for i, q in enumerate(["one", "two", "three"])]
    for c in [good[0], bad, *good[1:]]:
        scheduler.submit(c.request)
    bad.wait()
    for c in good:
        c.wait()
    scheduler.stop()
    assert bad.errors and "cannot decode" in str(bad.errors[0])
    assert all(not c.errors and c.finish[0] in ("stop", "length") for c in good)
    assert scheduler.thread is not None and scheduler.failed == 1


def test_a_burst_that_arrives_over_several_milliseconds_shares_one_prefill(model, tokenizer):
    """Requests of a burst reach the scheduler one by one (the HTTP thread parses them in turn); with gather_ms
    they wait for each other and go through one prefill, and each still gets its text alone."""
    questions = ["one", "two two", "three three three", "four"]
    params = SamplingParams(max_new_tokens=6)
    alone = [generate_text(model, tokenizer, [prompt(tokenizer, q)], params)[0]["text"] for q in questions]
    scheduler = Scheduler(model, tokenizer, max_batch=4, gather_ms=300)
    groups = []
    prefill = scheduler.engine.prefill
    scheduler.engine.prefill = lambda cache, first, prompts: groups.append(len(prompts)) or prefill(cache, first,
                                                                                                   prompts)
    clients = [Client(prompt(tokenizer, q), params) for q in questions]
    for c in clients:
        scheduler.submit(c.request)
        time.sleep(0.01)
    for c in clients:
        c.wait()
    scheduler.stop()
    assert groups == [4]
    assert [c.texts[0] for c in clients] == alone
