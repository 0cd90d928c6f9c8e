"""The model against transformers' Llama, its cache, masks, MoE and the transformers interface."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from conftest import tiny_config, tiny_model
from model.LMConfig import preset_config
from model.model import MiniMindForCausalLM, MiniMindModel
from model.convert import llama_config, to_llama_state_dict
from model.errors import InputError
from model.generate import SamplingParams, generate_ids


def tokens(model, prompts, params):
    """Every step's tokens of our generator, (steps, B), as lists; no EOS, so every row runs its length."""
    return torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1))).tolist()


def v1_names(state: dict) -> dict:
    """Our state dict in upstream MiniMind v1's flat names, as its .pth files and our files before the split had."""
    return {k.removeprefix("model.").replace("lm_head.", "output."): v for k, v in state.items()}


def to_llama(model):
    llama = LlamaForCausalLM(llama_config(model.config)).eval()
    llama.load_state_dict(to_llama_state_dict(model.state_dict(), model.config), strict=True)
    return llama


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_logits_equal_transformers_llama(scaling):
    model = tiny_model(rope_parameters=scaling, max_seq_len=16)
    ids = torch.randint(0, 128, (2, 48))  # past max_seq_len: the scaled positions are exercised
    with torch.no_grad():
        ours, theirs = model(ids).logits, to_llama(model)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_config_saved_with_the_legacy_rope_scaling_key_reads_the_same():
    """Configs written before transformers 5 say {"rope_scaling": {"type": ...}}; they load as rope_parameters."""
    import warnings

    from model.LMConfig import LMConfig

    new = tiny_model(rope_parameters={"rope_type": "yarn", "factor": 4.0}, max_seq_len=16).config.to_dict()
    assert "rope_scaling" not in new and new["rope_parameters"]["rope_type"] == "yarn"
    legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = LMConfig.from_dict(legacy)
    assert read.rope_parameters == new["rope_parameters"]
    with pytest.raises(InputError, match="rope scaling"):
        LMConfig.from_dict({**legacy, "rope_scaling": {"type": "cubic", "factor": 2.0}})


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
    ffn = model.model.layers[0].feed_forward
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        batched, _ = ffn(x)
    torch.testing.assert_close(batched, naive_moe(ffn, x), atol=1e-5, rtol=1e-5)


def moe_layer_in_bf16():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2).to(torch.bfloat16).train()
    return model.model.layers[0].feed_forward


def test_moe_in_bf16_runs_its_experts_as_one_grouped_matmul_equal_to_one_matmul_each(monkeypatch):
    import model.model as modeling

    ffn = moe_layer_in_bf16()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    grouped = ffn(x)[0]
    grouped.float().square().sum().backward()
    grouped_grads = [p.grad.clone() for p in ffn.experts.parameters()]
    ffn.zero_grad()
    calls = []
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(modeling, "compute_dtype", lambda x: torch.float32)  # the loop over experts instead
    looped = ffn(x)[0]
    looped.float().square().sum().backward()
    assert calls == []  # the reference really took the loop
    torch.testing.assert_close(grouped, looped, atol=0, rtol=0)  # bf16 products summed the same way
    for mine, theirs in zip(grouped_grads, (p.grad for p in ffn.experts.parameters())):
        torch.testing.assert_close(mine, theirs, atol=1e-2, rtol=1e-2)
    assert all(g.abs().sum() > 0 for g in grouped_grads)  # every expert got rows and a gradient


def test_moe_under_autocast_groups_its_experts_and_matches_fp32():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    ffn = model.model.layers[0].feed_forward
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        exact = naive_moe(ffn, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = ffn(x)[0]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, atol=5e-2, rtol=5e-2)


def test_moe_in_bf16_never_waits_for_the_host_and_compiles_whole():
    from conftest import host_syncs

    ffn = moe_layer_in_bf16()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert host_syncs(lambda: ffn(x)[0].float().sum().backward()) == []
    compiled = torch.compile(ffn, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x)[0], ffn(x)[0], atol=0, rtol=0)


def test_moe_aux_loss_is_in_the_loss_and_trains_the_gate():
    model = tiny_model(use_moe=True, aux_loss_alpha=0.1).train()
    ids = torch.randint(0, 128, (4, 32))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    # The balance loss alone sends a gradient to every router.
    out.aux_loss.backward()
    for layer in model.model.layers:
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
        model = MiniMindForCausalLM(preset_config(preset))
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
    assert isinstance(loaded, MiniMindForCausalLM)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.tok_embeddings.weight.data_ptr()


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
    # Upstream saved the raw state dict (sometimes from a DDP or compiled wrapper) with its rope buffer, in v1's flat
    # names (no backbone prefix, the head as `output`).
    state = {f"module._orig_mod.{k}": v for k, v in v1_names(model.state_dict()).items()}
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
    assert "missing keys (1): model.layers.1.ffn_norm.weight" in message
    assert "shape of model.layers.0.attention.wq.weight: model (64, 64), checkpoint (32, 64)" in message


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


