"""Continuous batching: one worker thread schedules every request, step by step, over the engine's cache rows.

Each row of the engine's KV cache (model/engine.py) holds one sequence: one choice of one request. Every
iteration of the worker
1. drops the rows and waiting requests of clients that went away;
2. admits waiting requests while rows are free: short prompts are prefilled together in one forward pass, a long
   prompt (over `prefill_chunk` tokens) a chunk per iteration, so that it never stalls the rows already decoding;
   a request's n choices share its prompt's prefill (the row is copied);
3. runs one decode step for every decoding row and samples each row's next token. Everything a row owns (its
   sampling settings, random stream, grammar, stop strings, history and cache row) is one `Row` object; its
   logits are the batch's row at its slot and nothing else. A row with a grammar (a request's response_format or
   forced tool call, model/grammar.py) masks its own logits with its own bitmask, on a contiguous copy; rows
   without one are never touched;
4. lets finished rows (EOS, a stop string, max_tokens, an error) leave at once: the last row moves into the freed
   one, so the decoding rows stay rows [0, D) of the cache, which is what one engine step decodes.
A new request thus waits at most one step to start, and a short answer is never held up by a long one. Nothing
is shared between requests but the batched forward pass; a failure in one row's sampling or text ends that row
alone, with an error event to its client.
"""
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import KVCache, as_engine
from .generate import SamplingParams, Sampler, TextDelta, TextStream, row_generator


