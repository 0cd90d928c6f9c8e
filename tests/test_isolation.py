"""No request changes another's answer (model/scheduler.py): every row decoded beside others, constrained by a
grammar, stopping, failing, cancelled, joining or leaving mid-stream, gets token for token what it gets alone.

The engine runs with each form its tuning can pick for the products of a decode step (model/engine.py): one of
them ("weight_first") leaves the logits of a batch transposed in memory, which is what once let one row's grammar
mask spill into every other row."""
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ADD_TOOL, tiny_model
from model.engine import DecodeLinear, Engine
from model.generate import SamplingParams
from model.scheduler import Request, Scheduler
from model.tokenizer import load_tokenizer

QUESTIONS = ["What is the capital of Italy?", "Hello there", "one two three", "Tell me a story", "Why?"]
UNSATISFIABLE = {"allOf": [{"type": "string"}, {"type": "integer"}]}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return load_tokenizer(demo_data / "tokenizer")


@pytest.fixture(scope="module")
def grammars(tokenizer):
    from model.grammar import Grammars
    from model.tool_calls import normalize_tools

    g = Grammars(tokenizer, 1000)
    return {"json_object": g.json(), "json_schema": g.json(CITY), "unsatisfiable": g.json(UNSATISFIABLE),
            "tool_call": g.tool_calls(normalize_tools([ADD_TOOL]), parallel=False), "grammars": g}


@pytest.fixture(scope="module", params=["linear", "weight_first"])
def engine(request):
    model = tiny_model(dim=64, n_layers=2, vocab_size=1000, max_seq_len=256)
    engine = Engine(model, tune=True)
    for m in model.modules():  # the form for one row and for a few, fixed: not whichever timed fastest this run
        if isinstance(m, DecodeLinear):
            m.one = m.few = request.param
    return engine


def prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True)["input_ids"]