def test_one_stream_for_a_whole_batch_is_one_draw_a_step_and_repeats_with_its_seed(model):
    """A batch that is one job (a GRPO rollout) samples from one generator: one random draw a step for all rows,
    where per-row streams take one each (issue 37 #12); the same seed samples the same tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.generate import row_generator

    class CountDraws(TorchDispatchMode):
        draws = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountDraws.draws += str(func.overloadpacket) in ("aten.rand", "aten.uniform_", "aten.uniform")
            return func(*args, **(kwargs or {}))

    prompts = [torch.randint(3, 128, (4 + i,)).tolist() for i in range(6)]
    params = SamplingParams(max_new_tokens=5, temperature=1.0)

    def run(**kwargs):
        CountDraws.draws = 0
        with CountDraws():
            out = torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1, **kwargs)))
        return out, CountDraws.draws

    a, shared_draws = run(generator=row_generator(5, "cpu"))
    b, _ = run(generator=row_generator(5, "cpu"))
    c, _ = run(generator=row_generator(6, "cpu"))
    _, own_draws = run()
    assert shared_draws == 5 and own_draws == 5 * 6
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_p_zero_samples_the_most_likely_token_and_bad_settings_are_refused(model):
    prompt = torch.randint(3, 128, (6,)).tolist()
    state = torch.get_rng_state()
    greedy = [int(t) for t in generate_ids(model, [prompt], SamplingParams(max_new_tokens=12), eos_token_id=-1)]
    assert torch.equal(torch.get_rng_state(), state)  # greedy decoding leaves the global RNG alone
    nucleus_of_one = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.0, seed=5)
    assert [int(t) for t in generate_ids(model, [prompt], nucleus_of_one, eos_token_id=-1)] == greedy
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}, {"max_new_tokens": 0}):
        with pytest.raises(InputError, match=f"{next(iter(bad))} must be"):
            SamplingParams(**bad)




def test_backbone_and_head_as_transformers_expects():
    """base_model_prefix names the backbone: `model.base_model` returns hidden states (what trl's fused LM-head
    loss and AutoModel users read), with every layer's when asked; the head is tied to the embeddings."""
    model = tiny_model()
    assert model.base_model is model.model and isinstance(model.model, MiniMindModel)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out = model.base_model(input_ids=ids, output_hidden_states=True)
        logits = model(ids).logits
    assert out.last_hidden_state.shape == (2, 9, 64) and len(out.hidden_states) == model.config.n_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(model.get_output_embeddings()(out.last_hidden_state), logits)
    assert model.lm_head.weight is model.model.tok_embeddings.weight
    assert type(AutoModelForCausalLM.from_config(model.config)) is MiniMindForCausalLM


@pytest.mark.parametrize("use_moe", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_moe):
    model = tiny_model(use_moe=use_moe, dropout=0.0).train()
    ids = torch.randint(0, 128, (2, 16))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    recomputed = []
    model.model.layers[0].attention.register_forward_hook(lambda *a: recomputed.append(1))
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert len(recomputed) == 2  # the block ran again in the backward pass
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_peft_picks_lora_targets_without_being_told():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, task_type="CAUSAL_LM"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"wq", "wv"}  # as for Llama: the query and value projections


def test_files_in_the_flat_v1_layout_load(tmp_path, model):
    """Our safetensors files and LoRA adapters from before the backbone/head split (flat v1 names) still load."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from model.checkpoint import save_weights
    from model.loading import load_model

    old = tmp_path / "full_sft_64.safetensors"
    save_weights(old, v1_names(model.state_dict()), model.config)
    assert "model.tok_embeddings.weight" not in load_file(str(old))
    ids = torch.randint(0, 128, (1, 10))
    loaded = load_model(old)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["wq", "w2"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(old)
    peft_model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in load_file(str(weights)).items()},
              str(weights))  # as peft saved it for the flat model
    with torch.no_grad():
        expected = peft_model(ids).logits
        torch.testing.assert_close(load_model(tmp_path / "adapter")(ids).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(expected, model(ids).logits)  # the adapter changes something


def test_cast_keeps_rope_frequencies_in_fp32(tmp_path, model):
    from model.checkpoint import save_weights
    from model.loading import cast_model, load_model

    save_weights(tmp_path / "m.safetensors", model.state_dict(), model.config)
    half = load_model(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert half.model.tok_embeddings.weight.dtype == torch.bfloat16 and half.model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(half.model.inv_freq, model.model.inv_freq, atol=0, rtol=0)
    assert cast_model(copy.deepcopy(model), torch.float16).model.inv_freq.dtype == torch.float32


def test_a_batch_without_labelled_tokens_has_loss_zero_not_nan():
    """A chat row truncated before its answer labels nothing; a batch of only such rows (length-grouped batches
    make them meet) must not stop training with a NaN."""
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 8))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    labelled = model(input_ids=ids, labels=ids).loss
    assert torch.isclose(labelled, torch.nn.functional.cross_entropy(
        model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
