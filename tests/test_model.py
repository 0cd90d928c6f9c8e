"""The model against transformers' Llama, its cache, masks, MoE and the transformers interface."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from conftest import tiny_config, tiny_model
from model.LMConfig import preset_config
from model.model import MiniMindLM
from model.convert import llama_config, to_llama_state_dict
from model.errors import InputError
from model.generate import SamplingParams, compile_decoding, generate_ids
from model.loading import quantize_int8


def tokens(model, prompts, params):
    """Every step's tokens of our generator, (steps, B), as lists; no EOS, so every row runs its length."""
    return torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1))).tolist()


def to_llama(model):
    llama = LlamaForCausalLM(llama_config(model.config)).eval()
    llama.load_state_dict(to_llama_state_dict(model.state_dict(), model.config), strict=True)
    return llama


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}, {"type": "yarn", "factor": 4.0}])
def test_logits_equal_transformers_llama(scaling):
    model = tiny_model(rope_scaling=scaling, max_seq_len=16)
    ids = torch.randint(0, 128, (2, 48))  # past max_seq_len: the scaled positions are exercised
    with torch.no_grad():
        ours, theirs = model(ids).logits, to_llama(model)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_kv_cache_decoding_equals_full_forward(model):
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :20], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(20, 30):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_causality(model):
    ids = torch.randint(0, 128, (1, 24))
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 7) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=0, rtol=0)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("flash", [True, False])
def test_left_padded_batch_matches_each_prompt_alone(flash):
    model = tiny_model(flash_attn=flash)
    prompts = [torch.randint(3, 128, (n,)) for n in (12, 5, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            torch.testing.assert_close(batch[row, width - len(p):], alone, atol=1e-5, rtol=0)


def test_explicit_attention_equals_sdpa():
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        fused = tiny_model(flash_attn=True)(ids).logits
        explicit = tiny_model(flash_attn=False)(ids).logits
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


def naive_moe(ffn, x):
    """Every token through its experts one at a time: the reference for the batched dispatch."""
    flat = x.reshape(-1, x.shape[-1])
    top_idx, top_weight, _ = ffn.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(top_idx.shape[1]):
            out[t] += top_weight[t, j] * ffn.experts[int(top_idx[t, j])](flat[t])
    return out.view_as(x) + ffn.shared_experts(x)


def test_moe_dispatch_equals_naive_loop():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    ffn = model.layers[0].feed_forward
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        batched, _ = ffn(x)
    torch.testing.assert_close(batched, naive_moe(ffn, x), atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_is_in_the_loss_and_trains_the_gate():
    model = tiny_model(use_moe=True, aux_loss_alpha=0.1).train()
    ids = torch.randint(0, 128, (4, 32))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    # The balance loss alone sends a gradient to every router.
    out.aux_loss.backward()
    for layer in model.layers:
        assert layer.feed_forward.gate.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_moe_eval_has_no_aux_loss_and_cache_works():
    model = tiny_model(use_moe=True)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        full = model(ids)
        assert full.aux_loss is None
        first = model(ids[:, :10], use_cache=True)
        rest = model(ids[:, 10:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,expected", [("minimind-v1-small", 26e6), ("minimind-v1", 108e6)])
def test_preset_parameter_counts_match_the_seed_table(preset, expected):
    with torch.device("meta"):
        model = MiniMindLM(preset_config(preset))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.05, count


def test_labels_ignore_minus_100(model):
    ids = torch.randint(0, 128, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 5:-1].reshape(-1, 128), ids[:, 6:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_transformers_generate_agrees_with_ours(model):
    prompt = torch.randint(3, 128, (1, 8))
    theirs = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:]
    ours = torch.stack(list(generate_ids(model, [prompt[0].tolist()], SamplingParams(max_new_tokens=24),
                                         eos_token_id=-1)))[:, 0]
    assert len(set(ours.tolist())) > 3, "degenerate test model"
    assert ours.tolist() == theirs.tolist()


def test_generation_past_max_seq_len(model):
    prompt = torch.randint(3, 128, (60,)).tolist()  # max_seq_len is 64
    steps = list(generate_ids(model, [prompt], SamplingParams(max_new_tokens=40), eos_token_id=-1))
    assert len(steps) == 40


def test_save_and_load_pretrained_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "minimind"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MiniMindLM)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()


def test_peft_lora_wraps_and_trains_a_step(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w1", "w2"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    peft_model.train()
    before = peft_model(input_ids=ids, labels=ids).loss
    before.backward()
    opt.step()
    after = peft_model(input_ids=ids, labels=ids).loss
    assert after.item() < before.item()


def test_rotary_equals_upstream_complex_form():
    """Upstream MiniMind multiplies adjacent pairs, viewed as complex numbers, by e^(i * pos * theta_k)."""
    from model.model import apply_rotary, rope_inv_freq

    cfg = tiny_config()
    x = torch.randn(2, 10, 4, cfg.head_dim)
    inv_freq, _ = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(10).float(), inv_freq)  # (T, D/2)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 10, 4, -1, 2))
                                  * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    got = apply_rotary(x, angles.cos()[None, :, None], angles.sin()[None, :, None])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_upstream_pth_state_dict_loads_and_mismatches_are_named(tmp_path):
    from model.checkpoint import CheckpointMismatch
    from model.loading import load_model

    model = tiny_model(use_moe=True)
    # Upstream saved the raw state dict (sometimes from a DDP or compiled wrapper) with its rope buffer.
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["module._orig_mod.pos_cis"] = torch.zeros(64, 8, dtype=torch.complex64)
    torch.save(state, tmp_path / "full_sft_64_moe.pth")
    config = tiny_config(use_moe=True)
    loaded = load_model(tmp_path / "full_sft_64_moe.pth", config=config)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    inferred = load_model(tmp_path / "full_sft_64_moe.pth", config=None)  # dims read from the shapes (16 heads)
    assert (inferred.config.dim, inferred.config.n_layers, inferred.config.n_routed_experts) == (64, 2, 4)
    del state["module._orig_mod.layers.1.ffn_norm.weight"]
    state["module._orig_mod.layers.0.attention.wq.weight"] = torch.zeros(32, 64)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatch) as err:
        load_model(tmp_path / "broken.pth", config=config)
    message = str(err.value)
    assert "missing keys (1): layers.1.ffn_norm.weight" in message
    assert "shape of layers.0.attention.wq.weight: model (64, 64), checkpoint (32, 64)" in message


def test_each_generation_call_owns_its_cache(model):
    """Two generations interleaved step by step give what each gives alone."""
    a, b = torch.randint(3, 128, (7,)).tolist(), torch.randint(3, 128, (11,)).tolist()
    params = SamplingParams(max_new_tokens=16)
    alone_a = [int(t) for t in generate_ids(model, [a], params, eos_token_id=-1)]
    alone_b = [int(t) for t in generate_ids(model, [b], params, eos_token_id=-1)]
    ga, gb = generate_ids(model, [a], params, eos_token_id=-1), generate_ids(model, [b], params, eos_token_id=-1)
    together_a, together_b = [], []
    for ta, tb in zip(ga, gb):
        together_a.append(int(ta))
        together_b.append(int(tb))
    assert together_a == alone_a and together_b == alone_b


def test_sampling_is_seeded_per_row_and_repetition_penalty_respects_sign(model):
    from model.generate import apply_repetition_penalty

    prompt = torch.randint(3, 128, (6,)).tolist()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=11)
    first = [int(t) for t in generate_ids(model, [prompt], params, eos_token_id=-1)]
    # The same seeded request inside a batch with another prompt samples the same tokens.
    other = SamplingParams(max_new_tokens=12, temperature=1.0, seed=99)
    batched = torch.stack(list(generate_ids(model, [prompt, prompt[:3]], [params, other], eos_token_id=-1)))
    assert batched[:, 0].tolist() == first
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalised = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), torch.tensor([[2.0]]))
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]  # both seen tokens became less likely


