"""Our generator: batched, streaming sampling with a KV cache that belongs to the call.

Every call allocates its own `KVCache`, so two requests served at once can never see each other's keys.
Prompts of different lengths are left-padded; the attention mask hides the padding and positions count
real tokens only, so each row gets the logits it would get alone.

Layers:
- `generate_ids`: token level. Yields the next token of every row at each step.
- `TextStream` / `stream_text` / `generate_text`: text level. Decodes incrementally, applies stop strings,
  holds back partial UTF-8 and partial stop strings so streamed text never has to be taken back.
"""
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import InputError


class KVCache:
    """Preallocated keys/values, one (B, K, capacity, D) buffer per layer. Grows if a call runs past it.

    `update` appends at the layer's length and returns the filled part (prefill, eager steps); `columns` gives a
    compiled decode step a view that needs no Python-side lengths.
    """

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, capacity, device, dtype):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    @classmethod
    def for_model(cls, model, batch, capacity):
        cfg, param = model.config, next(model.parameters())
        dtype = param.dtype if param.is_floating_point() else torch.float32
        if param.device.type == "cpu":
            # torch's CPU attention kernel is faster in fp32 for a decode step (SDPA, one query row, 288 keys,
            # 8 kv heads: 72 us vs 112 in bf16 on the reference machine); the cache is small beside the weights.
            dtype = torch.float32
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity, param.device, dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, k, v, layer_idx):
        k, v = k.to(self.k[layer_idx].dtype), v.to(self.v[layer_idx].dtype)
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def _grow(self, needed):
        extra = max(needed, 2 * self.capacity) - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)  # noqa: E731
        self.k, self.v = [pad(t) for t in self.k], [pad(t) for t in self.v]

    def columns(self, n: int, slot: torch.Tensor) -> "CacheColumns":
        """The first n columns of every layer, for one decode step that writes its token at column `slot`."""
        return CacheColumns([t[:, :, :n] for t in self.k], [t[:, :, :n] for t in self.v], slot)


class CacheColumns:
    """Views of a KVCache's columns in use: a step writes its keys and values in place at `slot` (a (1,) tensor,
    so a compiled step reads no Python int) and attends over all the columns. The column count is marked dynamic,
    so one compiled graph serves every step."""

    def __init__(self, k: list, v: list, slot: torch.Tensor):
        self.k, self.v, self.slot = k, v, slot
        for t in (*k, *v):  # (B, K, columns, D)
            torch._dynamo.mark_dynamic(t, 2)

    def update(self, k, v, layer_idx):
        self.k[layer_idx].index_copy_(2, self.slot, k.to(self.k[layer_idx].dtype))
        self.v[layer_idx].index_copy_(2, self.slot, v.to(self.v[layer_idx].dtype))
        return self.k[layer_idx], self.v[layer_idx]


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # new tokens only, the prompt is not counted
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 makes already-seen tokens less likely
    stop: Sequence[str] = ()
    seed: int | None = None

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


