"""The inference engine: a model prepared for decoding, and the KV cache its steps read and write.

The generator (model/generate.py), the server's scheduler, the chat scripts, the chat page and the benchmarks
decode through an `Engine`:

    engine = Engine(model)                                         # eager, the model as it is
    engine = Engine(model, compile=True, tune=True, quantize="int8")   # prepared for speed, explicitly
    cache = engine.new_cache(rows=4, capacity=512)
    logits = engine.prefill(cache, 0, prompts)    # fresh rows 0..len(prompts)-1: logits of each last prompt token
    logits = engine.append(cache, row, ids)       # more tokens for one row (a chunk of a long prompt)
    logits = engine.decode(cache, tokens)         # one token for each of rows 0..n-1, every row at its own length

Everything decoding does for speed lives here, not in the model file:
- `tune`: each plain linear computes its product in whichever form this CPU runs fastest, timed once on the
  model's own weight shapes (`DecodeLinear`, `tune_products`); CPUs differ a lot here (bench/bench_decode_parts.py).
  On every device, a one-token step's grouped-query attention runs as plain attention over the kv heads
  (`DecodeAttention`). A compiled CPU step is not tuned: inductor chooses its own products (below).
- `quantize="int8"`: int8 weights (torchao, weight-only, one scale per output row); `"int4"`: 4-bit weights in
  groups of 32 (torch's int4 CPU kernel; `Int4Linear`).
- `compile`: every decode step runs as one torch.compile'd graph (gpt-fast's approach), any number of rows and
  any length with the same graph, checking only the guards that can change between calls. On CPU the graph holds
  the weights as constants (inductor's freezing) and picks each product by timing inductor's C++ GEMM against
  ATen's, in place of `tune`'s forms: the step uses the weights the model had when it compiled, so an engine is
  prepared again after training changes them.

Rows of a cache are independent sequences: row i holds its tokens in columns [start[i], end[i]) (columns before
start are the left padding of a batch prefill). A decode step writes each row's new keys and values at its own
end column and attends, through an additive mask, to its own columns only, so rows of any lengths step together
and a row can be refilled with a new sequence while the others go on (continuous batching, model/server.py).
"""
import time
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .model import Attention


# ------------------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Keys/values of `rows` sequences: one (rows, K, capacity, D) buffer per layer, and where each row's tokens are.

    `starts`/`ends` are Python lists (the scheduler reads them without a device sync); `start`/`end` are the same
    numbers on the device, for the decode step."""

    def __init__(self, n_layers, rows, n_kv_heads, head_dim, capacity, device, dtype):
        shape = (rows, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.starts, self.ends = [0] * rows, [0] * rows
        self.start = torch.zeros(rows, dtype=torch.long, device=device)
        self.end = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @torch.inference_mode()  # the buffers are inference tensors once grown, changed only in inference mode
    def set_row(self, row: int, start: int, end: int):
        self.starts[row], self.ends[row] = start, end
        self.start[row], self.end[row] = start, end

    @torch.inference_mode()
    def copy_row(self, src: int, dst: int):
        """Row dst becomes a copy of row src (a request's other choices share its prompt; compaction)."""
        used = self.ends[src]
        for t in (*self.k, *self.v):
            t[dst, :, :used] = t[src, :, :used]
        self.set_row(dst, self.starts[src], used)

    def reserve(self, columns: int):
        """Room for `columns` columns in every row: the buffers double when a sequence outgrows them."""
        if columns > self.capacity:
            extra = max(columns, 2 * self.capacity) - self.capacity
            grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)  # noqa: E731
            self.k, self.v = [grow(t) for t in self.k], [grow(t) for t in self.v]


class RowWrite:
    """The cache as the model sees it while prefilling rows [first, first+B): the chunk's keys and values go to
    columns [column, column+T), and attention reads columns [0, column+T)."""

    def __init__(self, cache: KVCache, first: int, count: int, column: int):
        self.cache, self.rows, self.column = cache, slice(first, first + count), column

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.column

    def update(self, k, v, layer_idx):  # k, v (B, K, T, D)
        end = self.column + k.shape[2]
        keys, values = self.cache.k[layer_idx], self.cache.v[layer_idx]
        keys[self.rows, :, self.column:end] = k.to(keys.dtype)
        values[self.rows, :, self.column:end] = v.to(values.dtype)
        return keys[self.rows, :, :end], values[self.rows, :, :end]