class QueueFull(Exception):
    """More requests are waiting than the scheduler's `max_queue`."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable  # emit(choice index, TextDelta | Exception), then emit(None, None) once every choice has ended
    n: int = 1
    grammar: Callable | None = None  # grammar() -> a new model/grammar.py Matcher, one per choice
    cancelled: bool = False
    open_choices: int = 0
    generated: int = 0  # tokens generated so far, all choices
    arrived: float = 0.0  # when it was submitted (time.perf_counter)


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One sequence being decoded, and everything that is its own: the scheduler reads a row's settings, random
    stream, grammar, stop strings and history from this object only, and its logits at `slot`, its row of the KV
    cache (the scheduler keeps `rows[slot] is row`)."""
    request: Request
    index: int  # which of the request's n choices
    slot: int
    stream: TextStream  # its text so far and its stop strings
    generator: torch.Generator
    grammar: object = None  # its own model/grammar.py Matcher, if its request is constrained
    history: list = field(default_factory=list)  # prompt and generated ids, for the repetition penalty
    count: int = 0
    token: int = 0  # the last sampled token, fed at the next step

    @property
    def params(self) -> SamplingParams:
        return self.request.params


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 512,
                 capacity: int | None = None, in_thread: bool = True, gather_ms: float = 0.0):
        """The worker loop runs in a thread of its own, or (in_thread=False) in whichever thread calls `run()`:
        torch's CPU kernels run about twice as fast in the process's main thread as in a second one here (its
        OpenMP team stays warm), so the server runs the loop there and HTTP in a thread.

        `gather_ms`: requests that arrive together (a burst) reach the scheduler over several milliseconds, as the
        HTTP thread parses them one by one; short prompts wait until none has arrived for that long (at most ten
        times as long), so that the burst shares one prefill instead of a prefill per early arrival (vLLM's
        scheduler delays prompts for the same reason)."""
        self.engine, self.tokenizer = as_engine(model), tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cache: KVCache = self.engine.new_cache(max_batch, capacity or self.engine.config.max_seq_len)
        self.eos = tokenizer.eos_token_id
        self.rows: list[Row] = []  # decoding rows: rows[i].slot == i, row i of the cache
        self.waiting: deque[Request] = deque()
        self.gather = gather_ms / 1000
        self.last_arrival = 0.0
        self.long: tuple[Request, int] | None = None  # a long prompt being prefilled, and how much of it is in
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.sampler = None  # rebuilt when the decoding rows change
        self.served = self.cancelled = self.cancelled_tokens = self.failed = 0
        self.alive, self.running = True, False
        self.thread = threading.Thread(target=self.run, daemon=True, name="minimind-scheduler") if in_thread else None
        if self.thread:
            self.thread.start()

    # ----------------------------------------------------------------------------------------- from other threads
    def submit(self, request: Request) -> Request:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max_queue {self.max_queue})")
            self.waiting.append(request)
            request.arrived = self.last_arrival = time.perf_counter()
        self.wake.set()
        return request

    def stop(self):
        self.alive = False
        self.wake.set()
        if self.thread:
            self.thread.join(timeout=10)

    @property
    def queued(self) -> int:
        return len(self.waiting) + (self.long is not None)

    # -------------------------------------------------------------------------------------------- the worker
    def run(self):
        """The worker loop, until stop()."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def _loop(self):
        while self.alive:
            if not self.step():
                self.wake.wait(timeout=0.5)
                self.wake.clear()

    def step(self) -> bool:
        """One iteration: drop what was cancelled, admit what fits, decode one token for every row. False when there
        was nothing to do. (The worker calls it in a loop; tests call it to control what arrives at which step.)"""
        self._drop_cancelled()
        if not (self.rows or self.waiting or self.long):
            return False
        try:
            self._admit()
            if self.rows:
                self._step()
        except Exception as e:  # the batched forward itself failed: every row in it ends, the worker goes on
            for row in list(self.rows):
                self._end(row, error=e)
            if self.long:
                self._fail(self.long[0], e)
                self.long = None
        return True

    def _free_rows(self) -> int:
        return self.max_batch - len(self.rows) - (1 if self.long else 0)

    def _admit(self):
        """Prefill what fits this iteration: the next chunk of a long prompt, or a group of short prompts."""
        if self.long is None:
            self._take_long()
        if self.long:
            request, done = self.long
            tail = self.max_batch - 1  # a long prompt fills the last row, then its choices are copied down
            if done == 0:
                self.cache.set_row(tail, 0, 0)
            chunk = request.prompt[done:done + self.prefill_chunk]
            try:
                logits = self.engine.append(self.cache, tail, chunk)
            except Exception as e:
                self.long = None
                return self._fail(request, e)
            if done + len(chunk) < len(request.prompt):
                self.long = (request, done + len(chunk))
            else:
                self.long = None
                self._start([(request, tail, logits[0])])
            return
        if self._gathering():
            return
        group = self._take_group()
        if not group:
            return
        try:
            logits = self.engine.prefill(self.cache, len(self.rows), [r.prompt for r in group])
        except Exception:  # a group shares one forward pass: prefill each alone, so only a bad one fails
            for request in group:
                try:
                    self._start([(request, len(self.rows), self.engine.prefill(self.cache, len(self.rows),
                                                                               [request.prompt])[0])])
                except Exception as e:
                    self._fail(request, e)
            return
        self._start([(r, len(self.rows) + i, row_logits) for i, (r, row_logits) in enumerate(zip(group, logits))])

    def _gathering(self) -> bool:
        """Whether to leave the waiting requests a moment longer, for more of a burst to join them. With no row
        decoding the worker sleeps until the next arrival or the end of the quiet time; else the rows step."""
        if not self.gather or not self.waiting:
            return False
        now = time.perf_counter()
        quiet = self.last_arrival + self.gather - now
        if quiet <= 0 or now - self.waiting[0].arrived >= 10 * self.gather:
            return False
        if not self.rows:
            self.wake.clear()
            self.wake.wait(timeout=quiet)
        return True

    def _take_long(self):
        with self.lock:
            if self.waiting and len(self.waiting[0].prompt) > self.prefill_chunk \
                    and self._free_rows() >= self.waiting[0].n + 1:  # its own row at the end, then n rows
                self.long = (self.waiting.popleft(), 0)

    def _take_group(self) -> list[Request]:
        """Waiting short prompts, in order, while rows are free and their tokens fit one prefill chunk."""
        group, budget, free = [], self.prefill_chunk, self._free_rows()
        with self.lock:
            while self.waiting and len(self.waiting[0].prompt) <= min(budget, self.prefill_chunk) \
                    and self.waiting[0].n <= free:
                request = self.waiting.popleft()
                group.append(request)
                budget, free = budget - len(request.prompt), free - request.n
        return group

    def _start(self, prefilled: list[tuple[Request, int, torch.Tensor]]):
        """Prompts are in the cache (request, its cache row, its next-token logits): every choice becomes a decoding
        row, and all of them sample their first token together.

        All rows are placed before any first token is sampled: a row that ends at once moves another into its
        place, which must not be a prompt still to be copied."""
        started, first = [], []
        for request, slot, row_logits in prefilled:  # the first choice where the prefill left it, when that is next
            if request.cancelled:
                self._drop(request)
                continue
            if slot != len(self.rows):
                self.cache.copy_row(slot, len(self.rows))
            started.append(self._new_row(request, 0))
            first.append(row_logits)
        for request, slot, row_logits in prefilled:
            if not request.cancelled:
                for index in range(1, request.n):  # n > 1: the other choices share the prompt's prefill
                    self.cache.copy_row(slot, len(self.rows))
                    started.append(self._new_row(request, index))
                    first.append(row_logits)
        if not started:
            return
        # (len(started), vocab), row k is started[k]'s: indexed by position here, as no slot has moved yet
        logits = torch.stack(first)
        offset = started[0].slot
        try:
            sampler = Sampler([r.params for r in started], self.engine.device, [r.generator for r in started])
            tokens = self._sample(sampler, logits, started, offset)
        except Exception as e:  # these rows alone end; the rows already decoding go on
            tokens = [e] * len(started)
        for row, token in zip(started, tokens):
            self._accept(row, token)

    def _new_row(self, request: Request, index: int) -> Row:
        request.open_choices += 1
        seed = request.params.seed
        row = Row(request, index, len(self.rows), TextStream(self.tokenizer, request.params.stop),
                  row_generator(None if seed is None else seed + index, self.engine.device),
                  grammar=request.grammar() if request.grammar else None,
                  history=list(request.prompt) if request.params.repetition_penalty != 1.0 else [])
        self.rows.append(row)
        self.sampler = None
        return row

    def _history(self, rows: list[Row]) -> torch.Tensor:
        """(rows, L) ids each row has seen, for the repetition penalty; shorter rows padded with their last id."""
        if not any(r.history for r in rows):
            return torch.zeros(len(rows), 1, dtype=torch.long, device=self.engine.device)
        width = max(len(r.history) for r in rows)
        padded = [r.history + [r.history[-1]] * (width - len(r.history)) if r.history else [0] * width for r in rows]
        return torch.tensor(padded, device=self.engine.device)

    def _step(self):
        tokens = torch.tensor([r.token for r in self.rows], device=self.engine.device)
        logits = self.engine.decode(self.cache, tokens)  # (len(rows), vocab): logits[r.slot] is row r's
        if self.sampler is None:
            self.sampler = Sampler([r.params for r in self.rows], self.engine.device,
                                   [r.generator for r in self.rows])
        for row, token in zip(list(self.rows), self._sample(self.sampler, logits, self.rows)):
            self._accept(row, token)

    def _sample(self, sampler: Sampler, logits: torch.Tensor, rows: list[Row], offset: int = 0) -> list:
        """The next token of each row (logits[row.slot - offset] is row's), or the error its grammar raised.

        A grammar row's logits are masked on a contiguous fp32 copy of the batch's, one row at a time with the
        row's own bitmask; the other rows' logits are the engine's, untouched."""
        errors = {}
        if any(r.grammar is not None for r in rows):
            with torch.inference_mode():  # the engine's logits are inference tensors; n choices share a prefill's
                logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                for row in rows:
                    if row.grammar is not None:
                        try:
                            row.grammar.mask(logits[row.slot - offset])
                        except Exception as e:
                            errors[row.slot] = e
        tokens = sampler(logits, self._history(rows)).tolist()
        return [errors.get(row.slot, token) for row, token in zip(rows, tokens)]

    def _accept(self, row: Row, token):
        """One new token of a row (or the error that ended it): its text to the client; the row ends on EOS, a stop
        string or max_tokens. A grammar row's token may be replaced by one that still lets its grammar complete
        within max_tokens."""
        request = row.request
        try:
            if isinstance(token, Exception):
                raise token
            if row.grammar is not None:
                token = row.grammar.choose(token, row.params.max_new_tokens - row.count)
            if token == self.eos:
                return self._end(row, TextDelta(row.index, row.stream.finish(), "stop"))
            row.count += 1
            request.generated += 1
            text = row.stream.push(token)
            if row.stream.stopped:
                return self._end(row, TextDelta(row.index, text, "stop", [token]))
            if row.count >= row.params.max_new_tokens:  # a grammar steered to its end in time is complete
                reason = "stop" if row.grammar is not None and row.grammar.complete else "length"
                return self._end(row, TextDelta(row.index, text + row.stream.finish(), reason, [token]))
            request.emit(row.index, TextDelta(row.index, text, None, [token]))
            row.token = token
            if row.history:
                row.history.append(token)
        except Exception as e:
            self._end(row, error=e)

    def _end(self, row: Row, delta: TextDelta | None = None, error: Exception | None = None):
        """The row leaves: its last delta (or error) goes out and the last decoding row moves into its slot."""
        request = row.request
        if row.slot is not None:
            last = self.rows.pop()
            if last is not row:
                self.cache.copy_row(last.slot, row.slot)
                self.rows[row.slot], last.slot = last, row.slot
            row.slot = None
            self.sampler = None
        if error is not None:
            self.failed += 1
            request.emit(row.index, error)
        elif delta is not None:
            request.emit(row.index, delta)
        request.open_choices -= 1
        if request.open_choices == 0:
            self.served += 1
            request.emit(None, None)

    def _fail(self, request: Request, error: Exception):
        """A request that failed before it had a row: its client gets the error."""
        self.failed += 1
        request.emit(0, error)
        request.emit(None, None)

    def _drop_cancelled(self):
        for row in [r for r in self.rows if r.request.cancelled]:
            request = row.request
            if request.open_choices == request.n:  # count each request once
                self.cancelled += 1
                self.cancelled_tokens += request.generated
            self._end(row)
        if self.long and self.long[0].cancelled:
            self._drop(self.long[0])
            self.long = None
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._drop(r)

    def _drop(self, request: Request):
        """A request cancelled before it had a row: it ends, with nothing to say."""
        self.cancelled += 1
        request.emit(None, None)