class Sampler:
    """Per-row sampling settings, so one batch can serve requests that asked for different things."""

    def __init__(self, params: Sequence[SamplingParams], device):
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)[:, None]
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.filtering = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        # One random stream per row: a seeded request samples the same tokens whatever else is in the batch.
        self.generators = []
        for p in params:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.generators.append(g)

    def __call__(self, logits, history):
        logits = logits.float()
        if self.use_penalty:
            logits = apply_repetition_penalty(logits, history, self.penalty)
        best = logits.argmax(dim=-1)
        if bool(self.greedy.all()):
            return best
        logits = logits / self.temperature
        if self.filtering:
            logits = filter_top_k_top_p(logits, self.top_k, self.top_p)
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g, device=cdf.device) for g in self.generators])
        sampled = (cdf < u[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
        return torch.where(self.greedy, best, sampled)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """(B, L) ids and mask, prompts right-aligned so every row's next token lands in the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


_compiled_steps = weakref.WeakKeyDictionary()  # model -> its compiled decode step (see compile_decoding)

# The guards a compiled decode step keeps. Before every call dynamo checks that nothing the graph was built from has
# changed; for a whole model that means every module's hooks, attributes and constants and the identity of every
# global function, which cost more than the step's attention (0.41 ms of a 2.2 ms step, 26M int8; 0.13 ms with the
# guards below). Each model gets its graphs of its own (see compile_decoding), and its structure and constants are
# fixed at construction, so the step checks only what can change between calls: every tensor it reads (weights,
# the fused layout, the cache: dtype, device, shape, strides), the dynamic sizes, and grad/global state. Not seen:
# a hook or an adapter attached to the model after compile_decoding (the chat scripts merge adapters first).
_GUARDED = {"TENSOR_MATCH", "SHAPE_ENV", "GRAD_MODE", "GLOBAL_STATE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE",
            "DETERMINISTIC_ALGORITHMS", "AUTOGRAD_SAVED_TENSORS_HOOKS"}


def _decode_step_guards(entries) -> list[bool]:
    return [entry.guard_type in _GUARDED for entry in entries]


def compile_decoding(model):
    """Make our generator run this model's decode steps as one torch.compile'd graph (gpt-fast's approach).

    The step gets views of the cache's columns in use, writes the new token's keys and values in place at a column
    index, and takes an additive mask for the left padding; the number of columns is a dynamic dimension, so one
    graph serves every step and every call of that batch size (a new batch size compiles once more). Inductor
    fuses the small elementwise work between the weight products (norms, RoPE, SwiGLU, residuals) and drops most
    of eager mode's per-op overhead. Compiling takes tens of seconds on CPU (then cached on disk), so it is
    opt-in: `--compile` in the chat scripts and the server. It happens here, for one row (a two-token
    generation), so that a chat or a server pays it while loading rather than in its first answer. The prefill
    stays eager.
    """
    def decode_step(model, token, position, mask, cache):
        return model(token, attention_mask=mask, position_ids=position, cache=cache).logits[:, -1]

    # Dynamo keeps compiled graphs per code object: a copy of the code per model keeps this model's graphs, built on
    # its constants, from ever being tried on another model (their guards do not check constants, see _GUARDED).
    decode_step.__code__ = decode_step.__code__.replace(co_name=f"decode_step_{id(model):x}")
    _compiled_steps[model] = torch.compile(decode_step, options={
        # C++ instead of Python glue between the kernels.
        "cpp_wrapper": True,
        "guard_filter_fn": _decode_step_guards})
    for _ in generate_ids(model, [[model.config.pad_token_id or 0]], SamplingParams(max_new_tokens=2), eos_token_id=-1):
        pass
    return model


def decode_steps(model, cache: KVCache, mask: torch.Tensor):
    """A function (token (B, 1), position (B, 1)) -> next-token logits (B, vocab) for the steps after the prefill.

    Compiled models (see `compile_decoding`) get the compiled step; others the usual eager forward.
    """
    compiled = _compiled_steps.get(model)
    B, width = mask.shape
    if compiled is None:
        def eager_step(token, position):
            nonlocal mask
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            return model(token, attention_mask=mask, position_ids=position, cache=cache).logits[:, -1]
        return eager_step
    # Additive mask over the cache's columns: 0 for the prompt's real tokens and for each new column once written.
    visible = torch.full((B, 1, 1, cache.capacity), float("-inf"), dtype=cache.k[0].dtype, device=mask.device)
    visible[:, 0, 0, :width].masked_fill_(mask.bool(), 0.0)
    slot = torch.zeros(1, dtype=torch.long, device=mask.device)
    columns = width  # in use so far; each step sees exactly these, so attention reads no empty column

    def compiled_step(token, position):
        nonlocal columns
        slot.fill_(columns)
        columns += 1
        visible[..., columns - 1] = 0.0
        step_mask = visible[..., :columns]
        torch._dynamo.mark_dynamic(step_mask, 3)  # (B, 1, 1, columns)
        return compiled(model, token, position, step_mask, cache.columns(columns, slot))
    return compiled_step


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 eos_token_id: int | None = None, finished: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step, for up to max_new_tokens steps.

    Rows stop at EOS. `finished` (a (B,) bool tensor) may be set by the caller between steps, e.g. when a
    stop string appears or a client goes away; the loop ends once every row is finished.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if hasattr(model, "use_decoding_layout"):
        model.use_decoding_layout(len(prompts))  # no-op in training mode or when already laid out
    device = next(model.parameters()).device
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad_id = model.config.pad_token_id or 0
    ids, mask = left_pad(prompts, pad_id, device)
    B, L = ids.shape
    steps = max(p.max_new_tokens for p in params)
    limits = torch.tensor([p.max_new_tokens for p in params], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device) if finished is None else finished
    sampler = Sampler(params, device)
    cache = KVCache.for_model(model, B, L + steps)
    # Padding in the repetition history is replaced by the row's own last prompt token (penalising it twice is a no-op).
    history = torch.where(mask.bool(), ids, ids[:, -1:])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]
    step_logits = decode_steps(model, cache, mask)
    position = positions[:, -1:]
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
        fed = torch.where(finished, pad_id, token)[:, None]
        history = torch.cat([history, fed], dim=1)
        position = position + 1
        logits = step_logits(fed, position)


@dataclass
class TextDelta:
    row: int
    text: str  # new text since the last delta of this row
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length" (max_new_tokens), or None
    token_ids: list = field(default_factory=list)


class TextStream:
    """Incremental detokenizer for one row: emits only text that is final."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.emitted, self.stopped = [], 0, False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s)
            if cut != -1:
                self.stopped = True
                return self._take(text[:cut], final=True)
        return self._take(text, final=False)

    def finish(self) -> str:
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True), final=True)

    def _take(self, text: str, final: bool) -> str:
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                end = len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:n]):
                        end -= n
                        break
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def stream_text(model, tokenizer, prompts: Sequence[Sequence[int]],
                params: SamplingParams | Sequence[SamplingParams], cancelled=None) -> Iterator[list[TextDelta]]:
    """Text deltas for every row that has news, one list per step; each row ends with a finish_reason.

    `cancelled(row) -> bool` lets a caller drop a row (its client disconnected) without stopping the others.
    """
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    streams = [TextStream(tokenizer, p.stop) for p in params]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=next(model.parameters()).device)
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
            elif text:
                deltas.append(TextDelta(row, text, None, [token]))
            else:
                deltas.append(TextDelta(row, "", None, [token]))
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