class StepWrite:
    """The cache as the model sees it in a decode step: views of rows [0, n) and of the columns in use; each row's
    new keys and values are written in place at its own end column (`end`, a (n,) tensor: no Python ints, so a
    compiled step reads nothing that changes between steps)."""

    def __init__(self, k: list, v: list, end: torch.Tensor):
        self.k, self.v, self.end = k, v, end

    def update(self, k, v, layer_idx):  # k, v (n, K, 1, D)
        n, heads, _, dim = k.shape
        where = self.end.view(n, 1, 1, 1).expand(n, heads, 1, dim)
        self.k[layer_idx].scatter_(2, where, k.to(self.k[layer_idx].dtype))
        self.v[layer_idx].scatter_(2, where, v.to(self.v[layer_idx].dtype))
        return self.k[layer_idx], self.v[layer_idx]


def cache_dtype(param_dtype: torch.dtype, device_type: str, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype attention computes in: autocast's where it is on (GRPO's rollouts from fp32 weights), else the
    weights' (int8 weights: fp32). A cache in another dtype is cast back in every layer at every step."""
    if device_type == "cpu":
        # torch's CPU attention kernel is faster in fp32 for a decode step (SDPA, one query row, 288 keys,
        # 8 kv heads: 72 us vs 112 in bf16 on the reference machine); the cache is small beside the weights.
        return torch.float32
    if autocast_dtype is not None:
        return autocast_dtype
    return param_dtype if param_dtype.is_floating_point else torch.float32


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """(B, L) ids and mask, prompts right-aligned so every row's next token lands in the same column."""
    if any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def decode_step(model, tokens, start, end, keys, values):
    """Next-token logits (n, vocab) for tokens (n, 1) of rows whose tokens are at columns [start, end) of the
    cache views keys/values (n, K, columns, D) per layer; writes the new keys and values at column `end`."""
    columns = torch.arange(keys[0].shape[2], device=tokens.device)[None]  # (1, columns)
    visible = (columns >= start[:, None]) & (columns <= end[:, None])  # (n, columns), True: attend
    positions = (end - start)[:, None]  # (n, 1): a row's first real token is position 0
    out = model(tokens, attention_mask=visible[:, None, None, :], position_ids=positions,
                cache=StepWrite(keys, values, end))
    return out.logits[:, -1]


# ------------------------------------------------------------------------------------------- products for decoding
def plain_linear(layer: nn.Module) -> bool:
    """A bias-free linear with an ordinary weight: not an adapter, not a quantized layer (torchao's quantized weights
    are tensor subclasses that implement `linear` and little else)."""
    return isinstance(layer, nn.Linear) and layer.bias is None and type(layer.weight) is nn.Parameter


# The ways to compute x @ W^T for the few rows of a decode step; which is fastest depends on the CPU's BLAS. Seen on
# one 2-core AMD EPYC: one row through `linear` (MKL's GEMV) 9.7 ms a pass over the 26M model's weights, as the
# two-row product `padded` 3.6 ms; on an Intel Xeon the GEMV was the fast one.
PRODUCTS = {
    "linear": lambda x, w: F.linear(x, w),
    "weight_first": lambda x, w: (w @ x.T).T,  # the weight as the long operand: another BLAS kernel
    "padded": lambda x, w: (w @ torch.cat([x, x]).T).T[: x.shape[0]],  # one row computed as two (see above)
    "mv": lambda x, w: torch.mv(w, x[0])[None],  # one row only: torch's GEMV, on some CPUs faster than linear for bf16
}
ONE_ROW_ONLY = ("padded", "mv")


class DecodeLinear(nn.Linear):
    """nn.Linear whose product at inference takes the form tuned for this CPU: `one` for a single row, `few` for
    2-64 rows (a decode step of a batch); more rows (a prefill) and training use F.linear. The engine turns a
    model's plain linears into this class in place (same module, same weight, hooks kept) and back on release."""
    one = few = "linear"

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or rows > 64:
            return F.linear(x, self.weight)
        form = self.one if rows == 1 else self.few
        return PRODUCTS[form](x.reshape(rows, -1), self.weight).reshape(*x.shape[:-1], self.out_features)


