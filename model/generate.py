"""Our generator: batched, streaming sampling on the inference engine (model/engine.py).

Every call allocates its own KV cache, so two requests served at once can never see each other's keys.
Prompts of different lengths are left-padded; the attention mask hides the padding and positions count
real tokens only, so each row gets the logits it would get alone.

Layers:
- `generate_ids`: token level. Yields the next token of every row at each step.
- `TextStream` / `stream_text` / `generate_text`: text level. Decodes incrementally, applies stop strings,
  holds back partial UTF-8 and partial stop strings so streamed text never has to be taken back.
"""
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .engine import as_engine, left_pad
from .errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # new tokens only, the prompt is not counted
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 makes already-seen tokens less likely
    stop: Sequence[str] = ()
    seed: int | None = None  # any integer; torch's generators take it modulo 2^64

    def __post_init__(self):
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                               ("temperature", self.temperature >= 0, "0 (greedy) or more"),
                               ("top_k", self.top_k >= 0, "0 (off) or more"),
                               ("top_p", 0 <= self.top_p <= 1, "between 0 and 1"),
                               ("repetition_penalty", self.repetition_penalty > 0, "above 0 (1: off)")):
            if not ok:
                raise InputError(f"{name} must be {rule}, got {getattr(self, name)}")


def apply_repetition_penalty(logits, history, penalty):
    """Make every token in `history` (B, L) less likely: positive logits divided, negative multiplied.

    Dividing a negative logit would make it *more* likely, the bug the sign test avoids. `penalty` is (B, 1).
    """
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def filter_top_k_top_p(logits, top_k: torch.Tensor, top_p: torch.Tensor):
    """Mask to -inf all but the top_k (0: keep all) and the smallest set whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_logits.softmax(dim=-1)
    drop |= (top_p[:, None] < 1) & ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])  # keep while mass before < top_p
    drop &= rank > 0  # the most likely token always stays (top_p=0 means greedy, not nothing)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def row_generator(seed: int | None, device) -> torch.Generator:
    """A row's own random stream: a seeded request samples the same tokens whatever else is in the batch."""
    g = torch.Generator(device=device)
    g.manual_seed(seed % 2**64 if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


class Sampler:
    """Per-row sampling settings, so one batch can serve requests that asked for different things."""

    def __init__(self, params: Sequence[SamplingParams], device, generators: Sequence[torch.Generator] | None = None):
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.all_greedy = all(p.temperature <= 0 for p in params)
        self.temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)[:, None]
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.filtering = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        # A greedy row has no generator: greedy decoding never touches the global RNG, so a greedy validation pass
        # cannot change what a training run samples next.
        self.generators = list(generators) if generators is not None else [
            row_generator(p.seed, device) if p.temperature > 0 else None for p in params]
        # One stream for every row (a batch that is one job, like a GRPO rollout): one draw a step, not one per row
        streams = {id(g): g for g in self.generators if g is not None}
        self.shared = next(iter(streams.values())) if len(streams) == 1 and len(self.generators) > 1 else None

    def __call__(self, logits, history):
        logits = logits.float()
        if self.use_penalty:
            logits = apply_repetition_penalty(logits, history, self.penalty)
        best = logits.argmax(dim=-1)
        if self.all_greedy:
            return best
        logits = logits / self.temperature
        if self.filtering:
            logits = filter_top_k_top_p(logits, self.top_k, self.top_p)
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        if self.shared is not None:  # a greedy row's draw goes unused
            u = torch.rand(len(self.generators), generator=self.shared, device=cdf.device)
        else:
            u = torch.stack([torch.rand((), generator=g, device=cdf.device) if g is not None
                             else torch.zeros((), device=cdf.device) for g in self.generators])
        sampled = (cdf < u[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
        return torch.where(self.greedy, best, sampled)


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 eos_token_id: int | None = None, finished: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step, for up to max_new_tokens steps.

    `generator`: one random stream for every sampled row, drawn once a step (a batch that is one job); without it
    each row has its own, seeded by its params.

    `model` is a model or an `Engine` (model/engine.py) that prepared one. Rows stop at EOS. `finished` (a (B,)
    bool tensor) may be set by the caller between steps, e.g. when a stop string appears or a client goes away;
    the loop ends once every row is finished.
    """
    engine = as_engine(model)
    engine.check()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    device, config = engine.device, engine.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad_id = config.pad_token_id or 0
    ids, mask = left_pad(prompts, pad_id, device)
    B, L = ids.shape
    steps = max(p.max_new_tokens for p in params)
    limits = torch.tensor([p.max_new_tokens for p in params], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device) if finished is None else finished
    sampler = Sampler(params, device, None if generator is None else [generator] * B)
    cache = engine.new_cache(B, L + steps + 1)  # the decode step keeps one column spare (Engine.decode)
    # Padding in the repetition history is replaced by the row's own last prompt token (penalising it twice is a no-op).
    history = torch.where(mask.bool(), ids, ids[:, -1:])

    logits = engine.prefill(cache, 0, prompts)
    for step in range(steps):
        if bool(finished.all()):
            return
        token = sampler(logits, history)
        token = torch.where(finished, eos if eos is not None else 0, token)
        finished |= (token == eos) if eos is not None else torch.zeros_like(finished)
        finished |= step + 1 >= limits
        yield token
        if step + 1 == steps or bool(finished.all()):
            return
        # A finished row still runs (its output is ignored); it is fed padding, as eos may be no real id (-1: none).
        fed = torch.where(finished, pad_id, token)
        history = torch.cat([history, fed[:, None]], dim=1)
        logits = engine.decode(cache, fed)


@dataclass
class TextDelta:
    row: int
    text: str  # new text since the last delta of this row
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length" (max_new_tokens), or None
    token_ids: list = field(default_factory=list)


class TextStream:
    """Incremental detokenizer for one row: emits only text that is final.

    Each token decodes only the few ids since the last complete character (vLLM's and transformers' streamers do
    the same), not the whole answer again; stop strings are searched only in text not yet emitted."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.text, self.emitted, self.stopped = [], "", 0, False
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the end of `text`; ids[read:] are pending
        self.done = ""  # the text of ids[prefix:read]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool):
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(self.done) and (final or not now.endswith("\ufffd")):  # a character may be incomplete
            self.text += now[len(self.done):]
            self.prefix, self.read, self.done = self.read, len(self.ids), now[len(self.done):]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._advance(final=False)
        return self._take(final=False)

    def finish(self) -> str:
        self._advance(final=True)
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text)
        for s in self.stop:
            cut = self.text.find(s, self.emitted)
            if cut != -1:
                self.stopped, final, end = True, True, min(end, cut)
        if not final:
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for n in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text[:end].endswith(s[:n]):
                        end -= n
                        break
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def stream_text(model, tokenizer, prompts: Sequence[Sequence[int]],
                params: SamplingParams | Sequence[SamplingParams], cancelled=None) -> Iterator[list[TextDelta]]:
    """Text deltas for every row that has news, one list per step; each row ends with a finish_reason.

    `cancelled(row) -> bool` lets a caller drop a row (its client disconnected) without stopping the others.
    """
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    streams = [TextStream(tokenizer, p.stop) for p in params]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=as_engine(model).device)
    done = [False] * len(prompts)
    eos = tokenizer.eos_token_id
    counts = [0] * len(prompts)
    for tokens in generate_ids(model, prompts, params, eos_token_id=eos, finished=finished):
        deltas = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if cancelled is not None and cancelled(row):
                done[row], finished[row] = True, True
                continue
            if token == eos:
                done[row] = True
                deltas.append(TextDelta(row, streams[row].finish(), "stop"))
                continue
            counts[row] += 1
            text = streams[row].push(token)
            if streams[row].stopped:
                done[row], finished[row] = True, True
                deltas.append(TextDelta(row, text, "stop", [token]))
            elif counts[row] >= params[row].max_new_tokens:
                done[row] = True
                deltas.append(TextDelta(row, text + streams[row].finish(), "length", [token]))
            else:
                deltas.append(TextDelta(row, text, None, [token]))
        if deltas:
            yield deltas


def generate_text(model, tokenizer, prompts: Sequence[Sequence[int]],
                  params: SamplingParams | Sequence[SamplingParams]) -> list[dict]:
    """Whole completions: [{"text", "finish_reason", "completion_tokens"}] per prompt."""
    results = [{"text": "", "finish_reason": None, "completion_tokens": 0} for _ in prompts]
    for deltas in stream_text(model, tokenizer, prompts, params):
        for d in deltas:
            results[d.row]["text"] += d.text
            results[d.row]["completion_tokens"] += len(d.token_ids)
            if d.finish_reason:
                results[d.row]["finish_reason"] = d.finish_reason
    return results