def test_top_p_zero_samples_the_most_likely_token_and_bad_settings_are_refused(model):
    prompt = torch.randint(3, 128, (6,)).tolist()
    greedy = [int(t) for t in generate_ids(model, [prompt], SamplingParams(max_new_tokens=12), eos_token_id=-1)]
    nucleus_of_one = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.0, seed=5)
    assert [int(t) for t in generate_ids(model, [prompt], nucleus_of_one, eos_token_id=-1)] == greedy
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}, {"max_new_tokens": 0}):
        with pytest.raises(InputError, match=f"{next(iter(bad))} must be"):
            SamplingParams(**bad)


@pytest.mark.parametrize("use_moe", [False, True])
def test_decoding_layout_keeps_values_and_train_restores_the_training_layout(use_moe, tmp_path):
    from model.checkpoint import save_weights

    model = tiny_model(use_moe=use_moe)
    ids = torch.randint(3, 128, (2, 12))
    expected = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.use_decoding_layout()
    attn = model.layers[0].attention
    assert attn.qkv_fused() and attn.wq.weight.untyped_storage().data_ptr() == attn.wv.weight.untyped_storage().data_ptr()
    assert attn.wo.weight.t().is_contiguous()  # fp32 on CPU: stored (in, out)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    save_weights(tmp_path / "w.safetensors", model.state_dict())  # views of one buffer still save
    # Casting makes new tensors: the fused view is dropped rather than used stale, and laid out again on demand.
    half = model.to(torch.bfloat16)
    assert not half.layers[0].attention.qkv_fused()
    assert half.inv_freq.dtype == torch.float32  # RoPE frequencies keep full precision
    torch.testing.assert_close(half(ids).logits.float(), expected, atol=0.1, rtol=0.05)
    half.use_decoding_layout()
    assert half.layers[0].attention.qkv_fused() and half.layers[0].attention.wo.weight.is_contiguous()
    model = half.float().train()
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(p.is_contiguous() for p in model.parameters()) and len(ptrs) == len(list(model.parameters()))
    assert model.layers[0].attention.wqkv is None
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.layers[0].attention.wq.weight.grad is not None


