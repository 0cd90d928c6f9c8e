"""Weight-layout conversions between MiniMind and transformers' Llama.

Our RoPE rotates adjacent pairs (Meta's and upstream MiniMind's layout); transformers' Llama rotates the two
halves of each head. Permuting the rows of wq and wk inside each head maps one onto the other exactly.
"""
import torch
from transformers import LlamaConfig

from .LMConfig import LMConfig
from .errors import InputError


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection: per head, (x0,x1),(x2,x3).. pairs -> first halves then second halves."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama_config(config: LMConfig, **extra) -> LlamaConfig:
    if config.use_moe:
        raise InputError("the Llama format holds dense models only; export a MoE model in the default (hf) format")
    rope = dict(config.rope_parameters)  # the same dict transformers' Llama reads
    if config.rope_scaling_type == "yarn":
        rope.setdefault("original_max_position_embeddings", config.max_seq_len)
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_parameters=rope, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        **extra)


def _key_pairs(n_layers: int):
    """(ours, llama) names of every weight."""
    yield "model.tok_embeddings.weight", "model.embed_tokens.weight"
    yield "model.norm.weight", "model.norm.weight"
    yield "lm_head.weight", "lm_head.weight"
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for ours, theirs in names.items():
            yield f"model.layers.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight"


def _translate(state: dict, config: LMConfig, to_llama: bool) -> dict:
    out = {}
    for ours, theirs in _key_pairs(config.n_layers):
        src, dst = (ours, theirs) if to_llama else (theirs, ours)
        if src == "lm_head.weight" and src not in state:  # tied: saved once, as the embeddings
            src = "model.tok_embeddings.weight" if to_llama else "model.embed_tokens.weight"
        w = state[src]
        heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}.get(
            ours.split(".", 3)[-1])
        if heads:
            w = (interleaved_to_half if to_llama else half_to_interleaved)(w, heads)
        out[dst] = w.contiguous()
    return out


def to_llama_state_dict(state: dict, config: LMConfig) -> dict:
    return _translate(state, config, to_llama=True)


def from_llama_state_dict(state: dict, config: LMConfig) -> dict:
    return _translate(state, config, to_llama=False)


def config_from_llama(cfg: LlamaConfig) -> LMConfig:
    rope = dict(cfg.rope_parameters or {})
    return LMConfig(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                    n_kv_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size, hidden_dim=cfg.intermediate_size,
                    norm_eps=cfg.rms_norm_eps, max_seq_len=cfg.max_position_embeddings,
                    rope_theta=rope.get("rope_theta", 1e4), rope_parameters=rope or None,
                    tie_word_embeddings=cfg.tie_word_embeddings)
