"""The inference engine: prepared models decode exactly as plain ones, rows of any lengths step together, the
compiled step serves every length and row count with one graph, int8, and what the engine refuses."""
import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import tiny_model
from model.engine import ONE_ROW_ONLY, PRODUCTS, DecodeLinear, Engine, cache_dtype, quantize_int8
from model.generate import SamplingParams, generate_ids


def tokens(model, prompts, params):
    """Every step's tokens of our generator, (steps, B), as lists; no EOS, so every row runs its length."""
    return torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1))).tolist()


def prompts_of(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def test_forward_hooks_fire_under_no_grad_on_plain_and_tuned_models():
    """Every linear is called as a module, so a forward hook sees every product (a probe, a LoRA-style tap) in
    training and at inference alike, also once the engine has tuned the products."""
    model = tiny_model()
    seen = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.append(name))
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        model(ids)
    assert len(seen) == linears and "lm_head" in seen and "model.layers.1.feed_forward.w2" in seen
    seen.clear()
    engine = Engine(model, tune=True)
    assert all(type(m) is DecodeLinear for m in model.modules() if isinstance(m, nn.Linear))
    list(generate_ids(engine, [ids[0].tolist()], SamplingParams(max_new_tokens=2), eos_token_id=-1))
    assert len(seen) == 2 * linears  # the prefill and one decode step
    engine.release()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_decode_attention_is_the_gqa_kernels_sums_in_another_layout():
    """One token over a masked cache: the grouped layout gives the GQA kernel's output (and the engine swaps the
    class in and out)."""
    from model.engine import DecodeAttention
    from model.model import Attention

    model = tiny_model()
    attention = model.model.layers[0].attention
    assert attention.n_kv_heads < attention.n_heads
    q, k, v = torch.randn(3, attention.n_heads, 1, 16), torch.randn(3, attention.n_kv_heads, 7, 16), \
        torch.randn(3, attention.n_kv_heads, 7, 16)
    mask = torch.rand(3, 1, 1, 7) > 0.3
    mask[:, ..., -1] = True
    with torch.no_grad():
        expected = attention.attend(q, k, v, mask)
        engine = Engine(model, tune=True)
        assert type(attention) is DecodeAttention
        got = attention.attend(q, k, v, mask)
        engine.release()
    assert type(attention) is Attention
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("one,few", [(one, few) for one in PRODUCTS for few in PRODUCTS if few not in ONE_ROW_ONLY])
def test_every_product_form_gives_the_plain_models_tokens(one, few):
    """Whatever forms tuning picks on a CPU, greedy decoding gives the plain model's tokens, alone and batched."""
    model = tiny_model()
    prompts = prompts_of(9, 4, 6)
    expected_one, expected_batch = tokens(model, prompts[:1], SamplingParams(max_new_tokens=12)), \
        tokens(model, prompts, SamplingParams(max_new_tokens=12))
    prepared = copy.deepcopy(model)
    Engine(prepared, tune=True)
    for m in prepared.modules():
        if type(m) is DecodeLinear:
            m.one, m.few = one, few
    assert tokens(prepared, prompts[:1], SamplingParams(max_new_tokens=12)) == expected_one
    assert tokens(prepared, prompts, SamplingParams(max_new_tokens=12)) == expected_batch


def test_rows_join_and_leave_while_others_decode():
    """The engine's rows are independent sequences: a row filled while another is halfway through its answer, at
    another length, gives each the tokens it gets alone; a row copied from another continues identically; a long
    prompt appended in chunks equals one prefill."""
    model = tiny_model()
    engine = Engine(model)
    a, b = prompts_of(11, 5, seed=1)
    alone_a = [row[0] for row in tokens(model, [a], SamplingParams(max_new_tokens=10))]
    alone_b = [row[0] for row in tokens(model, [b], SamplingParams(max_new_tokens=6))]

    cache = engine.new_cache(rows=3, capacity=8)  # small: it must grow as rows get longer
    got_a, got_b = [], []
    logits = engine.prefill(cache, 0, [a])
    for step in range(10):
        if step == 4:  # b arrives, prefilled in two chunks into row 1 while row 0 is mid-answer
            engine.append(cache, 1, b[:2])
            b_logits = engine.append(cache, 1, b[2:])
            logits = torch.cat([logits, b_logits])
        token = logits.argmax(-1)
        got_a.append(int(token[0]))
        if token.shape[0] > 1:
            got_b.append(int(token[1]))
        logits = engine.decode(cache, token)
    assert got_a == alone_a and got_b == alone_b

    engine.prefill(cache, 0, [a])
    cache.copy_row(0, 2)
    cache.copy_row(2, 1)  # row 1 now holds a's prompt too
    first = engine.decode(cache, torch.tensor([alone_a[0], alone_a[0]]))
    torch.testing.assert_close(first[0], first[1], atol=1e-5, rtol=0)
    assert int(first[0].argmax()) == alone_a[1]