class Breaks:
    """A grammar row whose matcher raises at its `at`-th mask: that row fails, mid-stream."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def mask(self, logits):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("the grammar broke")
        self.inner.mask(logits)

    def choose(self, token, left):
        return self.inner.choose(token, left)

    def __getattr__(self, name):  # the rest of the matcher's interface, as it is
        return getattr(self.inner, name)


class Job:
    """One request as a client sees it: the tokens of each choice, finish reasons, errors."""

    def __init__(self, ids, params, grammar=None, n=1, arrive=0, cancel=None):
        self.arrive, self.cancel = arrive, cancel
        self.tokens, self.finish, self.errors, self.done = [[] for _ in range(n)], [None] * n, [], False
        self.request = Request(ids, params, self._emit, n=n, grammar=grammar)
        self.spec = (ids, params, grammar, n)

    def _emit(self, index, item):
        if index is None:
            self.done = True
        elif isinstance(item, Exception):
            self.errors.append(item)
        else:
            self.tokens[index] += item.token_ids
            self.finish[index] = item.finish_reason or self.finish[index]

    def alone(self) -> "Job":
        return Job(*self.spec[:2], grammar=self.spec[2], n=self.spec[3])


def drive(engine, tokenizer, jobs, max_batch=8, prefill_chunk=512):
    """Run the jobs through one scheduler, step by step: each arrives at its step, and is cancelled at its step."""
    scheduler = Scheduler(engine, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, in_thread=False)
    step = 0
    while not all(j.done for j in jobs):
        for j in jobs:
            if j.arrive == step:
                scheduler.submit(j.request)
            if j.cancel is not None and j.arrive + j.cancel == step:
                j.request.cancelled = True
        scheduler.step()
        step += 1
        assert step < 2000, "the scheduler never finished"
    assert not scheduler.rows and scheduler.cache is not None
    return jobs


def solo(engine, tokenizer, job):
    return drive(engine, tokenizer, [job.alone()])[0]


def matcher(grammars, kind):
    return lambda: grammars["grammars"].matcher(grammars[kind])


SERVER_DEFAULTS = dict(temperature=0.7, top_p=0.9)  # what my_openai_api.py samples a request that names nothing


@pytest.mark.parametrize("kind", ["json_object", "json_schema", "tool_call", "unsatisfiable"])
@pytest.mark.parametrize("sampling", ["greedy", "server defaults"])
def test_greedy_rows_beside_a_constrained_row_answer_as_alone(engine, tokenizer, grammars, kind, sampling):
    constrained = SamplingParams(max_new_tokens=40, seed=3, **(SERVER_DEFAULTS if sampling != "greedy" else {}))
    jobs = [Job(prompt(tokenizer, "Give me JSON"), constrained, matcher(grammars, kind))]
    jobs += [Job(prompt(tokenizer, q), SamplingParams(max_new_tokens=24)) for q in QUESTIONS]
    drive(engine, tokenizer, jobs)
    for job in jobs:  # the constrained row too: seeded, it samples what it samples alone
        assert not job.errors
        assert job.tokens == solo(engine, tokenizer, job).tokens


@pytest.mark.parametrize("event", ["stops", "fails", "is cancelled", "runs out of budget"])
def test_rows_beside_a_constrained_row_that_ends_early_answer_as_alone(engine, tokenizer, grammars, event):
    """The constrained row leaves mid-stream (a stop string, an error in its grammar, its client gone, a budget
    its grammar barely fits): the last row moves into its slot and every other row goes on as it would alone."""
    g = grammars["grammars"]
    params = SamplingParams(max_new_tokens=40, seed=1, **SERVER_DEFAULTS)
    if event == "stops":
        params = SamplingParams(max_new_tokens=40, stop=('"}',), **SERVER_DEFAULTS)  # at its last token
        grammar = matcher(grammars, "json_schema")
    elif event == "fails":
        grammar = lambda: Breaks(g.matcher(grammars["json_object"]), at=4)  # noqa: E731
    elif event == "runs out of budget":
        params = SamplingParams(max_new_tokens=g.closing_length(grammars["json_schema"], 100), **SERVER_DEFAULTS)
        grammar = matcher(grammars, "json_schema")
    else:
        grammar = matcher(grammars, "tool_call")
    odd = Job(prompt(tokenizer, "Give me JSON"), params, grammar, cancel=5 if event == "is cancelled" else None)
    jobs = [Job(prompt(tokenizer, q), SamplingParams(max_new_tokens=24)) for q in QUESTIONS[:2]]
    jobs += [odd] + [Job(prompt(tokenizer, q), SamplingParams(max_new_tokens=20 + i, temperature=1.0, seed=i))
                     for i, q in enumerate(QUESTIONS[2:])]
    drive(engine, tokenizer, jobs)
    assert bool(odd.errors) == (event == "fails")
    assert odd.finish[0] == {"stops": "stop", "fails": None, "is cancelled": None,
                             "runs out of budget": "stop"}[event]
    for job in jobs:
        if job is not odd:
            assert not job.errors and job.tokens == solo(engine, tokenizer, job).tokens


def test_rows_joining_and_leaving_mid_stream_answer_as_alone(engine, tokenizer, grammars):
    """Greedy, seeded and constrained rows arrive at different steps, with different budgets, two choices, a long
    prompt prefilled in chunks, and leave as they finish: each gets its tokens alone."""
    kinds = ["json_object", "tool_call", None, "json_schema", None, None]
    jobs = []
    for i, kind in enumerate(kinds):
        text = QUESTIONS[i % len(QUESTIONS)] + (" and tell me more" * 30 if i == 4 else "")
        params = SamplingParams(max_new_tokens=8 + 7 * i, seed=i, **(SERVER_DEFAULTS if i % 2 else {}))
        jobs.append(Job(prompt(tokenizer, text), params, kind and matcher(grammars, kind), n=2 if i == 2 else 1,
                        arrive=3 * i))
    drive(engine, tokenizer, jobs, max_batch=6, prefill_chunk=64)
    for job in jobs:
        assert not job.errors and job.tokens == solo(engine, tokenizer, job).tokens


@st.composite
def workloads(draw):
    """Requests with random arrival steps, prompts, budgets, sampling settings, grammars and cancellations."""
    jobs = []
    for _ in range(draw(st.integers(1, 7))):
        greedy = draw(st.booleans())
        sampling = {} if greedy else dict(temperature=draw(st.sampled_from([0.5, 1.0, 1.5])),
                                          top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
                                          top_k=draw(st.sampled_from([0, 5])))
        jobs.append(dict(question=draw(st.sampled_from(QUESTIONS)), repeat=draw(st.integers(0, 12)),
                         max_new_tokens=draw(st.integers(1, 30)), seed=draw(st.integers(0, 2 ** 32)),
                         penalty=draw(st.sampled_from([1.0, 1.0, 1.3])), sampling=sampling,
                         grammar=draw(st.sampled_from([None, None, "json_object", "json_schema", "tool_call"])),
                         arrive=draw(st.integers(0, 12)), cancel=draw(st.one_of(st.none(), st.integers(0, 10))),
                         n=draw(st.sampled_from([1, 1, 1, 2]))))
    return jobs


CI_FOUND = [  # found by this test on a clean clone: the first row's third token sits on a rounding boundary
    *[dict(question="What is the capital of Italy?", repeat=0, max_new_tokens=m, seed=0, penalty=1.0, sampling=s,
           grammar=None, arrive=0, cancel=None, n=1)
      for m, s in ((8, {"temperature": 0.5, "top_p": 1.0, "top_k": 0}), (1, {"temperature": 0.5, "top_p": 1.0,
                                                                            "top_k": 0}), (6, {}), (1, {}),
                   (1, {"temperature": 0.5, "top_p": 1.0, "top_k": 0}))],
    dict(question="Tell me a story", repeat=0, max_new_tokens=3, seed=3_698_627_840, penalty=1.3,
         sampling={"temperature": 1.5, "top_p": 1.0, "top_k": 0}, grammar=None, arrive=0, cancel=7, n=1)]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(workload=CI_FOUND)
@given(workload=workloads())
def test_property_every_row_equals_its_solo_run(engine, tokenizer, grammars, workload):
    """Whatever arrives, leaves or is cancelled around it, a greedy row equals its solo run and a seeded sampled row
    its solo run with the same seed; a cancelled row's tokens are a prefix of its solo run's."""
    g = grammars["grammars"]
    jobs = []
    for w in workload:
        budget = w["max_new_tokens"]
        if w["grammar"]:  # a budget the grammar can complete in, as the server checks before admitting it
            budget = max(budget, g.closing_length(grammars[w["grammar"]], 200))
        params = SamplingParams(max_new_tokens=budget, seed=w["seed"], repetition_penalty=w["penalty"],
                                **w["sampling"])
        ids = prompt(tokenizer, w["question"] + " again" * w["repeat"])
        jobs.append(Job(ids, params, w["grammar"] and matcher(grammars, w["grammar"]), n=w["n"],
                        arrive=w["arrive"], cancel=w["cancel"]))
    drive(engine, tokenizer, jobs, max_batch=6, prefill_chunk=32)
    for job in jobs:
        assert not job.errors
        alone = solo(engine, tokenizer, job)
        for got, want in zip(job.tokens, alone.tokens):
            if job.cancel is not None:  # it stopped early: its tokens so far
                want = want[:len(got)]
            assert same_but_for_rounding(engine.model, tokenizer, job.spec[0], job.spec[1], got, want), (got, want)


def same_but_for_rounding(model, tokenizer, ids, params, got, want) -> bool:
    """got == want, or the two part at one token where float rounding decides, and only there. A batch's products
    sum in another order than one row's (BLAS blocks by the row count), moving logits by ~1e-6: where the solo
    run's two best logits are that close (greedy), or its uniform draw falls that close to a boundary of the
    cumulative distribution (sampled, which then picks the next token id over), the token may differ, and all
    after it. An answer mixed with another row's differs by far more than that, anywhere."""
    import torch

    from model.generate import apply_repetition_penalty

    if got == want:
        return True
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    eos = tokenizer.eos_token_id
    a, b = (seq[k] if k < len(seq) else eos for seq in (got, want))  # a row that is shorter ended there, at EOS
    if params.temperature > 0:
        return abs(a - b) == 1
    context = list(ids) + want[:k]
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[:, -1].float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, torch.tensor([context]), torch.tensor([[params.repetition_penalty]]))
    top = logits[0].topk(2)
    return set(top.indices.tolist()) == {a, b} and float(top.values[0] - top.values[1]) < 1e-4


def test_a_grammar_row_masks_its_logits_on_their_own_device(grammars, monkeypatch):
    """xgrammar fills a row's bitmask on the CPU; it is applied on the logits' device (a GPU's, here stood in for
    by the meta device, with xgrammar's kernel recording what it was given)."""
    import torch

    g = grammars["grammars"]
    seen = []
    monkeypatch.setattr(g.xgr, "apply_token_bitmask_inplace",
                        lambda logits, bitmask, **kw: seen.append((logits.device.type, bitmask.device.type)))
    g.matcher(grammars["json_object"]).mask(torch.zeros(1000, device="meta"))
    assert seen == [("meta", "meta")]
    with pytest.raises(ValueError, match="one contiguous row"):
        g.matcher(grammars["json_object"]).mask(torch.zeros(4, 1000).T[0])