class DecodeAttention(Attention):
    """Attention whose one-token step (a decode step) runs the H/K query heads that share a kv head as H/K query
    rows of a plain attention over that kv head: the same sums as the GQA kernel in another layout. torch's CPU
    kernel runs it faster; on CUDA the GQA kernels that take a mask are only the math one, while this layout has
    no GQA left, so the memory-efficient kernel takes the step's mask (bench/bench_decode_attention.py measures
    both). The engine turns a model's Attention modules into this class in place, and back on release."""

    def attend(self, q, k, v, mask):
        B, H, T, D = q.shape
        if T != 1 or not self.flash or torch.is_grad_enabled():
            return super().attend(q, k, v, mask)
        grouped = q.reshape(B, self.n_kv_heads, H // self.n_kv_heads, D)  # (B, K, H/K, D)
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(B, H, 1, D)


def tune_products(linears: list, rows: Sequence[int] = (1, 16), repeats: int = 3) -> dict:
    """{rows: (fastest form, {form: ms})}: each form of PRODUCTS timed as a pass over all these weights."""
    result = {}
    with torch.inference_mode():
        for n in rows:
            inputs = {m.in_features: torch.randn(n, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
                      for m in linears}
            times = {}
            for name, product in PRODUCTS.items():
                if name in ONE_ROW_ONLY and n != 1:
                    continue
                best = float("inf")
                for _ in range(repeats + 1):  # the first round warms up
                    t = time.perf_counter()
                    for m in linears:
                        product(inputs[m.in_features], m.weight)
                    best = min(best, time.perf_counter() - t)
                times[name] = best * 1e3
            result[n] = (min(times, key=times.get), times)
    return result


# ---------------------------------------------------------------------------------------------------------- int8
def quantize_int8(model):
    """Int8 weights for inference: every Linear's weight stored as int8 with one scale per output row (torchao's
    weight-only scheme, as gpt-fast uses it); activations stay in the model's dtype. The embedding stays as it is.

    It pays off compiled: inductor fuses the dequantization into the product and calls torch's int8 matrix-vector
    kernel, which on CPU wants bf16 activations (fp32 ones take a slow path). Eager, every step dequantizes every
    weight and runs slower than fp32. Measured: bench/bench_model.py.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise InputError("int8 weights need torchao, an optional install: pip install torchao==0.18.0 "
                         "(requirements-eval.txt)") from e

    with warnings.catch_warnings():
        # Compiling works; the warning says only that the compiled graph is not cached on disk for the next process.
        warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching")
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    return model


# ---------------------------------------------------------------------------------------------------------- int4
class Int4Linear(nn.Module):
    """A linear with 4-bit weights for CPU decoding: each group of `group` inputs of an output row keeps its own
    scale and offset (w = (q - 8) * scale + zero, q in 0..15: the layout of torch's int4 CPU kernel, the same
    grouping as llama.cpp's Q4_0). The product takes its activations in bf16 (the kernel's) and gives them back
    in the model's dtype: on CPU an fp32 model with int4 weights decodes faster than a bf16 one."""

    def __init__(self, linear: nn.Linear, group: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        w = linear.weight.detach().float().view(self.out_features, -1, group)  # (N, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.view(self.out_features, -1), 1))
        zero = lo + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))  # (K/G, N, 2)

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_int4(model, group: int = 32):
    """4-bit weights for CPU inference: every plain Linear becomes an Int4Linear (torch's own int4 kernel); the
    embedding stays as it is. Layers whose inputs do not divide into groups stay as they are."""
    if next(model.parameters()).device.type != "cpu":
        raise InputError("int4 weights are for CPU decoding (torch's int4 CPU kernel); on a GPU use int8 or bf16")
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if plain_linear(child) and child.in_features % group == 0:
                setattr(parent, name, Int4Linear(child, group))
    return model


# -------------------------------------------------------------------------------------------------------- engine
# The guards a compiled decode step keeps. Before every call dynamo checks that nothing the graph was built from has
# changed; for a whole model that means every module's hooks, attributes and constants and the identity of every
# global function, which cost more than the step's attention (0.41 ms of a 2.2 ms step, 26M int8; 0.13 ms with these
# guards). Each engine gets graphs of its own (see Engine._compile) and a model's structure is fixed once prepared,
# so the step checks only what can change between calls: every tensor it reads (weights and cache: dtype, device,
# shape, strides), the dynamic sizes, and grad/global state. What it no longer sees (a hook or an adapter added
# later) the engine checks itself before each generation: `Engine.check`.
_GUARDED = {"TENSOR_MATCH", "SHAPE_ENV", "GRAD_MODE", "GLOBAL_STATE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE",
            "DETERMINISTIC_ALGORITHMS", "AUTOGRAD_SAVED_TENSORS_HOOKS"}


def _decode_step_guards(entries) -> list[bool]:
    return [entry.guard_type in _GUARDED for entry in entries]


def structure(model) -> tuple:
    """What a compiled step cannot see change: the modules, their classes and their hooks."""
    return tuple((name, type(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
                 for name, m in model.named_modules())


def weights(model) -> tuple:
    """What a graph that holds the weights as constants cannot see change: each weight's identity, dtype, device and
    in-place update count (an optimizer step or a copy into it counts one)."""
    return tuple((name, id(t), t.dtype, t.device, t._version)
                 for name, t in (*model.named_parameters(), *model.named_buffers()))


class Engine:
    def __init__(self, model, compile: bool = False, tune: bool = False, quantize: str | None = None,
                 rows: Sequence[int] = (1,)):
        """Prepare `model` for decoding. `tune` and `quantize` change the model in place (its linears' forms,
        int8 weights), `compile` compiles the decode step and runs it once for each row count in `rows` (compiling
        takes tens of seconds on CPU, better paid while loading than in the first answer)."""
        self.model = model.eval() if (compile or tune or quantize) else model
        self.device = next(model.parameters()).device
        self.tuning = None
        if quantize == "int8":
            quantize_int8(model)
        elif quantize == "int4":
            quantize_int4(model)
        elif quantize is not None:
            raise InputError(f"unknown quantization {quantize!r} (int8, int4)")
        # On GPUs F.linear is the product; a compiled CPU step has inductor choose its products and kernels itself
        # (the attention's layout too: the one tune picks for eager made it slower there).
        cpu_compiled = compile and self.device.type == "cpu"
        if tune and self.device.type == "cpu" and not cpu_compiled:
            linears = [m for m in model.modules() if plain_linear(m)]
            self.tuning = tune_products(linears, rows=(1, 16))
            for m in linears:
                m.__class__ = DecodeLinear
                m.one, m.few = self.tuning[1][0], self.tuning[16][0]
        if tune and not cpu_compiled:
            for m in model.modules():
                if type(m) is Attention:
                    m.__class__ = DecodeAttention
        self.step = self._compile() if compile else None
        self.structure = structure(model)
        self.warming = compile  # while compiling, decode marks the sizes that vary (after, the guards know them)
        if compile:
            # On CPU the graph holds the weights as constants (inductor's freezing), which its GEMM packs once.
            # Dynamo reads `freezing` too, so it is set around the compiling calls, not passed as an option (which
            # reaches only inductor).
            with torch._inductor.config.patch(freezing=cpu_compiled), warnings.catch_warnings():
                # autotuning reads a tensor's storage the deprecated way: torch's own warning, nothing of the user's
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                for n in rows:
                    self.generate_warmup(n)
        self.warming = False
        self.frozen = weights(model) if cpu_compiled else None

    def release(self):
        """Undo `tune`: the model's linears and attention are plain again (for training)."""
        for m in self.model.modules():
            if type(m) is DecodeLinear:
                m.__class__ = nn.Linear
            elif type(m) is DecodeAttention:
                m.__class__ = Attention

    def _compile(self):
        def step(model, tokens, start, end, keys, values):
            return decode_step(model, tokens, start, end, keys, values)

        # Dynamo keeps compiled graphs per code object: a copy of the code per engine keeps this model's graphs, built
        # on its constants, from ever being tried on another model (their guards do not check constants).
        step.__code__ = step.__code__.replace(co_name=f"decode_step_{id(self):x}")
        # cpp_wrapper: C++ instead of Python glue between the kernels.
        options = {"cpp_wrapper": True, "guard_filter_fn": _decode_step_guards}
        if self.device.type == "cpu":
            # Each product is whichever is fastest of inductor's own C++ GEMM (micro-kernels for this CPU's
            # instructions, on weights it packs once) and ATen's, timed on the model's shapes while compiling.
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                           # its tables of timings are not for users
                           autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
        return torch.compile(step, options=options)

    def generate_warmup(self, rows: int):
        # Sizes that equal each other while compiling get one symbol (dynamo's duck shaping) and guards that keep them
        # equal: rows, columns and the cache's capacity are all different here, or a later step recompiles.
        cache = self.new_cache(rows, 4 * (rows + 8))
        self.prefill(cache, 0, [[0] * (rows + 5)] * rows)
        for _ in range(2):
            self.decode(cache, torch.zeros(rows, dtype=torch.long, device=self.device))

    def check(self):
        """Refuse to decode with a compiled step whose model has changed in what its guards no longer check."""
        if self.step is not None and structure(self.model) != self.structure:
            raise RuntimeError("the model changed (modules or hooks) after it was prepared for decoding with "
                               "compile=True; prepare it again: Engine(model, compile=True)")
        if self.frozen is not None and weights(self.model) != self.frozen:
            raise RuntimeError("the model's weights changed after it was prepared for decoding with compile=True "
                               "(on CPU its graph holds them as constants); prepare it again: Engine(model, "
                               "compile=True)")

    @property
    def config(self):
        return self.model.config

    @torch.inference_mode()  # inference tensors, whoever asks: a compiled step sees the same kind every call
    def new_cache(self, rows: int, capacity: int) -> KVCache:
        cfg, param = self.model.config, next(self.model.parameters())
        autocast = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None
        dtype = cache_dtype(param.dtype, self.device.type, autocast)
        return KVCache(cfg.n_layers, rows, cfg.n_kv_heads, cfg.head_dim, capacity, self.device, dtype)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, first: int, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Fill rows [first, first + len(prompts)) afresh with these prompts, left-padded to one width (the mask hides
        the padding, positions count real tokens). Returns each prompt's next-token logits (len(prompts), vocab)."""
        ids, mask = left_pad(prompts, self.model.config.pad_token_id or 0, self.device)
        width = ids.shape[1]
        cache.reserve(width + 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(ids, attention_mask=mask, position_ids=positions,
                            cache=RowWrite(cache, first, len(prompts), 0), logits_to_keep=1).logits[:, -1]
        for i, p in enumerate(prompts):
            cache.set_row(first + i, width - len(p), width)
        return logits

    @torch.inference_mode()
    def append(self, cache: KVCache, row: int, ids: Sequence[int]) -> torch.Tensor:
        """Add tokens to one row after those it holds (a chunk of a long prompt): its next-token logits (1, vocab)."""
        begin = cache.ends[row]
        if cache.starts[row] != 0 and begin > 0:
            raise InputError("append continues rows that start at column 0 (filled by append, or prefilled alone)")
        cache.reserve(begin + len(ids) + 1)
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(begin, begin + len(ids), device=self.device)[None]
        logits = self.model(tokens, position_ids=positions, cache=RowWrite(cache, row, 1, begin),
                            logits_to_keep=1).logits[:, -1]
        cache.set_row(row, 0, begin + len(ids))
        return logits

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One step for rows [0, n), n = len(tokens): each row's token goes in at its end column. Logits (n, vocab)."""
        n = tokens.shape[0]
        tokens = tokens.reshape(n, 1).clone()  # an inference tensor, whatever the caller's was (one graph for all)
        columns = max(cache.ends[:n]) + 1
        # A spare column: a view of the whole buffer would be contiguous, which a compiled step guards (another graph).
        cache.reserve(columns + 1)
        keys = [t[:n, :, :columns] for t in cache.k]
        values = [t[:n, :, :columns] for t in cache.v]
        start, end = cache.start[:n], cache.end[:n]
        if self.step is None:
            logits = decode_step(self.model, tokens, start, end, keys, values)
        else:
            if self.warming:  # one graph for every row count and length
                for t in (*keys, *values):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                for t in (start, end):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            logits = self.step(self.model, tokens, start, end, keys, values)
        cache.end[:n] += 1
        for row in range(n):
            cache.ends[row] += 1
        return logits


def as_engine(model_or_engine) -> Engine:
    """An Engine as given, or a plain eager one around a model (which it leaves as it is)."""
    return model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine)