@pytest.fixture(scope="module")
def compiled_tiny():
    """A tiny model and an engine compiled from a copy of it with rows=(1, 2), and how many graphs preparing made
    (compiling on CPU autotunes every product: worth sharing between the tests that only decode with it)."""
    import contextlib
    import io
    import warnings

    model = tiny_model()
    graphs = counters["stats"]["unique_graphs"]
    out, err = io.StringIO(), io.StringIO()
    # no cached graph: every product is autotuned here, whatever an earlier run left on disk
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings(record=True) as seen, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.resetwarnings()  # what a script sees: Python's own defaults, not pytest's
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # this test's own setting says so
        engine = Engine(copy.deepcopy(model), compile=True, rows=(1, 2))
    said = (out.getvalue(), err.getvalue(), [str(w.message) for w in seen])
    return model, engine, counters["stats"]["unique_graphs"] - graphs, said


def test_compiling_prints_nothing(compiled_tiny):
    """Autotuning's tables of timings and torch's own deprecation warnings stay inside the engine."""
    assert compiled_tiny[3] == ("", "", [])


def test_compiled_step_equals_eager_for_any_length_and_row_count_without_recompiling(compiled_tiny):
    """One compiled graph serves one row, and one more every larger row count and every length: left-padded rows,
    greedy beside seeded sampling."""
    model, engine, prepared, _ = compiled_tiny
    assert prepared > 0  # compiled while preparing
    graphs = counters["stats"]["unique_graphs"]
    greedy, sampled = SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=9, temperature=1.0, seed=3)
    for prompts, params in ((prompts_of(9, 4), [greedy, sampled]), (prompts_of(17, 2, 5, seed=2), greedy),
                            (prompts_of(30), greedy)):
        assert tokens(engine, prompts, params) == tokens(model, prompts, params)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_engine_never_compiles_again_in_the_steady_state(compiled_tiny):
    """200 decode steps whose row count changes every step (1 to 6 rows, each at its own length, the cache growing
    past its first capacity) after preparing with rows=(1, 2): no new graph, no recompilation (issue 35)."""
    engine = compiled_tiny[1]
    cache = engine.new_cache(6, 8)
    engine.prefill(cache, 0, prompts_of(5, 2, 7, 1, 3, 4))
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        n = int(torch.randint(1, 7, (1,), generator=g))
        engine.decode(cache, torch.randint(3, 128, (n,), generator=g))
        if max(cache.ends) > 40:  # rewind the rows, as a server refills finished ones
            for row in range(6):
                cache.set_row(row, 0, 1 + row)
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["frames"]) == frames  # dynamo's frame counts: a recompile would add to them


def test_what_a_frozen_graph_cannot_see_counts_an_update_in_place_and_a_cast():
    from model.engine import weights

    model = tiny_model()
    before = weights(model)
    assert weights(model) == before
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # what an optimizer step does: in place, the same tensor
    assert weights(model) != before
    after_update = weights(model)
    model.to(torch.bfloat16)
    assert weights(model) != after_update


def test_a_compiled_cpu_step_refuses_a_model_changed_after_preparing():
    """On CPU the compiled step holds the weights as graph constants: a model given a hook or changed in its
    weights after preparing is refused with one clear error, never decoded with the old weights or a stale graph."""
    model = tiny_model()
    prompt, params = prompts_of(6), SamplingParams(max_new_tokens=10)
    engine = Engine(copy.deepcopy(model), compile=True)
    assert tokens(engine, prompt, params) == tokens(model, prompt, params)
    hook = engine.model.lm_head.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="changed .modules or hooks. after it was prepared"):
        tokens(engine, prompt, params)
    hook.remove()
    assert tokens(engine, prompt, params) == tokens(model, prompt, params)  # refused for the hook, nothing else
    engine.model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="weights changed after it was prepared"):
        tokens(engine, prompt, params)