@pytest.mark.parametrize("flash", [True, False])
def test_compiled_decoding_equals_eager_for_any_length_without_recompiling(flash):
    """compile_decoding's fixed-shape step (cache written in place, additive mask over all its columns) gives the
    eager tokens: left-padded rows, greedy beside seeded sampling; a call of other lengths reuses the graph."""
    model = tiny_model(flash_attn=flash)
    graphs = counters["stats"]["unique_graphs"]
    compiled = compile_decoding(copy.deepcopy(model))
    assert counters["stats"]["unique_graphs"] > graphs  # compiled while loading, for one row
    greedy, sampled = SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=9, temperature=1.0, seed=3)
    prompts = [torch.randint(3, 128, (9,)).tolist(), torch.randint(3, 128, (4,)).tolist()]
    graphs = counters["stats"]["unique_graphs"]
    assert tokens(compiled, prompts, [greedy, sampled]) == tokens(model, prompts, [greedy, sampled])
    assert counters["stats"]["unique_graphs"] > graphs  # two rows: the compiled step ran, compiled for them
    graphs = counters["stats"]["unique_graphs"]
    longer = [torch.randint(3, 128, (17,)).tolist(), torch.randint(3, 128, (2,)).tolist()]
    assert tokens(compiled, longer, SamplingParams(max_new_tokens=30)) == tokens(model, longer, SamplingParams(max_new_tokens=30))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decoding_follows_a_cast_of_the_weights():
    """The compiled step guards the weights it reads: after a cast to bf16 it compiles anew and gives bf16's tokens
    instead of running the fp32 graph on bf16 weights."""
    model = tiny_model()
    compiled = compile_decoding(copy.deepcopy(model)).to(torch.bfloat16)
    reference = copy.deepcopy(model).to(torch.bfloat16)
    prompt = [torch.randint(3, 128, (6,)).tolist()]
    graphs = counters["stats"]["unique_graphs"]
    params = SamplingParams(max_new_tokens=10)
    assert tokens(compiled, prompt, params) == tokens(reference, prompt, params)
    assert counters["stats"]["unique_graphs"] > graphs


def test_int8_weights():
    """quantize_int8: every Linear's weight becomes int8 with a scale per row (torchao), logits stay near the
    full-precision ones, and the compiled int8 step gives the eager int8 model's greedy tokens."""
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    int8 = quantize_int8(copy.deepcopy(model).to(torch.bfloat16))
    linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.qdata.dtype == torch.int8 for m in linears)
    with torch.no_grad():
        got = int8(ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    prompts = [torch.randint(3, 128, (7,)).tolist(), torch.randint(3, 128, (3,)).tolist()]
    params = SamplingParams(max_new_tokens=10)
    assert tokens(compile_decoding(copy.deepcopy(int8)), prompts, params) == tokens(int8, prompts, params)