def test_int8_without_torchao_is_one_clear_line(monkeypatch):
    from model.errors import InputError

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(InputError, match=r"^int8 weights need torchao, an optional install: pip install torchao"):
        Engine(tiny_model(), quantize="int8")


needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is optional (requirements-eval.txt)")


@needs_torchao
def test_int8_weights():
    """quantize_int8: every Linear's weight becomes int8 with a scale per row (torchao), logits stay near the
    full-precision ones, and the compiled int8 step gives the eager int8 model's greedy tokens."""
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    int8 = quantize_int8(copy.deepcopy(model).to(torch.bfloat16))
    linears = [m for m in int8.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.qdata.dtype == torch.int8 for m in linears)
    with torch.no_grad():
        got = int8(ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    # The compiled int8 step against eager int8, fed the same tokens: bf16 rounds differently inside fused kernels,
    # so a near-tie between two logits may go either way and greedy tokens are not compared.
    prompts = prompts_of(7, 3)
    steps = [torch.tensor(t) for t in tokens(int8, prompts, SamplingParams(max_new_tokens=10))]
    logits = []
    for engine in (Engine(int8), Engine(copy.deepcopy(int8), compile=True, tune=True)):
        cache = engine.new_cache(2, 24)
        logits.append([engine.prefill(cache, 0, prompts)] + [engine.decode(cache, t) for t in steps[:-1]])
    for a, b in zip(*logits):
        assert (a.float() - b.float()).abs().max() < 0.05 * a.float().abs().max()


def test_int4_weights_compute_what_their_dequantized_weights_compute():
    """Int4Linear: groups of 32 inputs per output row at 4 bits each, through torch's int4 CPU kernel. The product
    equals x @ W_deq^T of the weights it dequantizes to, W_deq is within half a step of the weights (plus bf16's
    rounding of the scales and of the output), and a compiled int4 engine decodes what the eager one does."""
    from model.engine import Int4Linear, quantize_int4

    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False)
    q4 = Int4Linear(linear)
    w = linear.weight.detach().view(96, 2, 32)
    step = (w.amax(-1) - w.amin(-1)) / 15  # (96, 2)
    # Dequantize from the kernel itself: the product with the identity is the dequantized weight.
    deq = q4(torch.eye(64)).float().T  # (96, 64)
    error = (deq - linear.weight).abs().view(96, 2, 32) / step[..., None]  # in quantization steps
    assert error.max() < 0.6 and error.mean() < 0.3
    x = torch.randn(5, 64)
    torch.testing.assert_close(q4(x).float(), x.bfloat16().float() @ deq.T, rtol=0.02, atol=0.02)
    model = quantize_int4(tiny_model())  # hidden_dim 176 is not a multiple of 32: w2 stays as it is
    kinds = {name.split(".")[-1]: type(m).__name__ for name, m in model.named_modules() if hasattr(m, "in_features")}
    assert kinds == {"wq": "Int4Linear", "wk": "Int4Linear", "wv": "Int4Linear", "wo": "Int4Linear",
                     "w1": "Int4Linear", "w3": "Int4Linear", "w2": "Linear", "lm_head": "Int4Linear"}
    prompts = prompts_of(7, 3)
    eager = tokens(Engine(model), prompts, SamplingParams(max_new_tokens=8))
    compiled = tokens(Engine(copy.deepcopy(model), compile=True, rows=(2,)), prompts, SamplingParams(max_new_tokens=8))
    assert eager == compiled


def test_the_cache_holds_the_dtype_attention_computes_in():
    """GRPO samples from fp32 weights under bf16 autocast: a fp32 cache was cast to bf16 in every layer at every step
    (issue 37 #9). The CPU keeps fp32, its faster decode kernel."""
    assert cache_dtype(torch.float32, "cuda", torch.bfloat16) is torch.bfloat16
    assert cache_dtype(torch.float32, "cuda", None) is torch.float32
    assert cache_dtype(torch.bfloat16, "cuda", None) is torch.bfloat16
    assert cache_dtype(torch.int8, "cuda", None) is torch.float32
    assert cache_dtype(torch.bfloat16, "cpu", torch.bfloat16) is torch.float32
    engine = Engine(tiny_model())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.new_cache(rows=1, capacity=4).k[0].dtype is torch.float32
